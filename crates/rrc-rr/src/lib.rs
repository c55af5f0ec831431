//! Record/replay foundations for rrc.
//!
//! A server's nondeterminism is captured per thread by a preload library
//! that interposes libc, drained by the agent, and fed back on failover.
//! This crate holds the two pieces every side of that pipeline shares:
//!
//! * [`log`]: the versioned, compact, checksummed batch format the events
//!   are written in, an allocation-free [`log::BatchWriter`] for the
//!   recording hooks, a validating [`log::BatchReader`], and the on-disk
//!   log directory ([`log::LogWriter`], [`log::LogReader`]).
//! * [`ring`]: a single-producer single-consumer byte ring that lives in a
//!   `memfd` mapped into both the application and the agent, and
//!   [`ring::RingSet`], one such mapping holding a ring per thread slot.
//! * [`interface`]: what rrc and librrc exchange besides the log: the
//!   environment variable naming the rings, the versioned replay
//!   configuration, the capture file of a replay.
//! * [`agent`]: the rrc process's side of a recording, draining every
//!   thread's ring into the log directory.
//!
//! The byte layouts are specified in the crate's `README.md`.

pub mod agent;
pub mod interface;
pub mod log;
pub mod ring;
