//! Workloads and measurement for rrc: protocol clients of the real servers,
//! latency statistics, the lab sessions that benchmarks and the demo run in,
//! and the benchmarks themselves.

pub mod ckpt;
pub mod criu;
pub mod detection;
pub mod failover;
pub mod failover_bench;
pub mod net;
pub mod pause;
pub mod plot;
pub mod record_bench;
pub mod redis_benchmark;
pub mod replay_bench;
pub mod resp;
pub mod session;
pub mod sockets;
pub mod stalls;
pub mod stats;
pub mod verify;
