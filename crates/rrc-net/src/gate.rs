//! The packet gate: the one place every frame between a container and the
//! LAN passes, and therefore the one place that may hold, log or release
//! frames.
//!
//! The gate decides *when* a frame moves (policy); the sinks it is handed
//! move it (mechanism). A plain container uses [`PassThrough`]. Replication
//! installs gates that log inbound frames before delivering them and hold
//! outbound frames until the backup has acknowledged what produced them.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::frame::Frame;

/// Something that delivers frames: the container's TAP or the LAN uplink.
pub trait FrameSink: Send + Sync {
    fn send_frame(&self, frame: &[u8]) -> io::Result<()>;
}

pub trait PacketGate: Send + Sync {
    /// A frame from the LAN addressed to the container.
    fn inbound(&self, frame: Frame<'_>, container: &dyn FrameSink) -> io::Result<()>;
    /// A frame the container sent towards the LAN.
    fn outbound(&self, frame: Frame<'_>, lan: &dyn FrameSink) -> io::Result<()>;
    /// What went through so far.
    fn counters(&self) -> &GateCounters;
}

/// Frames and bytes that crossed a gate in each direction.
#[derive(Debug, Default)]
pub struct GateCounters {
    pub inbound_frames: AtomicU64,
    pub inbound_bytes: AtomicU64,
    pub outbound_frames: AtomicU64,
    pub outbound_bytes: AtomicU64,
}

impl GateCounters {
    pub fn count_inbound(&self, len: usize) {
        self.inbound_frames.fetch_add(1, Ordering::Relaxed);
        self.inbound_bytes.fetch_add(len as u64, Ordering::Relaxed);
    }

    pub fn count_outbound(&self, len: usize) {
        self.outbound_frames.fetch_add(1, Ordering::Relaxed);
        self.outbound_bytes.fetch_add(len as u64, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> [u64; 4] {
        [
            self.inbound_frames.load(Ordering::Relaxed),
            self.inbound_bytes.load(Ordering::Relaxed),
            self.outbound_frames.load(Ordering::Relaxed),
            self.outbound_bytes.load(Ordering::Relaxed),
        ]
    }
}

/// Delivers every frame at once, both ways: an unreplicated container.
#[derive(Debug, Default)]
pub struct PassThrough {
    counters: GateCounters,
}

impl PacketGate for PassThrough {
    fn inbound(&self, frame: Frame<'_>, container: &dyn FrameSink) -> io::Result<()> {
        self.counters.count_inbound(frame.len());
        container.send_frame(frame.bytes())
    }

    fn outbound(&self, frame: Frame<'_>, lan: &dyn FrameSink) -> io::Result<()> {
        self.counters.count_outbound(frame.len());
        lan.send_frame(frame.bytes())
    }

    fn counters(&self) -> &GateCounters {
        &self.counters
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::VNET_HDR_LEN;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<Vec<u8>>>);
    impl FrameSink for Recorder {
        fn send_frame(&self, frame: &[u8]) -> io::Result<()> {
            self.0.lock().unwrap().push(frame.to_vec());
            Ok(())
        }
    }

    #[test]
    fn pass_through_delivers_and_counts() {
        let g = PassThrough::default();
        let tap = Recorder::default();
        let lan = Recorder::default();
        let raw = vec![7u8; VNET_HDR_LEN + 60];
        g.inbound(Frame::new(&raw).unwrap(), &tap).unwrap();
        g.outbound(Frame::new(&raw).unwrap(), &lan).unwrap();
        g.outbound(Frame::new(&raw).unwrap(), &lan).unwrap();
        assert_eq!(tap.0.lock().unwrap().len(), 1);
        assert_eq!(lan.0.lock().unwrap().len(), 2);
        assert_eq!(g.counters().snapshot(), [1, 70, 2, 140]);
    }
}
