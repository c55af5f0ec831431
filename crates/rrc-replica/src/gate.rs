//! The commit gate: the replication policy for frames. Inbound frames
//! reach the container at once; every outbound frame (acknowledgements
//! included) waits until the backup has committed a checkpoint taken after
//! the frame was produced, so that nothing the outside world sees can be
//! lost with the primary. Without a backup the gate lets everything through
//! (the container is unprotected, and says so elsewhere).

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex, OnceLock};

use rrc_net::frame::Frame;
use rrc_net::gate::{FrameSink, GateCounters, PacketGate};

/// Frames held at most (bytes); beyond it the oldest are dropped, as a full
/// queue on a wire would, and TCP resends them.
const MAX_HELD: usize = 256 << 20;

#[derive(Default)]
struct Held {
    holding: bool,
    /// Number the next outbound frame gets.
    next: u64,
    queue: VecDeque<(u64, Vec<u8>)>,
    bytes: usize,
    dropped: u64,
}

#[derive(Default)]
pub struct CommitGate {
    counters: GateCounters,
    held: Mutex<Held>,
    lan: OnceLock<Arc<dyn FrameSink>>,
    /// Serializes releases, so frames leave in the order they came.
    releasing: Mutex<()>,
}

impl CommitGate {
    pub fn new() -> Arc<CommitGate> {
        Arc::new(CommitGate::default())
    }

    /// Where released frames go: the container's uplink.
    pub fn attach(&self, lan: Arc<dyn FrameSink>) {
        let _ = self.lan.set(lan);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The number the next outbound frame will get: with the container's
    /// frames held back at the moment a checkpoint is taken, every frame
    /// numbered below it was produced before the checkpoint.
    pub fn mark(&self) -> u64 {
        self.lock().next
    }

    /// Starts holding outbound frames (a backup is there).
    pub fn hold(&self) {
        self.lock().holding = true;
    }

    /// Stops holding: every held frame goes out now, and later ones at once
    /// (the backup is gone).
    pub fn open(&self) {
        self.lock().holding = false;
        self.release_before(u64::MAX);
    }

    /// Frames held now.
    pub fn held(&self) -> (usize, usize) {
        let h = self.lock();
        (h.queue.len(), h.bytes)
    }

    /// Sends every held frame numbered below `boundary` (the mark of a
    /// checkpoint the backup has committed).
    pub fn release_before(&self, boundary: u64) {
        let _order = self.releasing.lock().unwrap_or_else(|p| p.into_inner());
        let out: Vec<Vec<u8>> = {
            let mut h = self.lock();
            let mut out = Vec::new();
            while h.queue.front().is_some_and(|(n, _)| *n < boundary) {
                let (_, f) = h.queue.pop_front().expect("front exists");
                h.bytes -= f.len();
                out.push(f);
            }
            out
        };
        if let Some(lan) = self.lan.get() {
            for f in out {
                // A frame the wire would lose; TCP resends it.
                if let Err(e) = lan.send_frame(&f) {
                    tracing::debug!(error = %e, "a released frame was lost");
                }
            }
        }
    }
}

impl PacketGate for CommitGate {
    fn inbound(&self, frame: Frame<'_>, container: &dyn FrameSink) -> io::Result<()> {
        self.counters.count_inbound(frame.len());
        container.send_frame(frame.bytes())
    }

    fn outbound(&self, frame: Frame<'_>, lan: &dyn FrameSink) -> io::Result<()> {
        self.counters.count_outbound(frame.len());
        let mut h = self.lock();
        if !h.holding {
            drop(h);
            return lan.send_frame(frame.bytes());
        }
        let n = h.next;
        h.next += 1;
        h.bytes += frame.len();
        h.queue.push_back((n, frame.bytes().to_vec()));
        while h.bytes > MAX_HELD {
            let (_, f) = h.queue.pop_front().expect("over the limit means not empty");
            h.bytes -= f.len();
            h.dropped += 1;
            if h.dropped.is_power_of_two() {
                tracing::warn!(dropped = h.dropped, "held frames over the limit dropped");
            }
        }
        Ok(())
    }

    fn counters(&self) -> &GateCounters {
        &self.counters
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Wire(Mutex<Vec<Vec<u8>>>);

    impl FrameSink for Wire {
        fn send_frame(&self, frame: &[u8]) -> io::Result<()> {
            self.0.lock().unwrap().push(frame.to_vec());
            Ok(())
        }
    }

    fn frame(tag: u8) -> Vec<u8> {
        let mut f = vec![0u8; 60];
        f[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
        f[12] = 0x08;
        f[59] = tag;
        f
    }

    #[test]
    fn holds_outbound_until_released_in_order() {
        let gate = CommitGate::new();
        let wire = Arc::new(Wire::default());
        gate.attach(wire.clone());
        let direct = Wire::default();
        // Open: straight through.
        gate.outbound(Frame::new(&frame(1)).unwrap(), &direct)
            .unwrap();
        assert_eq!(direct.0.lock().unwrap().len(), 1);
        gate.hold();
        gate.outbound(Frame::new(&frame(2)).unwrap(), &direct)
            .unwrap();
        gate.outbound(Frame::new(&frame(3)).unwrap(), &direct)
            .unwrap();
        let boundary = gate.mark();
        gate.outbound(Frame::new(&frame(4)).unwrap(), &direct)
            .unwrap();
        assert_eq!(direct.0.lock().unwrap().len(), 1);
        assert!(wire.0.lock().unwrap().is_empty());
        gate.release_before(boundary);
        let sent: Vec<u8> = wire.0.lock().unwrap().iter().map(|f| f[59]).collect();
        assert_eq!(sent, vec![2, 3]);
        // Inbound is never held.
        let tap = Wire::default();
        gate.inbound(Frame::new(&frame(9)).unwrap(), &tap).unwrap();
        assert_eq!(tap.0.lock().unwrap().len(), 1);
        // Opening flushes the rest.
        gate.open();
        let sent: Vec<u8> = wire.0.lock().unwrap().iter().map(|f| f[59]).collect();
        assert_eq!(sent, vec![2, 3, 4]);
        assert_eq!(gate.held(), (0, 0));
    }
}
