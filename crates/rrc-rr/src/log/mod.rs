//! The event log format.
//!
//! Records ([`Record`], [`Event`]) are packed into checksummed batches of
//! one thread ([`BatchWriter`], [`BatchReader`]); the agent stores each
//! thread's batches in its own file ([`LogWriter`], [`LogReader`]). See
//! the crate's `README.md` for the byte-level specification.

mod batch;
mod codec;
mod error;
mod event;
mod file;

pub use batch::{
    BATCH_MAGIC, BatchHeader, BatchReader, BatchSummary, BatchWriter, FORMAT_VERSION, HEADER_LEN,
    MAX_PAYLOAD_LEN,
};
pub use error::{DecodeError, EncodeError, LogError};
pub use event::{
    AcceptCall, Bytes, EpollCall, EpollReady, Event, List, ListItem, ListIter, MmapCall, PollCall,
    ReadCall, Record, RecvCall, RecvMsg, SelectCall, SyncOp, WaitCall, WaitChild, WriteCall, tag,
};
pub use file::{LogReader, LogWriter, log_file_path, thread_log_ids};
