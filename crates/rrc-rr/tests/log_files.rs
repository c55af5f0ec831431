//! The on-disk log directory: batches appended by the agent read back per
//! thread, with sequence and integrity checks.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use rrc_rr::log::{
    BatchWriter, Bytes, DecodeError, Event, LogError, LogReader, LogWriter, Record, SyncOp,
    log_file_path, thread_log_ids,
};

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rrc-rr-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// One batch for `log_id` holding sync records with the given sequence
/// numbers.
fn batch(log_id: u32, seqs: &[u64]) -> Vec<u8> {
    let mut buf = vec![0u8; 4096];
    let mut w = BatchWriter::new(&mut buf, log_id).unwrap();
    for &seq in seqs {
        let data = seq.to_le_bytes();
        w.push(&Record {
            seq,
            time_delta_ns: seq * 3,
            event: if seq % 2 == 0 {
                Event::Sync {
                    op: SyncOp::MutexLock,
                    obj: 0x7f00_0000_1000 + seq,
                    ret: 0,
                }
            } else {
                Event::Getrandom {
                    ret: 8,
                    data: Bytes::Flat(&data),
                }
            },
        })
        .unwrap();
    }
    w.finish().to_vec()
}

fn read_seqs(dir: &Path, log_id: u32) -> Result<Vec<u64>, LogError> {
    let mut r = LogReader::open(dir, log_id)?;
    let mut seqs = Vec::new();
    while let Some(rec) = r.next_record()? {
        if let Event::Getrandom { data, .. } = rec.event {
            assert_eq!(data.as_flat(), Some(&rec.seq.to_le_bytes()[..]));
        }
        seqs.push(rec.seq);
    }
    Ok(seqs)
}

#[test]
fn threads_are_stored_and_read_back_separately() {
    let dir = temp_dir("roundtrip");
    let mut w = LogWriter::create(&dir).unwrap();
    // Interleaved global order across two threads.
    w.append(&batch(1, &[1, 2, 5])).unwrap();
    w.append(&batch(2, &[3, 4])).unwrap();
    w.append(&batch(1, &[6, 9])).unwrap();
    w.append(&batch(2, &[])).unwrap();
    w.append(&batch(2, &[7, 8, 10])).unwrap();
    w.sync().unwrap();
    assert_eq!(thread_log_ids(&dir).unwrap(), [1, 2]);
    assert_eq!(read_seqs(&dir, 1).unwrap(), [1, 2, 5, 6, 9]);
    assert_eq!(read_seqs(&dir, 2).unwrap(), [3, 4, 7, 8, 10]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn writer_refuses_bad_batches() {
    let dir = temp_dir("refuse");
    let mut w = LogWriter::create(&dir).unwrap();
    w.append(&batch(1, &[10, 11])).unwrap();
    let err = w.append(&batch(1, &[11, 12])).unwrap_err();
    assert!(matches!(
        err,
        LogError::Corrupt {
            source: DecodeError::SeqNotIncreasing { prev: 11, next: 11 },
            ..
        }
    ));
    let mut bad = batch(1, &[20]);
    let last = bad.len() - 1;
    bad[last] ^= 1;
    assert!(matches!(
        w.append(&bad),
        Err(LogError::Corrupt {
            source: DecodeError::Checksum { .. },
            ..
        })
    ));
    // Nothing of the refused batches reached the file.
    assert_eq!(read_seqs(&dir, 1).unwrap(), [10, 11]);
    std::fs::remove_dir_all(&dir).unwrap();
}

fn append_raw(dir: &Path, log_id: u32, bytes: &[u8]) {
    std::fs::create_dir_all(dir).unwrap();
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_file_path(dir, log_id))
        .unwrap()
        .write_all(bytes)
        .unwrap();
}

fn read_err(dir: &Path, log_id: u32) -> DecodeError {
    match read_seqs(dir, log_id) {
        Err(LogError::Corrupt { source, .. }) => source,
        other => panic!("expected corruption, got {other:?}"),
    }
}

#[test]
fn reader_checks_order_across_batches() {
    let dir = temp_dir("order");
    append_raw(&dir, 4, &batch(4, &[5, 6]));
    append_raw(&dir, 4, &batch(4, &[6, 7]));
    assert_eq!(
        read_err(&dir, 4),
        DecodeError::SeqNotIncreasing { prev: 6, next: 6 }
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn reader_rejects_foreign_truncated_and_oversized_batches() {
    let dir = temp_dir("damaged");
    // A batch of another thread in this thread's file.
    append_raw(&dir, 1, &batch(2, &[1]));
    assert_eq!(
        read_err(&dir, 1),
        DecodeError::WrongThread {
            expected: 1,
            found: 2
        }
    );

    // A torn final batch.
    let good = batch(3, &[1, 2]);
    append_raw(&dir, 3, &good);
    append_raw(&dir, 3, &batch(3, &[3, 4])[..20]);
    assert!(matches!(read_err(&dir, 3), DecodeError::Truncated { .. }));

    // A header claiming a payload the file does not have: refused before
    // any buffer of that size is allocated.
    let mut huge = batch(5, &[1]);
    huge[24..28].copy_from_slice(&(8u32 << 20).to_le_bytes());
    append_raw(&dir, 5, &huge);
    assert!(matches!(
        read_err(&dir, 5),
        DecodeError::Truncated {
            what: "batch payload",
            ..
        }
    ));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn missing_log_is_an_io_error_with_the_path() {
    let dir = temp_dir("missing");
    let err = LogReader::open(&dir, 77).err().unwrap();
    let msg = err.to_string();
    assert!(matches!(err, LogError::Io { .. }));
    assert!(msg.contains("thread-00000077.rrlog"), "{msg}");
}

#[test]
fn a_writer_keeps_few_files_open_and_still_checks_each_threads_order() {
    // Hundreds of thread logs (a program with many threads, or one naming
    // many): files are closed and opened again as needed, nothing is lost,
    // and a thread's numbers must still rise across a reopening.
    let dir = temp_dir("many");
    let mut w = LogWriter::create(&dir).unwrap();
    for round in 0..2u64 {
        for id in 1..=600u32 {
            w.append(&batch(id, &[round * 10_000 + u64::from(id)]))
                .unwrap();
        }
    }
    let open = std::fs::read_dir("/proc/self/fd").unwrap().count();
    assert!(open < 400, "{open} descriptors open");
    let e = w.append(&batch(7, &[5])).unwrap_err();
    assert!(
        matches!(
            e,
            LogError::Corrupt {
                source: DecodeError::SeqNotIncreasing { .. },
                ..
            }
        ),
        "{e:?}"
    );
    w.sync().unwrap();
    assert_eq!(thread_log_ids(&dir).unwrap().len(), 600);
    for id in [1u32, 300, 600] {
        let mut r = LogReader::open(&dir, id).unwrap();
        let mut n = 0;
        while r.next_record().unwrap().is_some() {
            n += 1;
        }
        assert_eq!(n, 2, "thread log {id}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
