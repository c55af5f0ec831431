//! The on-disk log: a directory with one file per thread log id, each the
//! concatenation of that thread's batches in the order they were drained.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use super::batch::{
    BatchHeader, BatchReader, BatchSummary, HEADER_LEN, RecordCursor, verify_batch,
};
use super::error::{DecodeError, LogError};
use super::event::Record;

const FILE_PREFIX: &str = "thread-";
const FILE_SUFFIX: &str = ".rrlog";

/// Path of thread log `log_id`'s file inside `dir`.
pub fn log_file_path(dir: &Path, log_id: u32) -> PathBuf {
    dir.join(format!("{FILE_PREFIX}{log_id:08}{FILE_SUFFIX}"))
}

/// The thread log ids that have a file in `dir`, ascending.
pub fn thread_log_ids(dir: &Path) -> Result<Vec<u32>, LogError> {
    let io = |source| LogError::Io {
        op: "list log directory",
        path: dir.to_owned(),
        source,
    };
    let mut ids = Vec::new();
    for entry in fs::read_dir(dir).map_err(io)? {
        let name = entry.map_err(io)?.file_name();
        let id = name
            .to_str()
            .and_then(|n| n.strip_prefix(FILE_PREFIX))
            .and_then(|n| n.strip_suffix(FILE_SUFFIX))
            .and_then(|n| n.parse::<u32>().ok());
        ids.extend(id);
    }
    ids.sort_unstable();
    Ok(ids)
}

struct ThreadFile {
    file: File,
    path: PathBuf,
    /// Bytes written so far through this writer plus what was there.
    len: u64,
    /// Last sequence number appended through this writer.
    last_seq: Option<u64>,
}

/// Appends batches to a log directory (agent side).
///
/// Every batch is fully decoded before it is stored, so a misbehaving
/// application cannot plant an unreadable log, and each thread's sequence
/// numbers are checked to keep increasing across batches. Each batch is
/// written with a single `write`; call [`sync`](Self::sync) to make the
/// log durable.
pub struct LogWriter {
    dir: PathBuf,
    files: HashMap<u32, ThreadFile>,
    /// The last sequence number of each thread log whose file was closed
    /// to keep few open: the check goes on when it is opened again.
    closed_last: HashMap<u32, u64>,
}

/// Thread files a writer keeps open at most: a program with many threads
/// (or one naming many logs) must not take every descriptor of the
/// process that records it. Beyond it a file is synced and closed, and
/// opened again when its thread writes again.
const MAX_OPEN_FILES: usize = 256;

impl LogWriter {
    /// Opens (creating if needed) the log directory `dir`. Existing thread
    /// files are appended to.
    pub fn create(dir: impl Into<PathBuf>) -> Result<Self, LogError> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(|source| LogError::Io {
            op: "create log directory",
            path: dir.clone(),
            source,
        })?;
        // What a program read (requests, keys, whatever its clients sent):
        // its owner's only.
        fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700)).map_err(
            |source| LogError::Io {
                op: "make the log directory private",
                path: dir.clone(),
                source,
            },
        )?;
        Ok(LogWriter {
            dir,
            files: HashMap::new(),
            closed_last: HashMap::new(),
        })
    }

    /// The log directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Validates `batch` and appends it to its thread's file. Empty batches
    /// are accepted and not stored.
    pub fn append(&mut self, batch: &[u8]) -> Result<BatchSummary, LogError> {
        let summary = BatchReader::validate(batch).map_err(|source| LogError::Corrupt {
            path: self.dir.clone(),
            offset: 0,
            source,
        })?;
        let Some(last) = summary.last_seq else {
            return Ok(summary);
        };
        let log_id = summary.header.log_id;
        if !self.files.contains_key(&log_id) && self.files.len() >= MAX_OPEN_FILES {
            self.close_one()?;
        }
        let tf = match self.files.entry(log_id) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let path = log_file_path(&self.dir, log_id);
                let file = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .map_err(|source| LogError::Io {
                        op: "open log file",
                        path: path.clone(),
                        source,
                    })?;
                let len = file.metadata().map(|m| m.len()).unwrap_or(0);
                e.insert(ThreadFile {
                    file,
                    path,
                    len,
                    last_seq: self.closed_last.remove(&log_id),
                })
            }
        };
        if let Some(prev) = tf.last_seq
            && summary.header.first_seq <= prev
        {
            return Err(LogError::Corrupt {
                path: tf.path.clone(),
                offset: tf.len,
                source: DecodeError::SeqNotIncreasing {
                    prev,
                    next: summary.header.first_seq,
                },
            });
        }
        tf.file.write_all(batch).map_err(|source| LogError::Io {
            op: "append to log file",
            path: tf.path.clone(),
            source,
        })?;
        tf.len += batch.len() as u64;
        tf.last_seq = Some(last);
        Ok(summary)
    }

    /// Syncs and closes one open thread file (the one written longest ago
    /// is not tracked: any will do, it is opened again when needed).
    fn close_one(&mut self) -> Result<(), LogError> {
        let Some(&id) = self.files.keys().next() else {
            return Ok(());
        };
        let tf = self.files.remove(&id).expect("a key just seen");
        tf.file.sync_data().map_err(|source| LogError::Io {
            op: "sync log file",
            path: tf.path.clone(),
            source,
        })?;
        if let Some(last) = tf.last_seq {
            self.closed_last.insert(id, last);
        }
        Ok(())
    }

    /// Flushes every thread file to stable storage.
    pub fn sync(&mut self) -> Result<(), LogError> {
        for tf in self.files.values() {
            tf.file.sync_data().map_err(|source| LogError::Io {
                op: "sync log file",
                path: tf.path.clone(),
                source,
            })?;
        }
        Ok(())
    }
}

/// Reads the records of one thread log, in order (replay side).
///
/// Checks every batch's header and CRC, that it belongs to this thread,
/// and that global sequence numbers strictly increase across the whole
/// file. Memory use is one batch, never more than the file holds.
pub struct LogReader {
    path: PathBuf,
    file: File,
    log_id: u32,
    /// File offset of the next batch.
    offset: u64,
    file_len: u64,
    /// The current batch, header included.
    buf: Vec<u8>,
    /// File offset of the current batch.
    batch_offset: u64,
    cursor: RecordCursor,
    last_seq: Option<u64>,
}

impl LogReader {
    /// Opens thread log `log_id` in `dir`.
    pub fn open(dir: &Path, log_id: u32) -> Result<Self, LogError> {
        let path = log_file_path(dir, log_id);
        let io = |op, path: &Path| {
            let path = path.to_owned();
            move |source| LogError::Io { op, path, source }
        };
        let file = File::open(&path).map_err(io("open log file", &path))?;
        let file_len = file.metadata().map_err(io("stat log file", &path))?.len();
        Ok(LogReader {
            path,
            file,
            log_id,
            offset: 0,
            file_len,
            buf: Vec::new(),
            batch_offset: 0,
            cursor: RecordCursor::exhausted(),
            last_seq: None,
        })
    }

    /// The thread log id being read.
    pub fn log_id(&self) -> u32 {
        self.log_id
    }

    /// Sequence number of the last record returned.
    pub fn last_seq(&self) -> Option<u64> {
        self.last_seq
    }

    fn corrupt(&self, offset: u64, source: DecodeError) -> LogError {
        LogError::Corrupt {
            path: self.path.clone(),
            offset,
            source,
        }
    }

    /// Loads the next batch; `false` at a clean end of file.
    fn load_batch(&mut self) -> Result<bool, LogError> {
        let left = self.file_len - self.offset;
        if left == 0 {
            return Ok(false);
        }
        let at = self.offset;
        let mut head = [0u8; HEADER_LEN];
        let head_len = (left as usize).min(HEADER_LEN);
        self.read_exact(&mut head[..head_len])?;
        let header = BatchHeader::parse(&head[..head_len]).map_err(|e| self.corrupt(at, e))?;
        if header.log_id != self.log_id {
            return Err(self.corrupt(
                at,
                DecodeError::WrongThread {
                    expected: self.log_id,
                    found: header.log_id,
                },
            ));
        }
        // Trust the declared length only as far as the file backs it.
        let payload_left = left - HEADER_LEN as u64;
        if u64::from(header.payload_len) > payload_left {
            return Err(self.corrupt(
                at,
                DecodeError::Truncated {
                    what: "batch payload",
                    offset: HEADER_LEN,
                    needed: u64::from(header.payload_len),
                    available: payload_left as usize,
                },
            ));
        }
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        buf.extend_from_slice(&head);
        buf.resize(header.batch_len(), 0);
        let read = self.read_exact(&mut buf[HEADER_LEN..]);
        self.buf = buf;
        read?;
        verify_batch(&self.buf).map_err(|e| self.corrupt(at, e))?;
        self.batch_offset = at;
        self.cursor = RecordCursor::new(&header);
        Ok(true)
    }

    fn read_exact(&mut self, out: &mut [u8]) -> Result<(), LogError> {
        self.file.read_exact(out).map_err(|source| LogError::Io {
            op: "read log file",
            path: self.path.clone(),
            source,
        })?;
        self.offset += out.len() as u64;
        Ok(())
    }

    /// The next record, or `None` at the end of the log.
    ///
    /// The record borrows the reader's buffer; it stays valid until the
    /// next call.
    pub fn next_record(&mut self) -> Result<Option<Record<'_>>, LogError> {
        // Finish the current batch (which checks for trailing bytes) and
        // load the next one until a record is available.
        while self.cursor.is_done() {
            if let Err(e) = self
                .cursor
                .next(&self.buf[HEADER_LEN.min(self.buf.len())..])
            {
                return Err(self.corrupt(self.batch_offset, e));
            }
            if !self.load_batch()? {
                return Ok(None);
            }
        }
        let at = self.batch_offset;
        let record = match self.cursor.next(&self.buf[HEADER_LEN..]) {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(None),
            Err(e) => {
                return Err(LogError::Corrupt {
                    path: self.path.clone(),
                    offset: at,
                    source: e,
                });
            }
        };
        if let Some(prev) = self.last_seq
            && record.seq <= prev
        {
            return Err(LogError::Corrupt {
                path: self.path.clone(),
                offset: at,
                source: DecodeError::SeqNotIncreasing {
                    prev,
                    next: record.seq,
                },
            });
        }
        self.last_seq = Some(record.seq);
        Ok(Some(record))
    }
}
