use std::path::PathBuf;

/// Everything that can go wrong on the replication link.
///
/// The variants are split finely on purpose: the primary and the backup react
/// differently to "the peer does not hold our key" (an operator mistake, never
/// retried blindly), "the bytes were damaged" (drop the connection) and "the
/// peer broke the protocol" (refuse the delta, keep the last checkpoint).
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("I/O error on the replication link: {0}")]
    Io(#[from] std::io::Error),

    #[error("bad frame magic {0:02x?} (expected \"RW\"): not an rrc replication stream")]
    BadMagic([u8; 2]),

    #[error(
        "the peer speaks wire protocol version {0}, this build speaks version {ours}: \
         run the same rrc release on the primary and the backup",
        ours = crate::frame::VERSION
    )]
    UnsupportedVersion(u8),

    #[error("unknown message type {0}")]
    UnknownType(u8),

    #[error("{what} is {len} bytes, over the limit of {max}")]
    TooLarge {
        what: &'static str,
        len: u64,
        max: u64,
    },

    #[error("frame CRC mismatch: frame says {expected:#010x}, content hashes to {actual:#010x}")]
    CrcMismatch { expected: u32, actual: u32 },

    #[error("frame sequence number {got}, expected {expected} (frame lost, replayed or reordered)")]
    Sequence { expected: u64, got: u64 },

    #[error("malformed {msg} payload: {reason}")]
    Malformed { msg: &'static str, reason: String },

    #[error("refusing to send invalid {msg} message: {reason}")]
    Invalid { msg: &'static str, reason: String },

    #[error("the stream already failed earlier and cannot be used any more")]
    Poisoned,

    /// The other half of a split connection failed; the connection is over
    /// for both halves.
    #[error("the connection failed on its {half} side ({reason}) and cannot be used any more")]
    OtherHalfFailed { half: &'static str, reason: String },

    #[error("the peer closed the connection")]
    Closed,

    #[error("timed out waiting for the peer")]
    Timeout,

    #[error("authentication failed: {0}")]
    Authentication(String),

    #[error("handshake failed: {0}")]
    Handshake(String),

    #[error("decryption failed: the data was altered in transit or the stream is out of sync")]
    Decrypt,

    #[error("noise protocol error: {0}")]
    Noise(snow::Error),

    #[error("checkpoint delta rejected: {0}")]
    Stage(String),

    #[error("key file {} does not exist (create one with the key generation command and copy it to both hosts)", path.display())]
    KeyMissing { path: PathBuf },

    #[error("key file {} is malformed: {reason}", path.display())]
    KeyFormat { path: PathBuf, reason: String },

    #[error("key file {} has mode {mode:04o}, readable by group or others: run `chmod 600 {}`", path.display(), path.display())]
    KeyPermissions { path: PathBuf, mode: u32 },

    #[error("key file {} belongs to uid {owner}, not to this user (uid {user}): whoever owns it can read or replace the key", path.display())]
    KeyOwner {
        path: PathBuf,
        owner: u32,
        user: u32,
    },

    #[error("key file {} already exists; refusing to overwrite it", path.display())]
    KeyExists { path: PathBuf },
}

impl WireError {
    pub(crate) fn malformed(msg: &'static str, reason: impl Into<String>) -> Self {
        WireError::Malformed {
            msg,
            reason: reason.into(),
        }
    }

    pub(crate) fn invalid(msg: &'static str, reason: impl Into<String>) -> Self {
        WireError::Invalid {
            msg,
            reason: reason.into(),
        }
    }
}

pub type Result<T, E = WireError> = std::result::Result<T, E>;
