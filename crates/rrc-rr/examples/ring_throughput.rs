//! Measures ring throughput between two threads for 64-byte records.
//!
//! `cargo run --release -p rrc-rr --example ring_throughput [messages]`

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use rrc_rr::ring::{SharedRing, new_eventfd, wait_eventfd};

const RECORD: usize = 64;

fn run(n: u64, capacity: u64, with_wake: bool) -> Duration {
    let ring = SharedRing::create(capacity).expect("create ring");
    let efd = new_eventfd().expect("eventfd");
    let mut p = ring.producer().expect("producer");
    let mut c = ring.consumer().expect("consumer");
    if with_wake {
        p.set_wake_fd(Some(efd.as_fd()));
    }
    let start = Instant::now();
    std::thread::scope(|s| {
        s.spawn(move || {
            let mut msg = [0u8; RECORD];
            for i in 0..n {
                msg[..8].copy_from_slice(&i.to_le_bytes());
                while !p.try_push(&msg) {
                    std::hint::spin_loop();
                }
            }
        });
        let mut got = 0u64;
        let mut scratch = Vec::with_capacity(RECORD);
        while got < n {
            let k = c.drain(&mut scratch, |_| {}).expect("drain");
            got += k as u64;
            if k == 0 {
                if with_wake {
                    if c.ready_to_sleep() {
                        wait_eventfd(efd.as_fd(), Some(Duration::from_millis(100))).expect("wait");
                    }
                } else {
                    std::hint::spin_loop();
                }
            }
        }
    });
    start.elapsed()
}

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000_000);
    for (capacity, wake) in [(1 << 16, false), (1 << 20, false), (1 << 20, true)] {
        let t = run(n, capacity, wake);
        let secs = t.as_secs_f64();
        println!(
            "capacity {:>8} B, consumer {:<8}: {:>6.2} M msgs/s, {:>7.1} MB/s payload ({n} x {RECORD} B in {:.3} s)",
            capacity,
            if wake { "eventfd" } else { "spinning" },
            n as f64 / secs / 1e6,
            (n * RECORD as u64) as f64 / secs / 1e6,
            secs
        );
    }
}
