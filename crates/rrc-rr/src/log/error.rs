//! Errors raised while encoding or decoding the log format.

use std::path::PathBuf;

use thiserror::Error;

/// Why a record could not be appended to a batch.
///
/// Carries no heap data: the writer runs where allocation is forbidden.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum EncodeError {
    /// The record does not fit in the space left in the buffer; flush the
    /// batch and retry with an empty one.
    #[error("record does not fit in the remaining batch space")]
    Full,
    /// The buffer cannot even hold a batch header.
    #[error("buffer of {len} bytes cannot hold a {header}-byte batch header")]
    BufferTooSmall {
        /// Length of the buffer given.
        len: usize,
        /// Length of the batch header.
        header: usize,
    },
    /// Records of one thread must carry strictly increasing global
    /// sequence numbers.
    #[error("global sequence number {next} does not follow {prev}")]
    SeqNotIncreasing {
        /// Sequence number of the previous record in the batch.
        prev: u64,
        /// Sequence number of the rejected record.
        next: u64,
    },
    /// A scattered byte string claims more bytes than its parts hold.
    #[error("scattered data claims {len} bytes but its parts hold only {available}")]
    ScatterShort {
        /// Claimed length.
        len: usize,
        /// Sum of the parts' lengths.
        available: usize,
    },
}

/// Why a batch (or a record inside one) was rejected.
///
/// Offsets count bytes from the start of the batch, header included.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// The input ends before the structure being read does.
    #[error("truncated {what} at offset {offset}: need {needed} bytes, {available} available")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Where it starts.
        offset: usize,
        /// How many bytes it needs.
        needed: u64,
        /// How many bytes were left.
        available: usize,
    },
    /// The batch does not start with the format's magic number.
    #[error("bad batch magic {found:#010x} (expected {expected:#010x})")]
    BadMagic {
        /// Magic found.
        found: u32,
        /// Magic expected.
        expected: u32,
    },
    /// The batch was written by an incompatible format version.
    #[error("unsupported log format version {found} (this build reads version {supported})")]
    UnsupportedVersion {
        /// Version found in the header.
        found: u16,
        /// Version this build reads.
        supported: u16,
    },
    /// Header flags reserved for future versions are set.
    #[error("reserved batch flags {flags:#06x} are set")]
    ReservedFlags {
        /// The flags field.
        flags: u16,
    },
    /// The header declares a payload larger than any writer produces.
    #[error("batch payload of {len} bytes exceeds the limit of {max}")]
    Oversized {
        /// Declared payload length.
        len: u64,
        /// The format's limit.
        max: u64,
    },
    /// The CRC-32 over header and payload does not match.
    #[error(
        "batch checksum mismatch: header has {stored:#010x}, content hashes to {computed:#010x}"
    )]
    Checksum {
        /// CRC stored in the header.
        stored: u32,
        /// CRC of the bytes received.
        computed: u32,
    },
    /// A record starts with a tag this version does not define.
    #[error("unknown record tag {tag:#04x} at offset {offset}")]
    UnknownTag {
        /// The tag byte.
        tag: u8,
        /// Offset of the tag.
        offset: usize,
    },
    /// A varint is longer than ten bytes or overflows 64 bits.
    #[error("malformed varint for {what} at offset {offset}")]
    BadVarint {
        /// The field being read.
        what: &'static str,
        /// Offset of the varint.
        offset: usize,
    },
    /// A field decoded to a value outside its type's range.
    #[error("{what} at offset {offset} is out of range ({value})")]
    OutOfRange {
        /// The field being read.
        what: &'static str,
        /// Offset of the field.
        offset: usize,
        /// The raw decoded value.
        value: u64,
    },
    /// A sequence-number delta overflows 64 bits.
    #[error("global sequence number overflows after {prev}")]
    SeqOverflow {
        /// The last valid sequence number.
        prev: u64,
    },
    /// Global sequence numbers of one thread did not strictly increase.
    #[error("global sequence numbers do not increase: {next} follows {prev}")]
    SeqNotIncreasing {
        /// Earlier sequence number.
        prev: u64,
        /// The offending later one.
        next: u64,
    },
    /// The payload goes on after the declared number of records.
    #[error("{count} trailing bytes after the last record of the batch")]
    TrailingBytes {
        /// How many bytes were left over.
        count: usize,
    },
    /// The batch belongs to a different thread log than expected.
    #[error("batch for thread log {found} found where thread log {expected} was expected")]
    WrongThread {
        /// Log id expected.
        expected: u32,
        /// Log id in the batch header.
        found: u32,
    },
}

/// Errors of the on-disk log directory.
#[derive(Debug, Error)]
pub enum LogError {
    /// An I/O operation on a log file failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A batch in a log file, or one handed to the writer, is invalid.
    #[error("{path} at byte {offset}: {source}")]
    Corrupt {
        /// The log file.
        path: PathBuf,
        /// File offset of the batch.
        offset: u64,
        /// What is wrong with it.
        #[source]
        source: DecodeError,
    },
}
