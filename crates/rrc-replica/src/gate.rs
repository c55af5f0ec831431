//! The replication gate: the release policy for the frames of a replicated
//! container. Nothing the outside world sees may be lost with the primary,
//! so every outbound frame (acknowledgements included) is held until the
//! backup holds what produced it:
//!
//! - under [`Release::Commit`] (checkpoint-only mode), a checkpoint taken
//!   after the frame, committed by the backup;
//! - under [`Release::LogAck`], the log up to the frame's tag, acknowledged
//!   by the backup (or a committed checkpoint that covers it).
//!
//! In responsive mode the gate also feeds the log ([`LogTap`]): every
//! inbound TCP frame for the service address is logged before it is
//! delivered (an outbound ACK may acknowledge client bytes the program has
//! not read yet: the backup must hold them before that ACK leaves), and
//! every outbound frame is tagged, as it leaves the TAP device, with the
//! log position reached. Whatever the release rule, the gate notes when
//! each frame *could* have left under the log-acknowledgement rule, to
//! measure what the responsive mode costs a reply.
//!
//! Without a backup the gate lets everything through (the container is
//! unprotected, and says so elsewhere). Frames leave in the order they
//! came, whatever releases them.

use std::collections::VecDeque;
use std::io;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use hdrhistogram::Histogram;
use rrc_net::frame::Frame;
use rrc_net::gate::{FrameSink, GateCounters, PacketGate};

use crate::position::LogPosition;

/// Frames held at most (bytes); beyond it the oldest are dropped, as a full
/// queue on a wire would, and TCP resends them.
const MAX_HELD: usize = 256 << 20;

/// When held frames leave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    /// Once a checkpoint taken after the frame is committed by the backup.
    Commit,
    /// Once the backup has acknowledged the log up to the frame's tag, or
    /// a checkpoint covering it is committed.
    LogAck,
}

/// The log's side of the gate, in responsive mode.
pub trait LogTap: Send + Sync {
    /// Appends an inbound frame for the service to the net log (it is
    /// delivered right after); returns its number.
    fn log_inbound(&self, frame: &[u8]) -> u64;
    /// The log position an outbound frame leaving now depends on: the last
    /// record number handed out and the last inbound frame logged.
    fn reached(&self) -> LogPosition;
    /// An outbound frame waits for the log: ship what there is now.
    fn outbound_waiting(&self);
}

struct HeldFrame {
    n: u64,
    tag: LogPosition,
    at: Instant,
    /// It carries TCP payload (a reply, not a bare acknowledgement).
    data: bool,
    bytes: Vec<u8>,
}

/// Delays frames had, or would have had, under the log-acknowledgement
/// rule: from leaving the TAP device to the acknowledgement that covers
/// them, in microseconds.
#[derive(Clone)]
pub struct WouldBe {
    pub frames: Histogram<u64>,
    /// Frames with TCP payload only.
    pub data_frames: Histogram<u64>,
}

impl Default for WouldBe {
    fn default() -> Self {
        let h = || Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
        WouldBe {
            frames: h(),
            data_frames: h(),
        }
    }
}

#[derive(Default)]
struct Held {
    holding: bool,
    /// Another host serves now: nothing leaves any more.
    fenced: bool,
    /// The backup holds a committed checkpoint: from then on the log can
    /// cover frames, and their delays are noted (before, every frame waits
    /// for the first commit whatever the rule).
    noting: bool,
    /// Number the next outbound frame gets.
    next: u64,
    queue: VecDeque<HeldFrame>,
    bytes: usize,
    dropped: u64,
    /// Frames numbered below this have their would-be delay noted.
    noted_to: u64,
    /// The backup's last acknowledgement of the log.
    acked: LogPosition,
    would_be: WouldBe,
}

pub struct ReplicationGate {
    rule: Release,
    counters: GateCounters,
    held: Mutex<Held>,
    lan: OnceLock<Arc<dyn FrameSink>>,
    /// Serializes releases, so frames leave in the order they came.
    releasing: Mutex<()>,
    /// Responsive mode: the log, and the address whose TCP frames it takes.
    log: Option<(Arc<dyn LogTap>, Ipv4Addr)>,
    /// Where each held frame's wait goes when it leaves (seconds).
    holds: OnceLock<prometheus_client::metrics::histogram::Histogram>,
    /// A reply was held for want of any record (said once).
    unrecorded: std::sync::atomic::AtomicBool,
}

impl ReplicationGate {
    /// A gate releasing by `rule`; with `log`, inbound TCP frames for the
    /// service address are logged and outbound frames tagged.
    pub fn new(rule: Release, log: Option<(Arc<dyn LogTap>, Ipv4Addr)>) -> Arc<ReplicationGate> {
        Arc::new(ReplicationGate {
            rule,
            counters: GateCounters::default(),
            held: Mutex::default(),
            lan: OnceLock::new(),
            releasing: Mutex::new(()),
            log,
            holds: OnceLock::new(),
            unrecorded: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Whether the log can stand for frame `f` at all: a reply (TCP
    /// payload) made before the program recorded anything means that the
    /// program is not recorded (librrc did not load: a preload path it
    /// cannot see, a program that clears LD_PRELOAD), and the backup could
    /// not reproduce it from the log. It waits for a committed checkpoint,
    /// said loudly once.
    fn log_stands_for(&self, f: &HeldFrame) -> bool {
        if !f.data || f.tag.records > 0 {
            return true;
        }
        if !self
            .unrecorded
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::warn!("a reply left the program before anything was recorded");
            eprintln!(
                "rrc: WARNING: the program sent a reply before anything of it was recorded: it is not recorded (librrc not loaded?); such replies wait for committed checkpoints"
            );
        }
        false
    }

    /// Notes how long each held frame waited in `h` from now on.
    pub fn observe_holds(&self, h: prometheus_client::metrics::histogram::Histogram) {
        let _ = self.holds.set(h);
    }

    /// Where released frames go: the container's uplink.
    pub fn attach(&self, lan: Arc<dyn FrameSink>) {
        let _ = self.lan.set(lan);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        crate::lock(&self.held)
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

    /// Whether outbound frames are held.
    pub fn is_holding(&self) -> bool {
        self.lock().holding
    }

    /// Stops holding: every held frame goes out now, and later ones at once
    /// (the backup is gone). Not once fenced.
    pub fn open(&self) {
        {
            let mut h = self.lock();
            if h.fenced {
                return;
            }
            h.holding = false;
            h.noting = false;
        }
        self.release(|_| true);
    }

    /// Another host serves the service now: every held frame is dropped,
    /// and every later one, for good.
    pub fn fence(&self) {
        let _order = crate::lock(&self.releasing);
        let mut h = self.lock();
        h.fenced = true;
        h.holding = true;
        h.dropped += h.queue.len() as u64;
        h.queue.clear();
        h.bytes = 0;
    }

    /// The backup committed the first checkpoint of a series: delays under
    /// the log rule are noted from the frames after it on.
    pub fn protected(&self) {
        let mut h = self.lock();
        h.noting = true;
        h.noted_to = h.noted_to.max(h.next);
    }

    /// The backup's last acknowledgement of the log.
    pub fn acked(&self) -> LogPosition {
        self.lock().acked
    }

    /// Frames and bytes held now.
    pub fn held(&self) -> (usize, usize) {
        let h = self.lock();
        (h.queue.len(), h.bytes)
    }

    /// The delays noted so far under the log-acknowledgement rule.
    pub fn would_be(&self) -> WouldBe {
        self.lock().would_be.clone()
    }

    /// The backup committed a checkpoint whose mark was `mark`: every
    /// frame numbered below it may leave.
    pub fn committed(&self, mark: u64) {
        self.release(|f| f.n < mark);
    }

    /// The backup holds the log up to `pos`.
    pub fn log_acked(&self, pos: LogPosition) {
        {
            let mut h = self.lock();
            h.acked = h.acked.max(pos);
            let now = Instant::now();
            let acked = h.acked;
            let Held {
                queue,
                noted_to,
                would_be,
                noting,
                ..
            } = &mut *h;
            let from = *noted_to;
            for f in queue.iter().filter(|f| f.n >= from) {
                if !acked.covers(&f.tag) {
                    break;
                }
                note(*noting, would_be, f, now);
                *noted_to = f.n + 1;
            }
        }
        if self.rule == Release::LogAck {
            self.release(|f| pos.covers(&f.tag) && self.log_stands_for(f));
        }
    }

    /// Sends the held frames at the front of the queue that `may_go`
    /// lets go, in order, stopping at the first it keeps.
    fn release(&self, may_go: impl Fn(&HeldFrame) -> bool) {
        let _order = crate::lock(&self.releasing);
        let out: Vec<Vec<u8>> = {
            let mut h = self.lock();
            let now = Instant::now();
            let mut out = Vec::new();
            while h.queue.front().is_some_and(&may_go) {
                let f = h.queue.pop_front().expect("front exists");
                h.bytes -= f.bytes.len();
                if f.n >= h.noted_to {
                    // Released before the log's acknowledgement came: that
                    // is when it would have left under that rule too.
                    tracing::debug!(
                        tag_records = f.tag.records,
                        tag_net = f.tag.net,
                        acked_records = h.acked.records,
                        acked_net = h.acked.net,
                        held_us = now.saturating_duration_since(f.at).as_micros() as u64,
                        "a frame left before the log covering it was acknowledged"
                    );
                    note(h.noting, &mut h.would_be, &f, now);
                    h.noted_to = f.n + 1;
                }
                if let Some(hist) = self.holds.get() {
                    hist.observe(now.saturating_duration_since(f.at).as_secs_f64());
                }
                out.push(f.bytes);
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

    /// Sends a frame that need not wait, behind whatever a release under
    /// way has taken off the queue: those frames came before it, and must
    /// not be overtaken between leaving the queue and reaching the wire.
    fn send_now(&self, frame: &[u8], lan: &dyn FrameSink) -> io::Result<()> {
        let _order = crate::lock(&self.releasing);
        lan.send_frame(frame)
    }
}

fn note(noting: bool, w: &mut WouldBe, f: &HeldFrame, now: Instant) {
    if !noting {
        return;
    }
    let us = now.saturating_duration_since(f.at).as_micros() as u64;
    let us = us.clamp(1, 60_000_000);
    let _ = w.frames.record(us);
    if f.data {
        let _ = w.data_frames.record(us);
    }
}

impl PacketGate for ReplicationGate {
    fn inbound(&self, frame: Frame<'_>, container: &dyn FrameSink) -> io::Result<()> {
        self.counters.count_inbound(frame.len());
        if let Some((log, service)) = &self.log
            && frame.tcp().is_some_and(|t| t.dst.ip() == service)
        {
            // Logged before the container's kernel can acknowledge it.
            log.log_inbound(frame.bytes());
        }
        container.send_frame(frame.bytes())
    }

    fn outbound(&self, frame: Frame<'_>, lan: &dyn FrameSink) -> io::Result<()> {
        self.counters.count_outbound(frame.len());
        let tag = match &self.log {
            Some((log, _)) => log.reached(),
            None => LogPosition::default(),
        };
        let mut h = self.lock();
        if h.fenced {
            return Ok(());
        }
        if !h.holding {
            drop(h);
            return self.send_now(frame.bytes(), lan);
        }
        let n = h.next;
        h.next += 1;
        let f = HeldFrame {
            n,
            tag,
            at: Instant::now(),
            data: frame.tcp().is_some_and(|t| t.payload_len > 0),
            bytes: frame.bytes().to_vec(),
        };
        // Nothing new in the log since the last acknowledgement (a bare
        // ACK, a retransmission): the log rule lets it go at once, behind
        // the frames before it.
        let covered = h.noted_to == n && h.acked.covers(&tag);
        if covered {
            note(h.noting, &mut h.would_be, &f, f.at);
            h.noted_to = n + 1;
            if self.rule == Release::LogAck && h.queue.is_empty() && self.log_stands_for(&f) {
                drop(h);
                return self.send_now(frame.bytes(), lan);
            }
        }
        h.bytes += frame.len();
        h.queue.push_back(f);
        while h.bytes > MAX_HELD {
            let f = h.queue.pop_front().expect("over the limit means not empty");
            h.bytes -= f.bytes.len();
            h.noted_to = h.noted_to.max(f.n + 1);
            h.dropped += 1;
            if h.dropped.is_power_of_two() {
                tracing::warn!(dropped = h.dropped, "held frames over the limit dropped");
            }
        }
        drop(h);
        if let Some((log, _)) = &self.log {
            log.outbound_waiting();
        }
        Ok(())
    }

    fn counters(&self) -> &GateCounters {
        &self.counters
    }
}

/// Percentiles of a histogram of microseconds, for reports.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct DelaySummary {
    pub count: u64,
    pub avg_us: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

impl DelaySummary {
    pub fn of(h: &Histogram<u64>) -> DelaySummary {
        if h.is_empty() {
            return DelaySummary::default();
        }
        DelaySummary {
            count: h.len(),
            avg_us: h.mean(),
            p50_us: h.value_at_quantile(0.5) as f64,
            p99_us: h.value_at_quantile(0.99) as f64,
            max_us: h.max() as f64,
        }
    }
}

/// How long frames have waited in the gate: for the periodic report.
pub fn describe(d: &DelaySummary) -> String {
    let ms = |us: f64| us / 1e3;
    format!(
        "{} frames, avg {:.3} ms, p50 {:.3} ms, p99 {:.3} ms",
        d.count,
        ms(d.avg_us),
        ms(d.p50_us),
        ms(d.p99_us)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[derive(Default)]
    struct Wire(Mutex<Vec<Vec<u8>>>);

    impl FrameSink for Wire {
        fn send_frame(&self, frame: &[u8]) -> io::Result<()> {
            self.0.lock().unwrap().push(frame.to_vec());
            Ok(())
        }
    }

    impl Wire {
        fn tags(&self) -> Vec<u8> {
            self.0.lock().unwrap().iter().map(|f| f[59]).collect()
        }
    }

    fn frame(tag: u8) -> Vec<u8> {
        let mut f = vec![0u8; 70];
        f[10..16].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        f[16..22].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
        f[22] = 0x08;
        f[59] = tag;
        f
    }

    #[test]
    fn holds_outbound_until_committed_in_order() {
        let gate = ReplicationGate::new(Release::Commit, None);
        let wire = Arc::new(Wire::default());
        gate.attach(wire.clone());
        let direct = Wire::default();
        // Open: straight through.
        gate.outbound(Frame::new(&frame(1)).unwrap(), &direct)
            .unwrap();
        assert_eq!(direct.tags(), vec![1]);
        gate.hold();
        gate.protected();
        gate.outbound(Frame::new(&frame(2)).unwrap(), &direct)
            .unwrap();
        gate.outbound(Frame::new(&frame(3)).unwrap(), &direct)
            .unwrap();
        let mark = gate.mark();
        gate.outbound(Frame::new(&frame(4)).unwrap(), &direct)
            .unwrap();
        assert_eq!(direct.tags(), vec![1]);
        assert!(wire.tags().is_empty());
        gate.committed(mark);
        assert_eq!(wire.tags(), vec![2, 3]);
        // Inbound is never held.
        let tap = Wire::default();
        gate.inbound(Frame::new(&frame(9)).unwrap(), &tap).unwrap();
        assert_eq!(tap.tags(), vec![9]);
        // Opening flushes the rest.
        gate.open();
        assert_eq!(wire.tags(), vec![2, 3, 4]);
        assert_eq!(gate.held(), (0, 0));
        assert_eq!(gate.would_be().frames.len(), 3);
    }

    #[test]
    fn a_fenced_gate_lets_nothing_out_again() {
        let gate = ReplicationGate::new(Release::Commit, None);
        let wire = Arc::new(Wire::default());
        gate.attach(wire.clone());
        let direct = Wire::default();
        gate.hold();
        gate.outbound(Frame::new(&frame(1)).unwrap(), &direct)
            .unwrap();
        gate.fence();
        gate.outbound(Frame::new(&frame(2)).unwrap(), &direct)
            .unwrap();
        // Neither a commit nor opening (as the container stops) frees them.
        gate.committed(u64::MAX);
        gate.open();
        gate.outbound(Frame::new(&frame(3)).unwrap(), &direct)
            .unwrap();
        assert!(wire.tags().is_empty());
        assert!(direct.tags().is_empty());
        assert_eq!(gate.held(), (0, 0));
    }

    /// A log whose position the test moves.
    #[derive(Default)]
    struct FakeLog {
        records: AtomicU64,
        net: AtomicU64,
        kicks: AtomicU64,
    }

    impl LogTap for FakeLog {
        fn log_inbound(&self, _frame: &[u8]) -> u64 {
            self.net.fetch_add(1, Ordering::SeqCst) + 1
        }
        fn reached(&self) -> LogPosition {
            LogPosition {
                records: self.records.load(Ordering::SeqCst),
                net: self.net.load(Ordering::SeqCst),
            }
        }
        fn outbound_waiting(&self) {
            self.kicks.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A TCP frame to or from 10.0.0.100.
    fn tcp(to_service: bool, tag: u8) -> Vec<u8> {
        let mut f = frame(tag);
        let ip = [
            0x45, 0, 0, 46, 0, 0, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 100,
        ];
        f[24..44].copy_from_slice(&ip);
        if !to_service {
            f[36..40].copy_from_slice(&[10, 0, 0, 100]);
            f[40..44].copy_from_slice(&[10, 0, 0, 1]);
        }
        f[44 + 12] = 5 << 4;
        f[44 + 13] = 0x10;
        f
    }

    /// A gate of the responsive mode for 10.0.0.100 releasing by `rule`,
    /// holding frames for a protected service; its log and its LAN.
    fn holding_with_log(rule: Release) -> (Arc<ReplicationGate>, Arc<FakeLog>, Arc<Wire>) {
        let log = Arc::new(FakeLog::default());
        let gate = ReplicationGate::new(
            rule,
            Some((
                log.clone() as Arc<dyn LogTap>,
                "10.0.0.100".parse().unwrap(),
            )),
        );
        let wire = Arc::new(Wire::default());
        gate.attach(wire.clone());
        gate.hold();
        gate.protected();
        (gate, log, wire)
    }

    #[test]
    fn releases_at_log_acknowledgement_in_order_and_logs_inbound_first() {
        let (gate, log, wire) = holding_with_log(Release::LogAck);
        let tap = Wire::default();
        // Inbound to the service is logged; anything else is not.
        gate.inbound(Frame::new(&tcp(true, 1)).unwrap(), &tap)
            .unwrap();
        gate.inbound(Frame::new(&tcp(false, 2)).unwrap(), &tap)
            .unwrap();
        gate.inbound(Frame::new(&frame(3)).unwrap(), &tap).unwrap();
        assert_eq!(log.net.load(Ordering::SeqCst), 1);
        assert_eq!(tap.tags(), vec![1, 2, 3]);
        log.records.store(10, Ordering::SeqCst);
        gate.outbound(Frame::new(&tcp(false, 4)).unwrap(), &*wire)
            .unwrap();
        log.records.store(12, Ordering::SeqCst);
        gate.outbound(Frame::new(&tcp(false, 5)).unwrap(), &*wire)
            .unwrap();
        assert_eq!(log.kicks.load(Ordering::SeqCst), 2);
        assert!(wire.tags().is_empty());
        // Records acknowledged, but not the inbound frame the first may
        // acknowledge: nothing leaves.
        gate.log_acked(LogPosition {
            records: 12,
            net: 0,
        });
        assert!(wire.tags().is_empty());
        gate.log_acked(LogPosition {
            records: 11,
            net: 1,
        });
        assert_eq!(wire.tags(), vec![4]);
        gate.log_acked(LogPosition {
            records: 12,
            net: 1,
        });
        assert_eq!(wire.tags(), vec![4, 5]);
        assert_eq!(gate.would_be().frames.len(), 2);
    }

    #[test]
    fn a_reply_made_before_anything_was_recorded_waits_for_a_commit() {
        // An unrecorded program (librrc not loaded): its log has no record
        // to stand for the reply, whatever is acknowledged.
        let (gate, _log, wire) = holding_with_log(Release::LogAck);
        gate.inbound(Frame::new(&tcp(true, 1)).unwrap(), &Wire::default())
            .unwrap();
        let mark_before = gate.mark();
        gate.outbound(Frame::new(&tcp(false, 2)).unwrap(), &*wire)
            .unwrap();
        gate.log_acked(LogPosition { records: 0, net: 1 });
        assert!(wire.tags().is_empty());
        gate.committed(mark_before);
        assert!(wire.tags().is_empty());
        let mark = gate.mark();
        gate.committed(mark);
        assert_eq!(wire.tags(), vec![2]);
    }

    #[test]
    fn under_commit_release_notes_when_the_log_would_have_released() {
        let (gate, log, wire) = holding_with_log(Release::Commit);
        log.records.store(5, Ordering::SeqCst);
        gate.outbound(Frame::new(&tcp(false, 1)).unwrap(), &*wire)
            .unwrap();
        let mark = gate.mark();
        gate.log_acked(LogPosition { records: 5, net: 0 });
        assert!(wire.tags().is_empty());
        assert_eq!(gate.would_be().frames.len(), 1);
        gate.committed(mark);
        assert_eq!(wire.tags(), vec![1]);
        // Noted once only.
        assert_eq!(gate.would_be().frames.len(), 1);
    }
}
