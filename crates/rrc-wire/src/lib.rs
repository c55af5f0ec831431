//! The replication link between `rrc primary` and `rrc backup`.
//!
//! This crate is a trust boundary: the backup restores and runs, as root,
//! whatever checkpoint it receives. Everything that arrives is therefore
//! authenticated ([`secure`]), integrity-checked and strictly ordered
//! ([`frame`]), parsed without trusting any length it carries ([`message`]),
//! and written to disk so that an incomplete delta can never be mistaken for
//! a committed one ([`stage`]).

pub mod error;
pub mod frame;
pub mod message;
pub mod secure;
pub mod stage;
#[cfg(test)]
mod test_dir;

pub use error::{Result, WireError};
pub use frame::{DEFAULT_MAX_PAYLOAD, Decoder, Encoder};
pub use message::{Message, MessageType, Role};
pub use secure::{
    Identified, Identity, Key, PublicKey, SecureConfig, SecureReader, SecureStream, SecureWriter,
};
pub use stage::Stage;
