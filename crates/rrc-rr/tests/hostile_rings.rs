//! The rings live in memory the recorded program can write: a program
//! that abuses them must not stop the recording of its other threads, nor
//! make the rrc process open a file per log id it names.

use std::time::{Duration, Instant};

use rrc_rr::agent::Recorder;
use rrc_rr::log::{BatchWriter, Event, Record, thread_log_ids};
use rrc_rr::ring::{Producer, RingSet};

/// One batch of thread log `log_id` holding one record numbered `seq`.
fn batch(log_id: u32, seq: u64) -> Vec<u8> {
    let mut buf = vec![0u8; 4096];
    let mut w = BatchWriter::new(&mut buf, log_id).unwrap();
    w.push(&Record {
        seq,
        time_delta_ns: 1,
        event: Event::ClockGettime {
            clock: 1,
            ret: 0,
            sec: 1,
            nsec: 0,
        },
    })
    .unwrap();
    w.finish().to_vec()
}

/// Pushes `msg`, waiting while the ring is full (the drain empties it).
fn push(p: &mut Producer<'_>, msg: &[u8]) {
    let until = Instant::now() + Duration::from_secs(20);
    while !p.try_push(msg) {
        assert!(Instant::now() < until, "the drain stopped draining");
        std::thread::sleep(Duration::from_micros(200));
    }
}

#[test]
fn a_hostile_program_neither_stops_the_drain_nor_opens_a_file_per_log_it_names() {
    let dir = std::env::temp_dir().join(format!("rrc-hostile-rings-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let set = RingSet::create(4, 1 << 16).unwrap();
    // The program's own mapping of the same memory.
    let program = RingSet::from_fd(set.fd().try_clone_to_owned().unwrap()).unwrap();
    let honest = program.claim_slot(1, 100).unwrap();
    let forger = program.claim_slot(2, 101).unwrap();
    let thief = program.claim_slot(3, 102).unwrap();
    // The thief takes its ring's consumer end before the drain can.
    let _stolen = program.consumer(thief).unwrap();
    let recorder = Recorder::start(set, &dir).unwrap();

    let mut h = program.producer(honest).unwrap();
    let mut f = program.producer(forger).unwrap();
    let mut t = program.producer(thief).unwrap();
    let mut seq = 0;
    let mut next = || {
        seq += 1;
        seq
    };
    push(&mut t, &batch(3, next()));
    // 5000 batches, each naming another thread's log.
    for i in 0..5000 {
        push(&mut f, &batch(1000 + i, next()));
        if i % 50 == 0 {
            push(&mut h, &batch(1, next()));
        }
    }
    push(&mut h, &batch(1, next()));
    let stats = recorder.finish().unwrap();

    // Every batch of the honest thread is in its log; nothing else is.
    assert_eq!(stats.per_thread.get(&1), Some(&101), "{stats:#?}");
    assert_eq!(thread_log_ids(&dir).unwrap(), vec![1]);
    assert!(stats.refused_batches >= 5000, "{stats:#?}");
    assert_eq!(stats.broken_rings, vec![thief], "{stats:#?}");
    let _ = std::fs::remove_dir_all(&dir);
}
