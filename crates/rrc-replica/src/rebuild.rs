//! Rebuilding a replicated program's connections at a takeover.
//!
//! The backup restores the last committed checkpoint and replays the log
//! since; at the end of the log the program is where the primary was, but
//! its connections are as the checkpoint saved them (or placeholders, for
//! those accepted since). Each connection still open is rebuilt from:
//!
//! - the checkpoint's state and queues (or, for a connection accepted
//!   since, its handshake in the net log: the client's SYN and the
//!   acknowledgement of ours);
//! - the client's segments in the net log since the checkpoint: what it
//!   sent (advancing the receive side), what it acknowledged (trimming the
//!   send queue), its window and timestamps;
//! - the log: what the program read (taken off the front of what was
//!   received), which connections it accepted;
//! - the replay's capture: what the program wrote (appended to the send
//!   queue), which connections it closed.
//!
//! Every fact is checked against the others: what the program read must
//! be what the client sent, the client cannot have acknowledged more than
//! the program wrote. A connection that does not check out fails the
//! whole plan: the takeover then falls back to the checkpoint rather than
//! risk a wrong byte.
//!
//! Everything here is computation on what was read from disk; building
//! the sockets and putting them in place is [`crate::takeover`]'s.

use std::collections::BTreeMap;
use std::net::{SocketAddr, SocketAddrV4};
use std::path::Path;

use rrc_ckpt::edit::SavedConnection;
use rrc_ckpt::restore::Connection;
use rrc_ckpt::tcp::{
    TCP_CLOSE_WAIT, TCP_ESTABLISHED, TCPI_OPT_SACK, TCPI_OPT_TIMESTAMPS, TCPI_OPT_WSCALE, TcpState,
};
use rrc_net::frame::{Frame, TcpFacts, TcpSegment};
use rrc_rr::interface::CaptureRecord;
use rrc_rr::log::{Event, LogReader, thread_log_ids};

#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error("reading the log: {0}")]
    Log(#[from] rrc_rr::log::LogError),
    #[error("connection on descriptor {fd} ({peer}): {what}")]
    Mismatch { fd: i32, peer: String, what: String },
    #[error("descriptor {fd}: {what}")]
    Inconsistent { fd: i32, what: String },
}

/// What the log says the program did with a connection's descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogUse {
    /// It accepted a connection from `peer` at `fd`.
    Accept { fd: i32, peer: Option<SocketAddrV4> },
    /// It read these bytes from `fd`.
    Read { fd: i32, bytes: Vec<u8> },
    /// The kernel took `len` bytes it wrote to `fd`.
    Wrote { fd: i32, len: u64 },
}

impl LogUse {
    fn fd(&self) -> i32 {
        match self {
            LogUse::Accept { fd, .. } | LogUse::Read { fd, .. } | LogUse::Wrote { fd, .. } => *fd,
        }
    }
}

/// The program's uses of descriptors in the log of `dir` from record
/// `from` on, in the recorded order.
pub fn log_uses(dir: &Path, from: u64) -> Result<Vec<LogUse>, RebuildError> {
    let mut uses: Vec<(u64, LogUse)> = Vec::new();
    for id in thread_log_ids(dir)? {
        let mut r = LogReader::open(dir, id)?;
        while let Some(rec) = r.next_record()? {
            if rec.seq < from {
                continue;
            }
            let bytes = |d: &rrc_rr::log::Bytes<'_>| d.as_flat().unwrap_or_default().to_vec();
            let u = match &rec.event {
                Event::Accept { ret, addr, .. } if *ret >= 0 => LogUse::Accept {
                    fd: *ret as i32,
                    peer: sockaddr_v4(addr),
                },
                Event::Read { fd, ret, data, .. } | Event::Recv { fd, ret, data, .. }
                    if *ret > 0 =>
                {
                    LogUse::Read {
                        fd: *fd,
                        bytes: bytes(data),
                    }
                }
                Event::Write { fd, ret, .. } if *ret > 0 => LogUse::Wrote {
                    fd: *fd,
                    len: *ret as u64,
                },
                _ => continue,
            };
            uses.push((rec.seq, u));
        }
    }
    uses.sort_by_key(|(seq, _)| *seq);
    Ok(uses.into_iter().map(|(_, u)| u).collect())
}

/// An IPv4 `struct sockaddr_in` as accept filled it in.
fn sockaddr_v4(b: &[u8]) -> Option<SocketAddrV4> {
    if b.len() < 8 || u16::from_ne_bytes([b[0], b[1]]) != libc::AF_INET as u16 {
        return None;
    }
    Some(SocketAddrV4::new(
        std::net::Ipv4Addr::new(b[4], b[5], b[6], b[7]),
        u16::from_be_bytes([b[2], b[3]]),
    ))
}

/// What this host's TCP would have chosen for a connection it accepted
/// (the primary's is the same kind of host).
#[derive(Debug, Clone, Copy)]
pub struct HostTcp {
    /// The window scale it offers.
    pub rcv_wscale: u8,
    /// The MSS it offers.
    pub mss: u16,
    /// How far ahead of what the client has seen our timestamps start
    /// (milliseconds: the primary ran on after the client's last echo).
    pub timestamp_lead: u32,
}

impl HostTcp {
    /// The window scale Linux offers given its largest receive buffer
    /// (`net.ipv4.tcp_rmem`'s third value, `net.core.rmem_max`).
    pub fn wscale_for(rmem_max: u64) -> u8 {
        let log2 = 63 - rmem_max.max(1).leading_zeros() as i64;
        (log2 - 15).clamp(0, 14) as u8
    }
}

/// One connection rebuilt: where it goes and what it is.
#[derive(Debug, Clone)]
pub struct Rebuilt {
    pub fd: i32,
    pub conn: Connection,
    /// Accepted since the checkpoint.
    pub accepted: bool,
}

/// The connections to put in place, and what the log did to the others.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub rebuilt: Vec<Rebuilt>,
    /// Connections closed by the program during the log.
    pub closed: usize,
    /// Clients whose handshake completed during the log but whom the
    /// program had not accepted by its end: the restored listener does
    /// not know them, and their next segment is answered with a reset.
    pub unaccepted: usize,
    /// Bytes of the clients' the program had not read yet, and of its
    /// own the clients had not acknowledged yet, over every connection.
    pub unread: usize,
    pub unacknowledged: usize,
}

/// One life of a descriptor as a connection.
#[derive(Debug, Default)]
struct Instance {
    /// The checkpoint's connection (index into `saved`), if not accepted.
    saved: Option<usize>,
    /// For one accepted since: the client.
    peer: Option<SocketAddrV4>,
    read: Vec<u8>,
    /// Of `read`, bytes read before the checkpoint (the log has the read
    /// after it): the restored connection no longer held them.
    read_earlier: usize,
    written: Vec<u8>,
    /// Bytes written before the checkpoint (the log has the write after
    /// it): the restored connection held them already.
    written_earlier: u64,
    /// What the log says the kernel took of what it wrote.
    logged_written: u64,
    /// What a thread parked at the end of the log is writing to it.
    pending: Vec<u8>,
}

/// Works out every connection open at the end of the log. `pending`: what
/// threads parked at the end of the log are writing, by descriptor (their
/// writes are done once the connections are in place: the bytes go in).
pub fn plan(
    saved: &[SavedConnection],
    uses: &[LogUse],
    capture: &[CaptureRecord],
    pending: &[(i32, Vec<u8>)],
    frames: &[Vec<u8>],
    host: &HostTcp,
) -> Result<Plan, RebuildError> {
    let mut lives: BTreeMap<i32, Vec<Instance>> = BTreeMap::new();
    for (i, s) in saved.iter().enumerate() {
        lives.entry(s.fd).or_default().push(Instance {
            saved: Some(i),
            ..Instance::default()
        });
    }
    for u in uses {
        match u {
            LogUse::Accept { fd, peer } => lives.entry(*fd).or_default().push(Instance {
                peer: *peer,
                ..Instance::default()
            }),
            LogUse::Read { fd, bytes } => {
                if let Some(i) = lives.get_mut(fd).and_then(|v| v.last_mut()) {
                    i.read.extend_from_slice(bytes);
                }
            }
            LogUse::Wrote { fd, len } => {
                if let Some(i) = lives.get_mut(fd).and_then(|v| v.last_mut()) {
                    i.logged_written += len;
                }
            }
        }
    }
    // Captured output and closes, life by life.
    let mut current: BTreeMap<i32, usize> = BTreeMap::new();
    for rec in capture {
        let fd = rec.fd() as i32;
        let at = current.entry(fd).or_insert(0);
        let Some(life) = lives.get_mut(&fd).and_then(|v| v.get_mut(*at)) else {
            return Err(RebuildError::Inconsistent {
                fd,
                what: "the replay wrote to or closed a connection the log does not have".into(),
            });
        };
        match rec {
            CaptureRecord::Written {
                bytes,
                earlier: false,
                ..
            } => life.written.extend_from_slice(bytes),
            CaptureRecord::Written {
                bytes,
                earlier: true,
                ..
            } => life.written_earlier += bytes.len() as u64,
            CaptureRecord::ReadEarlier { len, .. } => life.read_earlier += *len as usize,
            CaptureRecord::Closed { .. } => *at += 1,
        }
    }
    for (fd, bytes) in pending {
        let at = current.get(fd).copied().unwrap_or(0);
        let Some(life) = lives.get_mut(fd).and_then(|v| v.get_mut(at)) else {
            return Err(RebuildError::Inconsistent {
                fd: *fd,
                what: "a thread is writing to a connection the log does not have".into(),
            });
        };
        life.pending.extend_from_slice(bytes);
    }
    let segments: Vec<TcpSegment<'_>> = frames
        .iter()
        .filter_map(|f| Frame::new(f)?.tcp_segment())
        .collect();
    let mut out = Plan {
        unaccepted: unaccepted(saved, &lives, &segments),
        ..Plan::default()
    };
    for (fd, v) in lives {
        let closed = current.get(&fd).copied().unwrap_or(0);
        out.closed += closed;
        if v.len() > closed + 1 {
            return Err(RebuildError::Inconsistent {
                fd,
                what: format!(
                    "{} connections at this number, but only {closed} closed",
                    v.len()
                ),
            });
        }
        let Some(life) = v.into_iter().nth(closed) else {
            continue;
        };
        let r = match life.saved {
            Some(i) => carry(fd, &saved[i], &life, &segments, host)?,
            None => accept(fd, &life, &segments, host)?,
        };
        out.unread += r.conn.rcvq.len();
        out.unacknowledged += r.conn.sndq.len();
        out.rebuilt.push(r);
    }
    Ok(out)
}

/// The checkpoint's connections that were used after it (the program
/// read or wrote, or the client sent a segment): a takeover that falls
/// back to the checkpoint must reset them, as their clients may have seen
/// replies the checkpoint does not hold. Open file ids.
pub fn active_since(saved: &[SavedConnection], uses: &[LogUse], frames: &[Vec<u8>]) -> Vec<usize> {
    let used: std::collections::BTreeSet<i32> = uses.iter().map(LogUse::fd).collect();
    let heard: Vec<TcpFacts> = frames.iter().filter_map(|f| Frame::new(f)?.tcp()).collect();
    saved
        .iter()
        .filter(|s| {
            // A descriptor reused by an accept during the log was this
            // connection's first: it was closed, so it was used.
            used.contains(&s.fd)
                || heard
                    .iter()
                    .any(|f| SocketAddr::V4(f.src) == s.peer && SocketAddr::V4(f.dst) == s.local)
        })
        .map(|s| s.file_id)
        .collect()
}

/// Clients that completed a handshake in the net log (their SYN, then an
/// acknowledgement) but are neither a checkpoint's connection nor one the
/// log accepted.
fn unaccepted(
    saved: &[SavedConnection],
    lives: &BTreeMap<i32, Vec<Instance>>,
    segments: &[TcpSegment<'_>],
) -> usize {
    let known: std::collections::BTreeSet<SocketAddrV4> = saved
        .iter()
        .filter_map(|s| match s.peer {
            SocketAddr::V4(a) => Some(a),
            SocketAddr::V6(_) => None,
        })
        .chain(lives.values().flatten().filter_map(|i| i.peer))
        .collect();
    let mut handshakes = std::collections::BTreeSet::new();
    let mut opened = std::collections::BTreeSet::new();
    for s in segments {
        let f = &s.facts;
        if f.flags & (TcpFacts::SYN | TcpFacts::ACK) == TcpFacts::SYN {
            opened.insert(f.src);
        } else if f.flags & TcpFacts::ACK != 0 && opened.contains(&f.src) {
            handshakes.insert(f.src);
        }
    }
    handshakes.difference(&known).count()
}

/// `a` comes after `b` in sequence space.
fn after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// The client's side of one connection in the net log.
struct ClientView {
    /// Bytes it sent from the receive side's start, in order, without
    /// holes; and whether its FIN follows them.
    data: Vec<u8>,
    fin: bool,
    reset: bool,
    /// Its latest acknowledgement, window (as sent) and sequence number.
    ack: Option<u32>,
    window: Option<(u16, u32)>,
    /// The latest timestamp of ours it echoed.
    echoed: Option<u32>,
}

fn client_view(segs: &[&TcpSegment<'_>], start: u32) -> ClientView {
    let mut v = ClientView {
        data: Vec::new(),
        fin: false,
        reset: false,
        ack: None,
        window: None,
        echoed: None,
    };
    for s in segs {
        let f = &s.facts;
        if f.flags & TcpFacts::RST != 0 {
            v.reset = true;
        }
        if f.flags & TcpFacts::ACK != 0 && f.flags & TcpFacts::SYN == 0 {
            if v.ack.is_none_or(|a| after(f.ack, a)) {
                v.ack = Some(f.ack);
            }
            v.window = Some((s.window, f.seq));
        }
        if let Some((_, ecr)) = s.timestamps
            && v.echoed.is_none_or(|e| after(ecr, e))
        {
            v.echoed = Some(ecr);
        }
    }
    // In order, without holes: passes until nothing more fits (segments
    // may arrive out of order, or twice).
    loop {
        let mut grew = false;
        for s in segs {
            let next = start.wrapping_add(v.data.len() as u32);
            let f = &s.facts;
            let len = s.payload.len() as u32;
            let end = f.seq.wrapping_add(len);
            if len > 0 && !after(f.seq, next) && after(end, next) {
                let skip = next.wrapping_sub(f.seq) as usize;
                v.data.extend_from_slice(&s.payload[skip..]);
                grew = true;
            }
        }
        if !grew {
            break;
        }
    }
    let next = start.wrapping_add(v.data.len() as u32);
    v.fin = segs.iter().any(|s| {
        s.facts.flags & TcpFacts::FIN != 0
            && s.facts.seq.wrapping_add(s.payload.len() as u32) == next
    });
    v
}

/// The client's segments of the connection `local` <- `peer`.
fn from_client<'s>(
    segments: &'s [TcpSegment<'s>],
    local: SocketAddrV4,
    peer: SocketAddrV4,
) -> Vec<&'s TcpSegment<'s>> {
    segments
        .iter()
        .filter(|s| s.facts.src == peer && s.facts.dst == local)
        .collect()
}

fn v4(fd: i32, a: SocketAddr) -> Result<SocketAddrV4, RebuildError> {
    match a {
        SocketAddr::V4(a) => Ok(a),
        SocketAddr::V6(_) => Err(RebuildError::Inconsistent {
            fd,
            what: "IPv6 connections cannot be rebuilt yet".into(),
        }),
    }
}

/// The receive and send sides of a connection once the log is applied:
/// what it held unread at the start (before sequence number `rcv_start`)
/// plus what the client sent since, less what the program read; what was
/// unacknowledged at the start (from sequence number `snd_una`) plus what
/// the program wrote since, less what the client acknowledged.
struct Sides {
    rcvq: Vec<u8>,
    rcv_seq: u32,
    sndq: Vec<u8>,
    snd_seq: u32,
}

fn sides(
    fd: i32,
    peer: SocketAddrV4,
    life: &Instance,
    view: &ClientView,
    (unread, rcv_start): (&[u8], u32),
    (unacked, snd_una): (&[u8], u32),
) -> Result<Sides, RebuildError> {
    let bad = |what: String| RebuildError::Mismatch {
        fd,
        peer: peer.to_string(),
        what,
    };
    if view.reset {
        return Err(bad("the client reset it during the log".into()));
    }
    let mut received = unread.to_vec();
    received.extend_from_slice(&view.data);
    let mut data_len = view.data.len();
    let replayed = life.written.len() as u64 + life.written_earlier;
    if replayed != life.logged_written {
        return Err(bad(format!(
            "the replay wrote {replayed} bytes where the primary wrote {}",
            life.logged_written
        )));
    }
    let Some(read) = life.read.get(life.read_earlier..) else {
        return Err(bad("it read less than it read before the checkpoint".into()));
    };
    if read.len() > received.len() && read.starts_with(&received) && !view.fin {
        // The segments that carried the rest are not in the backup's net
        // log yet (the log and the net log are acknowledged apart): the
        // log has their bytes, as the primary's kernel took them.
        data_len += read.len() - received.len();
        received = read.to_vec();
    }
    if !received.starts_with(read) {
        return Err(bad(format!(
            "the program read {} bytes the client did not send (of {} it had)",
            read.len(),
            received.len()
        )));
    }
    let mut sent = unacked.to_vec();
    sent.extend_from_slice(&life.written);
    sent.extend_from_slice(&life.pending);
    let snd_seq = snd_una.wrapping_add(sent.len() as u32);
    let acked = match view.ack {
        Some(a) if after(a, snd_seq) => {
            return Err(bad(format!(
                "the client acknowledged {} bytes beyond what the replay wrote \
                 ({} unacknowledged at the checkpoint, {} written since, {} pending; \
                 the program read {} of the {} bytes the client sent; the client's last: {:?})",
                a.wrapping_sub(snd_seq),
                unacked.len(),
                life.written.len(),
                life.pending.len(),
                read.len(),
                received.len(),
                String::from_utf8_lossy(&received[received.len().saturating_sub(40)..]),
            )));
        }
        Some(a) if after(a, snd_una) => a.wrapping_sub(snd_una) as usize,
        _ => 0,
    };
    Ok(Sides {
        rcvq: received[read.len()..].to_vec(),
        rcv_seq: rcv_start.wrapping_add(data_len as u32),
        sndq: sent[acked..].to_vec(),
        snd_seq,
    })
}

/// A connection the checkpoint saved, carried past the log.
fn carry(
    fd: i32,
    s: &SavedConnection,
    life: &Instance,
    segments: &[TcpSegment<'_>],
    host: &HostTcp,
) -> Result<Rebuilt, RebuildError> {
    let (local, peer) = (v4(fd, s.local)?, v4(fd, s.peer)?);
    let st = &s.state;
    if st.state != TCP_ESTABLISHED {
        return Err(RebuildError::Mismatch {
            fd,
            peer: peer.to_string(),
            what: format!(
                "it was {} at the checkpoint",
                rrc_ckpt::tcp::state_name(st.state)
            ),
        });
    }
    let segs = from_client(segments, local, peer);
    let view = client_view(&segs, st.rcv_seq);
    let snd_una = st.snd_seq.wrapping_sub(st.sndq_len);
    let sd = sides(
        fd,
        peer,
        life,
        &view,
        (&s.rcvq, st.rcv_seq),
        (&s.sndq, snd_una),
    )?;
    let mut window = st.window;
    if let Some((w, seq)) = view.window {
        let wnd = u32::from(w) << st.snd_wscale;
        window[0] = if after(seq, sd.rcv_seq) {
            sd.rcv_seq
        } else {
            seq
        };
        window[1] = wnd;
        window[2] = window[2].max(wnd);
    }
    window[4] = sd.rcv_seq;
    let timestamp = view
        .echoed
        .filter(|e| after(*e, st.timestamp))
        .unwrap_or(st.timestamp)
        .wrapping_add(host.timestamp_lead);
    let state = finish_state(st.clone(), &sd, view.fin, timestamp, window);
    Ok(Rebuilt {
        fd,
        accepted: false,
        conn: Connection {
            local: s.local,
            peer: s.peer,
            state,
            sndq: sd.sndq,
            rcvq: sd.rcvq,
            options: s.options.clone(),
        },
    })
}

fn finish_state(
    mut st: TcpState,
    sd: &Sides,
    fin: bool,
    timestamp: u32,
    window: [u32; 5],
) -> TcpState {
    st.state = if fin { TCP_CLOSE_WAIT } else { TCP_ESTABLISHED };
    st.snd_seq = sd.snd_seq;
    st.rcv_seq = sd.rcv_seq.wrapping_add(u32::from(fin));
    st.sndq_len = sd.sndq.len() as u32;
    // All of it goes out as soon as the connection is live: what the
    // client already has it drops as a duplicate.
    st.unsent_len = st.sndq_len;
    st.rcvq_len = sd.rcvq.len() as u32;
    st.timestamp = timestamp;
    st.window = window;
    st
}

/// A connection the program accepted during the log, rebuilt from its
/// handshake.
fn accept(
    fd: i32,
    life: &Instance,
    segments: &[TcpSegment<'_>],
    host: &HostTcp,
) -> Result<Rebuilt, RebuildError> {
    let Some(peer) = life.peer else {
        return Err(RebuildError::Inconsistent {
            fd,
            what: "accepted from an address that is not IPv4".into(),
        });
    };
    let bad = |what: &str| RebuildError::Mismatch {
        fd,
        peer: peer.to_string(),
        what: what.into(),
    };
    let syn = segments
        .iter()
        .rev()
        .find(|s| {
            s.facts.src == peer && s.facts.flags & (TcpFacts::SYN | TcpFacts::ACK) == TcpFacts::SYN
        })
        .ok_or_else(|| bad("its SYN is not in the net log (it came before the checkpoint)"))?;
    let local = syn.facts.dst;
    let client_isn = syn.facts.seq;
    let segs: Vec<&TcpSegment<'_>> = from_client(segments, local, peer)
        .into_iter()
        .filter(|s| s.facts.flags & TcpFacts::SYN == 0)
        .filter(|s| !after(client_isn, s.facts.seq))
        .collect();
    // The handshake's last segment acknowledges our SYN.
    let server_isn = segs
        .iter()
        .find(|s| s.facts.flags & TcpFacts::ACK != 0)
        .map(|s| s.facts.ack.wrapping_sub(1))
        .ok_or_else(|| bad("the handshake's acknowledgement is not in the net log"))?;
    let start = client_isn.wrapping_add(1);
    let view = client_view(&segs, start);
    let sd = sides(
        fd,
        peer,
        life,
        &view,
        (&[], start),
        (&[], server_isn.wrapping_add(1)),
    )?;
    let mut options = 0u8;
    let snd_wscale = syn.wscale.unwrap_or(0).min(14);
    if syn.wscale.is_some() {
        options |= TCPI_OPT_WSCALE;
    }
    if syn.sack_permitted {
        options |= TCPI_OPT_SACK;
    }
    if syn.timestamps.is_some() {
        options |= TCPI_OPT_TIMESTAMPS;
    }
    let rcv_wscale = if syn.wscale.is_some() {
        host.rcv_wscale
    } else {
        0
    };
    let (w, seq) = view.window.unwrap_or((syn.window, start));
    let snd_wnd = u32::from(w) << snd_wscale;
    let window = [
        if after(seq, sd.rcv_seq) {
            sd.rcv_seq
        } else {
            seq
        },
        snd_wnd,
        snd_wnd,
        65_535,
        sd.rcv_seq,
    ];
    let timestamp = view.echoed.unwrap_or(0).wrapping_add(host.timestamp_lead);
    let base = TcpState {
        state: TCP_ESTABLISHED,
        snd_seq: 0,
        rcv_seq: 0,
        sndq_len: 0,
        unsent_len: 0,
        rcvq_len: 0,
        mss: u32::from(syn.mss.unwrap_or(536).min(host.mss)),
        options,
        snd_wscale,
        rcv_wscale,
        timestamp: 0,
        window: [0; 5],
    };
    let state = finish_state(base, &sd, view.fin, timestamp, window);
    Ok(Rebuilt {
        fd,
        accepted: true,
        conn: Connection {
            local: SocketAddr::V4(local),
            peer: SocketAddr::V4(peer),
            state,
            sndq: sd.sndq,
            rcvq: sd.rcvq,
            options: Vec::new(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    const SERVER: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 2), 6379);
    const CLIENT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 9), 40000);
    const HOST: HostTcp = HostTcp {
        rcv_wscale: 7,
        mss: 1460,
        timestamp_lead: 1000,
    };

    /// A frame from the client: flags, seq, ack, window, options, payload.
    fn frame(flags: u8, seq: u32, ack: u32, opts: &[u8], payload: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; rrc_net::frame::VNET_HDR_LEN];
        b.extend_from_slice(&[2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 9, 0x08, 0x00]);
        let doff = 20 + opts.len();
        let total = 20 + doff + payload.len();
        let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 6, 0, 0];
        ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        ip.extend_from_slice(&CLIENT.ip().octets());
        ip.extend_from_slice(&SERVER.ip().octets());
        b.extend_from_slice(&ip);
        let mut tcp = vec![0u8; 20];
        tcp[0..2].copy_from_slice(&CLIENT.port().to_be_bytes());
        tcp[2..4].copy_from_slice(&SERVER.port().to_be_bytes());
        tcp[4..8].copy_from_slice(&seq.to_be_bytes());
        tcp[8..12].copy_from_slice(&ack.to_be_bytes());
        tcp[12] = ((doff / 4) as u8) << 4;
        tcp[13] = flags;
        tcp[14..16].copy_from_slice(&100u16.to_be_bytes());
        b.extend_from_slice(&tcp);
        b.extend_from_slice(opts);
        b.extend_from_slice(payload);
        b
    }

    const ACK: u8 = TcpFacts::ACK;

    /// [`super::plan`] with no thread parked at a write.
    fn plan(
        saved: &[SavedConnection],
        uses: &[LogUse],
        capture: &[CaptureRecord],
        frames: &[Vec<u8>],
        host: &HostTcp,
    ) -> Result<Plan, RebuildError> {
        super::plan(saved, uses, capture, &[], frames, host)
    }

    #[test]
    fn a_write_a_thread_is_parked_at_goes_in_the_connection() {
        // The primary sent the reply of a write whose record the backup
        // never got; the client acknowledged it. The replayed thread is
        // parked at that write: its bytes are the reply.
        let s = saved(b"", b"");
        let frames = vec![frame(ACK, 900, 5003, &[], b"")];
        let e = plan(std::slice::from_ref(&s), &[], &[], &frames, &HOST).unwrap_err();
        assert!(
            e.to_string().contains("beyond what the replay wrote"),
            "{e}"
        );
        let pending = [(7, b"+OK".to_vec())];
        let p = super::plan(&[s], &[], &[], &pending, &frames, &HOST).unwrap();
        let c = &p.rebuilt[0].conn;
        assert!(c.sndq.is_empty());
        assert_eq!(c.state.snd_seq, 5003);
    }

    fn saved(rcvq: &[u8], sndq: &[u8]) -> SavedConnection {
        SavedConnection {
            fd: 7,
            file_id: 3,
            flags: 2,
            local: SocketAddr::V4(SERVER),
            peer: SocketAddr::V4(CLIENT),
            state: TcpState {
                state: TCP_ESTABLISHED,
                snd_seq: 5000,
                rcv_seq: 900,
                sndq_len: sndq.len() as u32,
                unsent_len: 0,
                rcvq_len: rcvq.len() as u32,
                mss: 1448,
                options: TCPI_OPT_WSCALE | TCPI_OPT_TIMESTAMPS,
                snd_wscale: 2,
                rcv_wscale: 7,
                timestamp: 70,
                window: [890, 400, 400, 65_000, 900],
            },
            options: vec![rrc_ckpt::image::SockOpt(
                6,
                1,
                rrc_ckpt::image::OptValue::Int(1),
            )],
            sndq: sndq.to_vec(),
            rcvq: rcvq.to_vec(),
        }
    }

    fn written(fd: u32, b: &[u8]) -> CaptureRecord {
        CaptureRecord::Written {
            fd,
            bytes: b.to_vec(),
            earlier: false,
        }
    }

    #[test]
    fn a_saved_connection_is_carried_past_the_log() {
        // At the checkpoint: "ab" unread, "XY" unacknowledged (seq 4998).
        let s = saved(b"ab", b"XY");
        // Since: the client sent "cd" then "ef" (once twice, once out of
        // order), acknowledged X, echoed timestamp 90.
        let ts = [8, 10, 0, 0, 0, 1, 0, 0, 0, 90, 1, 1];
        let frames = vec![
            frame(ACK, 902, 4999, &ts, b"ef"),
            frame(ACK, 900, 4999, &ts, b"cd"),
            frame(ACK, 900, 4999, &ts, b"cd"),
        ];
        // The program read "abc", wrote "Z".
        let uses = vec![
            LogUse::Read {
                fd: 7,
                bytes: b"abc".to_vec(),
            },
            LogUse::Wrote { fd: 7, len: 1 },
        ];
        let p = plan(&[s], &uses, &[written(7, b"Z")], &frames, &HOST).unwrap();
        assert_eq!(p.rebuilt.len(), 1);
        let c = &p.rebuilt[0].conn;
        assert_eq!(c.rcvq, b"def");
        assert_eq!(c.state.rcv_seq, 904);
        assert_eq!(c.sndq, b"YZ");
        assert_eq!(c.state.snd_seq, 5001);
        assert_eq!((c.state.sndq_len, c.state.unsent_len), (2, 2));
        assert_eq!(c.state.timestamp, 1090);
        // The client's window (100, scaled by 2), its last sequence.
        assert_eq!(c.state.window[..2], [900, 400]);
        assert_eq!(c.state.window[4], 904);
        assert_eq!((p.unread, p.unacknowledged), (3, 2));
    }

    #[test]
    fn what_does_not_check_out_fails_the_plan() {
        let s = saved(b"", b"");
        // The program read bytes other than the client sent.
        let uses = vec![LogUse::Read {
            fd: 7,
            bytes: b"x".to_vec(),
        }];
        let sent = [frame(ACK, 900, 5000, &[], b"y")];
        let e = plan(std::slice::from_ref(&s), &uses, &[], &sent, &HOST).unwrap_err();
        assert!(e.to_string().contains("did not send"), "{e}");
        // The client acknowledged beyond what the replay wrote.
        let frames = vec![frame(ACK, 900, 5002, &[], b"")];
        let wrote = [LogUse::Wrote { fd: 7, len: 1 }];
        let e = plan(
            std::slice::from_ref(&s),
            &wrote,
            &[written(7, b"a")],
            &frames,
            &HOST,
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("beyond what the replay wrote"),
            "{e}"
        );
        // The replay wrote other than the primary did.
        let e = plan(
            std::slice::from_ref(&s),
            &wrote,
            &[written(7, b"ab")],
            &[],
            &HOST,
        )
        .unwrap_err();
        assert!(e.to_string().contains("where the primary wrote 1"), "{e}");
        // The replay wrote to a descriptor the log has no connection at.
        let e = plan(&[s], &[], &[written(8, b"a")], &[], &HOST).unwrap_err();
        assert!(matches!(e, RebuildError::Inconsistent { fd: 8, .. }), "{e}");
    }

    #[test]
    fn reads_ahead_of_the_net_log_and_calls_across_the_checkpoint_are_accounted_for() {
        // The program read "abcd": "a" before the checkpoint (the log has
        // the read after it), "bc" from the net log, "d" from a segment
        // the backup does not have yet. It wrote "XY" before the
        // checkpoint (already in the saved queue) and "Z" after.
        let s = saved(b"", b"XY");
        let frames = vec![frame(ACK, 900, 4998, &[], b"bc")];
        let uses = vec![
            LogUse::Read {
                fd: 7,
                bytes: b"a".to_vec(),
            },
            LogUse::Read {
                fd: 7,
                bytes: b"bcd".to_vec(),
            },
            LogUse::Wrote { fd: 7, len: 3 },
        ];
        let capture = [
            CaptureRecord::ReadEarlier { fd: 7, len: 1 },
            CaptureRecord::Written {
                fd: 7,
                bytes: b"XY".to_vec(),
                earlier: true,
            },
            written(7, b"Z"),
        ];
        let p = plan(&[s], &uses, &capture, &frames, &HOST).unwrap();
        let c = &p.rebuilt[0].conn;
        assert_eq!(c.state.rcv_seq, 903);
        assert!(c.rcvq.is_empty());
        assert_eq!(c.sndq, b"XYZ");
        assert_eq!(c.state.snd_seq, 5001);
    }

    #[test]
    fn closed_connections_are_counted_not_rebuilt() {
        let s = saved(b"", b"");
        let p = plan(
            &[s],
            &[LogUse::Wrote { fd: 7, len: 3 }],
            &[written(7, b"bye"), CaptureRecord::Closed { fd: 7 }],
            &[],
            &HOST,
        )
        .unwrap();
        assert_eq!((p.rebuilt.len(), p.closed), (0, 1));
    }

    #[test]
    fn a_connection_accepted_since_is_rebuilt_from_its_handshake() {
        let syn_opts = [
            2, 4, 5, 0xb4, 1, 3, 3, 6, 4, 2, 8, 10, 0, 0, 0, 5, 0, 0, 0, 0,
        ];
        let ts = [1, 1, 8, 10, 0, 0, 0, 6, 0, 0, 0, 44];
        let frames = vec![
            frame(TcpFacts::SYN, 100, 0, &syn_opts, b""),
            frame(ACK, 101, 7001, &ts, b""),
            frame(ACK | 0x08, 101, 7001, &ts, b"PING\r\n"),
            frame(ACK, 107, 7008, &ts, b""),
        ];
        let uses = vec![
            LogUse::Accept {
                fd: 9,
                peer: Some(CLIENT),
            },
            LogUse::Read {
                fd: 9,
                bytes: b"PING\r\n".to_vec(),
            },
            LogUse::Wrote { fd: 9, len: 7 },
        ];
        let p = plan(&[], &uses, &[written(9, b"+PONG\r\n")], &frames, &HOST).unwrap();
        let r = &p.rebuilt[0];
        assert!(r.accepted);
        let st = &r.conn.state;
        assert_eq!((st.rcv_seq, st.snd_seq), (107, 7008));
        assert!(r.conn.sndq.is_empty() && r.conn.rcvq.is_empty());
        assert_eq!((st.mss, st.snd_wscale, st.rcv_wscale), (1460, 6, 7));
        assert_eq!(
            st.options,
            TCPI_OPT_WSCALE | TCPI_OPT_SACK | TCPI_OPT_TIMESTAMPS
        );
        assert_eq!(st.timestamp, 1044);
        assert_eq!(r.conn.local, SocketAddr::V4(SERVER));
        assert_eq!(p.unaccepted, 0);
        // Not accepted by the end of the log: counted.
        let p = plan(&[], &[], &[], &frames, &HOST).unwrap();
        assert_eq!((p.rebuilt.len(), p.unaccepted), (0, 1));
        // Without its SYN (it came before the checkpoint) it cannot be.
        let e = plan(&[], &uses, &[], &frames[1..], &HOST).unwrap_err();
        assert!(e.to_string().contains("SYN"), "{e}");
    }

    #[test]
    fn a_client_fin_leaves_the_connection_half_closed() {
        let s = saved(b"", b"");
        let frames = vec![frame(ACK | TcpFacts::FIN, 900, 5000, &[], b"q")];
        let p = plan(&[s], &[], &[], &frames, &HOST).unwrap();
        let st = &p.rebuilt[0].conn.state;
        assert_eq!((st.state, st.rcv_seq), (TCP_CLOSE_WAIT, 902));
        assert_eq!(p.rebuilt[0].conn.rcvq, b"q");
    }

    #[test]
    fn connections_used_since_the_checkpoint_are_the_active_ones() {
        let a = saved(b"", b"");
        let mut b = saved(b"", b"");
        (b.fd, b.file_id) = (8, 4);
        b.peer = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 9), 40001));
        let mut c = b.clone();
        (c.fd, c.file_id) = (10, 5);
        c.peer = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 9), 40002));
        let all = [a, b, c];
        // Nothing since: none.
        assert!(active_since(&all, &[], &[]).is_empty());
        // A segment of the first's client, a write to the second.
        let frames = vec![frame(ACK, 900, 5000, &[], b"")];
        let uses = [LogUse::Wrote { fd: 8, len: 2 }];
        assert_eq!(active_since(&all, &uses, &frames), vec![3, 4]);
    }

    #[test]
    fn window_scale_follows_the_largest_buffer() {
        assert_eq!(HostTcp::wscale_for(6_291_456), 7);
        assert_eq!(HostTcp::wscale_for(212_992), 2);
        assert_eq!(HostTcp::wscale_for(1), 0);
        assert_eq!(HostTcp::wscale_for(u64::MAX), 14);
    }
}
