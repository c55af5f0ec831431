//! The messages exchanged between `rrc primary` and `rrc backup`, and their
//! payload encoding.
//!
//! The encoding is written by hand rather than derived so that decoding never
//! allocates more than the bytes actually present: every length read from the
//! wire is checked against what remains of the payload before anything is
//! reserved for it. Integers are little endian. Strings carry a length prefix
//! (u8 for names, u16 for free-text reasons) and must be UTF-8. Byte strings
//! (chunk data, log data, network frames) carry a u32 length. Optional
//! values are a tag byte, 0 for absent and 1 for present, followed by the value.
//! There is exactly one encoding of each message, so a decoder that accepts a
//! payload and an encoder that re-encodes the result agree byte for byte.

use crate::error::{Result, WireError};

/// Longest node name, series name or file name, in bytes.
pub const MAX_NAME_LEN: usize = 255;

/// Longest free-text reason (NeedFull, BackupError, Bye), in bytes. Reasons end up
/// in logs on the other host, so they are bounded well below a frame.
pub const MAX_REASON_LEN: usize = 4096;

/// Longest inbound network frame a NetLog may carry, in bytes: a 64 KiB IP
/// packet with the offload and link-layer headers in front of it, rounded
/// up. Anything longer is not a frame the primary can have received, so the
/// decoder refuses it rather than holding an arbitrarily long one.
pub const MAX_NET_FRAME_LEN: usize = 65_600;

/// Which end of the replication link a peer claims to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Primary,
    Backup,
}

impl Role {
    fn to_wire(self) -> u8 {
        match self {
            Role::Primary => 1,
            Role::Backup => 2,
        }
    }

    fn from_wire(b: u8) -> Option<Role> {
        match b {
            1 => Some(Role::Primary),
            2 => Some(Role::Backup),
            _ => None,
        }
    }
}

/// The type byte of a frame. The numbers are part of the wire protocol and
/// must never be reused for a different message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MessageType {
    Hello = 1,
    Welcome = 2,
    DeltaBegin = 3,
    FileChunk = 4,
    DeltaEnd = 5,
    Committed = 6,
    // 7 was Refused, which nothing ever sent; protocol version 2 removed it.
    // The number is retired: the decoder rejects it as unknown, and it must
    // never be given to another message, so that a number means the same
    // message in every version and code written for one can never take
    // another's payload for its own.
    Heartbeat = 8,
    HeartbeatAck = 9,
    NeedFull = 10,
    Bye = 11,
    Log = 12,
    NetLog = 13,
    LogAck = 14,
    BackupError = 15,
}

impl MessageType {
    pub const ALL: [MessageType; 14] = [
        MessageType::Hello,
        MessageType::Welcome,
        MessageType::DeltaBegin,
        MessageType::FileChunk,
        MessageType::DeltaEnd,
        MessageType::Committed,
        MessageType::Heartbeat,
        MessageType::HeartbeatAck,
        MessageType::NeedFull,
        MessageType::Bye,
        MessageType::Log,
        MessageType::NetLog,
        MessageType::LogAck,
        MessageType::BackupError,
    ];

    pub fn from_u8(b: u8) -> Option<MessageType> {
        MessageType::ALL.into_iter().find(|t| *t as u8 == b)
    }

    pub fn as_u8(self) -> u8 {
        self as u8
    }

    pub fn name(self) -> &'static str {
        match self {
            MessageType::Hello => "Hello",
            MessageType::Welcome => "Welcome",
            MessageType::DeltaBegin => "DeltaBegin",
            MessageType::FileChunk => "FileChunk",
            MessageType::DeltaEnd => "DeltaEnd",
            MessageType::Committed => "Committed",
            MessageType::Heartbeat => "Heartbeat",
            MessageType::HeartbeatAck => "HeartbeatAck",
            MessageType::NeedFull => "NeedFull",
            MessageType::Bye => "Bye",
            MessageType::Log => "Log",
            MessageType::NetLog => "NetLog",
            MessageType::LogAck => "LogAck",
            MessageType::BackupError => "BackupError",
        }
    }
}

/// One message on the replication link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// First message of each side after the secure handshake.
    Hello {
        role: Role,
        node: String,
        /// The replicated service (the container's name).
        service: String,
        /// The arbiter's term the primary serves under, if it has an
        /// arbiter: a backup claims the next one before it takes over.
        term: Option<u64>,
    },
    /// The backup's answer to Hello.
    Welcome {
        node: String,
    },
    DeltaBegin {
        series: String,
        epoch: u64,
        parent: Option<u64>,
        files: u32,
        total_bytes: u64,
    },
    FileChunk {
        epoch: u64,
        name: String,
        offset: u64,
        data: Vec<u8>,
    },
    DeltaEnd {
        epoch: u64,
        files: u32,
        total_bytes: u64,
    },
    /// Backup to primary: the epoch is durable under its final name.
    Committed {
        epoch: u64,
    },
    Heartbeat {
        sent_unix_ns: u64,
    },
    HeartbeatAck {
        echo_unix_ns: u64,
    },
    /// Backup to primary: the next checkpoint must be a full one.
    NeedFull {
        reason: String,
    },
    Bye {
        reason: String,
    },
    /// Primary to backup: record batches of the event log, concatenated.
    /// Their format belongs to the log; here they are only bytes.
    Log {
        data: Vec<u8>,
    },
    /// Primary to backup: inbound network frames, numbered `first`,
    /// `first + 1`, ... in order.
    NetLog {
        first: u64,
        frames: Vec<Vec<u8>>,
    },
    /// Backup to primary: every log record numbered up to `records` and
    /// every net-log frame numbered up to `net` is held by the backup.
    LogAck {
        records: u64,
        net: u64,
    },
    /// Backup to primary: the backup could not store what it was sent, by
    /// its own fault (a full disk, say). The primary must send a full
    /// checkpoint or report itself unprotected.
    BackupError {
        reason: String,
    },
}

/// Checks that `name` can be used as a single path component inside a
/// staging directory without escaping it or aliasing another entry.
pub fn check_file_name(name: &str) -> std::result::Result<(), &'static str> {
    if name.is_empty() {
        return Err("file name is empty");
    }
    if name.len() > MAX_NAME_LEN {
        return Err("file name is longer than 255 bytes");
    }
    if name == "." || name == ".." {
        return Err("file name is \".\" or \"..\"");
    }
    if name.contains('/') {
        return Err("file name contains '/'");
    }
    if name.contains('\0') {
        return Err("file name contains a NUL byte");
    }
    Ok(())
}

impl Message {
    pub fn message_type(&self) -> MessageType {
        match self {
            Message::Hello { .. } => MessageType::Hello,
            Message::Welcome { .. } => MessageType::Welcome,
            Message::DeltaBegin { .. } => MessageType::DeltaBegin,
            Message::FileChunk { .. } => MessageType::FileChunk,
            Message::DeltaEnd { .. } => MessageType::DeltaEnd,
            Message::Committed { .. } => MessageType::Committed,
            Message::Heartbeat { .. } => MessageType::Heartbeat,
            Message::HeartbeatAck { .. } => MessageType::HeartbeatAck,
            Message::NeedFull { .. } => MessageType::NeedFull,
            Message::Bye { .. } => MessageType::Bye,
            Message::Log { .. } => MessageType::Log,
            Message::NetLog { .. } => MessageType::NetLog,
            Message::LogAck { .. } => MessageType::LogAck,
            Message::BackupError { .. } => MessageType::BackupError,
        }
    }

    /// Appends the payload encoding of `self` to `out`.
    ///
    /// Messages that the receiving side would reject (over-long strings, a
    /// file name with a '/') are refused here, so a bug on the sending side
    /// shows up locally instead of as a dropped connection.
    pub fn encode_payload(&self, out: &mut Vec<u8>) -> Result<()> {
        let w = &mut Writer {
            out,
            msg: self.message_type().name(),
        };
        match self {
            Message::Hello {
                role,
                node,
                service,
                term,
            } => {
                w.u8(role.to_wire());
                w.name("node", node)?;
                w.name("service", service)?;
                w.opt_u64(*term);
            }
            Message::Welcome { node } => w.name("node", node)?,
            Message::DeltaBegin {
                series,
                epoch,
                parent,
                files,
                total_bytes,
            } => {
                w.name("series", series)?;
                w.u64(*epoch);
                w.opt_u64(*parent);
                w.u32(*files);
                w.u64(*total_bytes);
            }
            Message::FileChunk {
                epoch,
                name,
                offset,
                data,
            } => {
                if let Err(reason) = check_file_name(name) {
                    return Err(WireError::invalid(w.msg, reason));
                }
                if offset.checked_add(data.len() as u64).is_none() {
                    return Err(WireError::invalid(w.msg, "offset + length overflows u64"));
                }
                w.u64(*epoch);
                w.name("name", name)?;
                w.u64(*offset);
                w.bytes("chunk", data)?;
            }
            Message::DeltaEnd {
                epoch,
                files,
                total_bytes,
            } => {
                w.u64(*epoch);
                w.u32(*files);
                w.u64(*total_bytes);
            }
            Message::Committed { epoch } => w.u64(*epoch),
            Message::Heartbeat { sent_unix_ns } => w.u64(*sent_unix_ns),
            Message::HeartbeatAck { echo_unix_ns } => w.u64(*echo_unix_ns),
            Message::NeedFull { reason }
            | Message::Bye { reason }
            | Message::BackupError { reason } => w.reason(reason)?,
            Message::Log { data } => w.bytes("log data", data)?,
            Message::NetLog { first, frames } => {
                let count = u32::try_from(frames.len())
                    .map_err(|_| WireError::invalid(w.msg, "more than 2^32 - 1 frames"))?;
                if net_log_end(*first, frames.len()).is_none() {
                    return Err(WireError::invalid(w.msg, "frame numbers run past 2^64 - 1"));
                }
                w.u64(*first);
                w.u32(count);
                for (i, f) in frames.iter().enumerate() {
                    if f.len() > MAX_NET_FRAME_LEN {
                        return Err(WireError::invalid(
                            w.msg,
                            format!("frame {i} is {} bytes, over {MAX_NET_FRAME_LEN}", f.len()),
                        ));
                    }
                    w.bytes("frame", f)?;
                }
            }
            Message::LogAck { records, net } => {
                w.u64(*records);
                w.u64(*net);
            }
        }
        Ok(())
    }

    /// Decodes a payload of type `ty`. The whole payload must be consumed:
    /// trailing bytes are an error, because a frame that means more than we
    /// understand is safer refused than half-read.
    pub fn decode_payload(ty: MessageType, payload: &[u8]) -> Result<Message> {
        let r = &mut Reader {
            buf: payload,
            msg: ty.name(),
        };
        let m = match ty {
            MessageType::Hello => {
                let b = r.u8("role")?;
                let role = Role::from_wire(b)
                    .ok_or_else(|| WireError::malformed(r.msg, format!("unknown role {b}")))?;
                let node = r.name("node")?;
                let service = r.name("service")?;
                let term = r.opt_u64("term")?;
                Message::Hello {
                    role,
                    node,
                    service,
                    term,
                }
            }
            MessageType::Welcome => Message::Welcome {
                node: r.name("node")?,
            },
            MessageType::DeltaBegin => Message::DeltaBegin {
                series: r.name("series")?,
                epoch: r.u64("epoch")?,
                parent: r.opt_u64("parent")?,
                files: r.u32("files")?,
                total_bytes: r.u64("total_bytes")?,
            },
            MessageType::FileChunk => {
                let epoch = r.u64("epoch")?;
                let name = r.name("name")?;
                if let Err(reason) = check_file_name(&name) {
                    return Err(WireError::malformed(r.msg, reason));
                }
                let offset = r.u64("offset")?;
                let data = r.bytes("data")?;
                if offset.checked_add(data.len() as u64).is_none() {
                    return Err(WireError::malformed(r.msg, "offset + length overflows u64"));
                }
                Message::FileChunk {
                    epoch,
                    name,
                    offset,
                    data,
                }
            }
            MessageType::DeltaEnd => Message::DeltaEnd {
                epoch: r.u64("epoch")?,
                files: r.u32("files")?,
                total_bytes: r.u64("total_bytes")?,
            },
            MessageType::Committed => Message::Committed {
                epoch: r.u64("epoch")?,
            },
            MessageType::Heartbeat => Message::Heartbeat {
                sent_unix_ns: r.u64("sent_unix_ns")?,
            },
            MessageType::HeartbeatAck => Message::HeartbeatAck {
                echo_unix_ns: r.u64("echo_unix_ns")?,
            },
            MessageType::NeedFull => Message::NeedFull {
                reason: r.reason()?,
            },
            MessageType::Bye => Message::Bye {
                reason: r.reason()?,
            },
            MessageType::Log => Message::Log {
                data: r.bytes("data")?,
            },
            MessageType::NetLog => {
                let first = r.u64("first")?;
                let count = r.u32("frame count")? as usize;
                // Each frame takes at least its 4-byte length, so a count
                // above a quarter of what is left is a lie. Refusing it
                // before reserving room for the frames keeps that room in
                // proportion to the bytes actually received.
                if count > r.buf.len() / 4 {
                    return Err(WireError::malformed(
                        r.msg,
                        format!(
                            "{count} frames cannot fit in the {} bytes left",
                            r.buf.len()
                        ),
                    ));
                }
                if net_log_end(first, count).is_none() {
                    return Err(WireError::malformed(
                        r.msg,
                        "frame numbers run past 2^64 - 1",
                    ));
                }
                let mut frames = Vec::with_capacity(count);
                for i in 0..count {
                    let len = r.u32("frame length")? as usize;
                    if len > MAX_NET_FRAME_LEN {
                        return Err(WireError::malformed(
                            r.msg,
                            format!("frame {i} is {len} bytes, over {MAX_NET_FRAME_LEN}"),
                        ));
                    }
                    frames.push(r.take("frame", len)?.to_vec());
                }
                Message::NetLog { first, frames }
            }
            MessageType::LogAck => Message::LogAck {
                records: r.u64("records")?,
                net: r.u64("net")?,
            },
            MessageType::BackupError => Message::BackupError {
                reason: r.reason()?,
            },
        };
        if !r.buf.is_empty() {
            return Err(WireError::malformed(
                r.msg,
                format!("{} trailing bytes", r.buf.len()),
            ));
        }
        Ok(m)
    }
}

/// The number of the last frame of a NetLog, `None` if it would not fit in
/// a u64 (no frames at all always fits). Frame numbers name frames for the
/// acknowledgements; a batch whose numbers wrap would name old frames again.
fn net_log_end(first: u64, count: usize) -> Option<u64> {
    match count.checked_sub(1) {
        None => Some(first),
        Some(last) => first.checked_add(u64::try_from(last).ok()?),
    }
}

struct Writer<'a> {
    out: &'a mut Vec<u8>,
    msg: &'static str,
}

impl Writer<'_> {
    fn u8(&mut self, v: u8) {
        self.out.push(v);
    }

    fn u32(&mut self, v: u32) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }

    fn u64(&mut self, v: u64) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }

    /// A u32 length and the bytes.
    fn bytes(&mut self, field: &str, b: &[u8]) -> Result<()> {
        let len = u32::try_from(b.len())
            .map_err(|_| WireError::invalid(self.msg, format!("{field} is longer than 4 GiB")))?;
        self.u32(len);
        self.out.extend_from_slice(b);
        Ok(())
    }

    fn opt_u64(&mut self, v: Option<u64>) {
        match v {
            None => self.u8(0),
            Some(v) => {
                self.u8(1);
                self.u64(v);
            }
        }
    }

    fn name(&mut self, field: &str, s: &str) -> Result<()> {
        let len = u8::try_from(s.len()).map_err(|_| {
            WireError::invalid(
                self.msg,
                format!("{field} is {} bytes, over {MAX_NAME_LEN}", s.len()),
            )
        })?;
        self.u8(len);
        self.out.extend_from_slice(s.as_bytes());
        Ok(())
    }

    fn reason(&mut self, s: &str) -> Result<()> {
        if s.len() > MAX_REASON_LEN {
            return Err(WireError::invalid(
                self.msg,
                format!("reason is {} bytes, over {MAX_REASON_LEN}", s.len()),
            ));
        }
        // Fits: MAX_REASON_LEN is below u16::MAX.
        self.out.extend_from_slice(&(s.len() as u16).to_le_bytes());
        self.out.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    msg: &'static str,
}

impl<'a> Reader<'a> {
    fn take(&mut self, field: &str, n: usize) -> Result<&'a [u8]> {
        if n > self.buf.len() {
            return Err(WireError::malformed(
                self.msg,
                format!("{field} needs {n} bytes but only {} remain", self.buf.len()),
            ));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, field: &str) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(field, N)?);
        Ok(a)
    }

    fn u8(&mut self, field: &str) -> Result<u8> {
        Ok(self.array::<1>(field)?[0])
    }

    fn u16(&mut self, field: &str) -> Result<u16> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }

    fn u32(&mut self, field: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }

    fn u64(&mut self, field: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }

    /// A u32 length and that many bytes, copied only once they are known
    /// to be present.
    fn bytes(&mut self, field: &str) -> Result<Vec<u8>> {
        let n = self.u32(field)? as usize;
        Ok(self.take(field, n)?.to_vec())
    }

    fn tag(&mut self, field: &str) -> Result<bool> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            t => Err(WireError::malformed(
                self.msg,
                format!("{field}: option tag {t} is neither 0 nor 1"),
            )),
        }
    }

    fn opt_u64(&mut self, field: &str) -> Result<Option<u64>> {
        Ok(match self.tag(field)? {
            false => None,
            true => Some(self.u64(field)?),
        })
    }

    fn utf8(&mut self, field: &str, n: usize) -> Result<String> {
        let bytes = self.take(field, n)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_owned()),
            Err(_) => Err(WireError::malformed(
                self.msg,
                format!("{field} is not valid UTF-8"),
            )),
        }
    }

    fn name(&mut self, field: &str) -> Result<String> {
        let n = self.u8(field)? as usize;
        self.utf8(field, n)
    }

    fn reason(&mut self) -> Result<String> {
        let n = self.u16("reason length")? as usize;
        if n > MAX_REASON_LEN {
            return Err(WireError::malformed(
                self.msg,
                format!("reason is {n} bytes, over {MAX_REASON_LEN}"),
            ));
        }
        self.utf8("reason", n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(m: &Message) -> Message {
        let mut out = Vec::new();
        m.encode_payload(&mut out).unwrap();
        Message::decode_payload(m.message_type(), &out).unwrap()
    }

    fn payload(m: &Message) -> Vec<u8> {
        let mut out = Vec::new();
        m.encode_payload(&mut out).unwrap();
        out
    }

    fn malformed(ty: MessageType, p: &[u8]) -> String {
        match Message::decode_payload(ty, p) {
            Err(WireError::Malformed { reason, .. }) => reason,
            other => panic!("expected Malformed, got {other:?}"),
        }
    }

    #[test]
    fn type_numbers_are_stable() {
        let expected = [
            (MessageType::Hello, 1),
            (MessageType::Welcome, 2),
            (MessageType::DeltaBegin, 3),
            (MessageType::FileChunk, 4),
            (MessageType::DeltaEnd, 5),
            (MessageType::Committed, 6),
            (MessageType::Heartbeat, 8),
            (MessageType::HeartbeatAck, 9),
            (MessageType::NeedFull, 10),
            (MessageType::Bye, 11),
            (MessageType::Log, 12),
            (MessageType::NetLog, 13),
            (MessageType::LogAck, 14),
            (MessageType::BackupError, 15),
        ];
        assert_eq!(expected.len(), MessageType::ALL.len());
        for (t, n) in expected {
            assert_eq!(t.as_u8(), n);
            assert_eq!(MessageType::from_u8(n), Some(t));
        }
        // 7 (Refused) is retired.
        for n in [0, 7, 16, 255] {
            assert_eq!(MessageType::from_u8(n), None, "{n}");
        }
    }

    #[test]
    fn names_are_distinct() {
        let mut names: Vec<_> = MessageType::ALL.iter().map(|t| t.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), MessageType::ALL.len());
    }

    #[test]
    fn exact_encoding_of_hello() {
        let m = Message::Hello {
            role: Role::Backup,
            node: "b1".into(),
            service: "s".into(),
            term: Some(3),
        };
        assert_eq!(
            payload(&m),
            vec![2, 2, b'b', b'1', 1, b's', 1, 3, 0, 0, 0, 0, 0, 0, 0]
        );
        let m = Message::Welcome { node: "p".into() };
        assert_eq!(payload(&m), vec![1, b'p']);
    }

    #[test]
    fn exact_encoding_of_the_log_messages() {
        let m = Message::Log {
            data: vec![0xaa, 0xbb],
        };
        assert_eq!(payload(&m), vec![2, 0, 0, 0, 0xaa, 0xbb]);

        let m = Message::NetLog {
            first: 0x0102,
            frames: vec![vec![9], vec![], vec![7, 8]],
        };
        let mut expected = 0x0102u64.to_le_bytes().to_vec();
        expected.extend_from_slice(&3u32.to_le_bytes());
        expected.extend_from_slice(&[1, 0, 0, 0, 9]);
        expected.extend_from_slice(&[0, 0, 0, 0]);
        expected.extend_from_slice(&[2, 0, 0, 0, 7, 8]);
        assert_eq!(payload(&m), expected);

        let m = Message::LogAck {
            records: 5,
            net: u64::MAX,
        };
        let mut expected = 5u64.to_le_bytes().to_vec();
        expected.extend_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(payload(&m), expected);

        let m = Message::BackupError {
            reason: "full".into(),
        };
        assert_eq!(payload(&m), vec![4, 0, b'f', b'u', b'l', b'l']);
    }

    #[test]
    fn every_variant_round_trips() {
        let all = [
            Message::Hello {
                role: Role::Primary,
                node: "p".into(),
                service: "svc".into(),
                term: None,
            },
            Message::Welcome {
                node: "n".repeat(255),
            },
            Message::DeltaBegin {
                series: "web".into(),
                epoch: 7,
                parent: Some(6),
                files: 3,
                total_bytes: 1 << 40,
            },
            Message::FileChunk {
                epoch: 7,
                name: "pages-1.img".into(),
                offset: 4096,
                data: vec![1, 2, 3],
            },
            Message::DeltaEnd {
                epoch: 7,
                files: 3,
                total_bytes: 9,
            },
            Message::Committed { epoch: 7 },
            Message::Heartbeat { sent_unix_ns: 1 },
            Message::HeartbeatAck { echo_unix_ns: 2 },
            Message::NeedFull {
                reason: String::new(),
            },
            Message::Bye {
                reason: "x".repeat(MAX_REASON_LEN),
            },
            Message::Log { data: vec![] },
            Message::Log {
                data: vec![0; 100_000],
            },
            Message::NetLog {
                first: u64::MAX,
                frames: vec![],
            },
            Message::NetLog {
                first: u64::MAX - 1,
                frames: vec![vec![1; MAX_NET_FRAME_LEN], vec![]],
            },
            Message::LogAck { records: 0, net: 1 },
            Message::BackupError {
                reason: "disk full ✗".into(),
            },
        ];
        let mut seen: Vec<_> = all.iter().map(|m| m.message_type()).collect();
        seen.dedup();
        assert_eq!(seen, MessageType::ALL);
        for m in &all {
            assert_eq!(&roundtrip(m), m);
        }
    }

    #[test]
    fn rejects_truncated_payloads_of_every_type() {
        let samples = [
            Message::Hello {
                role: Role::Primary,
                node: "node".into(),
                service: "svc".into(),
                term: None,
            },
            Message::Welcome { node: "n".into() },
            Message::DeltaBegin {
                series: "s".into(),
                epoch: 1,
                parent: Some(0),
                files: 1,
                total_bytes: 1,
            },
            Message::FileChunk {
                epoch: 1,
                name: "f".into(),
                offset: 0,
                data: vec![9; 5],
            },
            Message::DeltaEnd {
                epoch: 1,
                files: 1,
                total_bytes: 1,
            },
            Message::Committed { epoch: 1 },
            Message::Heartbeat { sent_unix_ns: 1 },
            Message::HeartbeatAck { echo_unix_ns: 1 },
            Message::NeedFull { reason: "r".into() },
            Message::Bye { reason: "r".into() },
            Message::Log { data: vec![1, 2] },
            Message::NetLog {
                first: 3,
                frames: vec![vec![1, 2], vec![]],
            },
            Message::LogAck { records: 1, net: 2 },
            Message::BackupError { reason: "r".into() },
        ];
        for m in &samples {
            let p = payload(m);
            for cut in 0..p.len() {
                let r = Message::decode_payload(m.message_type(), &p[..cut]);
                assert!(
                    matches!(r, Err(WireError::Malformed { .. })),
                    "{m:?} cut at {cut}: {r:?}"
                );
            }
        }
    }

    #[test]
    fn rejects_trailing_bytes() {
        let mut p = payload(&Message::Committed { epoch: 1 });
        p.push(0);
        assert!(malformed(MessageType::Committed, &p).contains("trailing"));
    }

    #[test]
    fn rejects_inner_length_beyond_payload() {
        // Chunk claims 1000 data bytes but carries 3.
        let mut p = Vec::new();
        p.extend_from_slice(&1u64.to_le_bytes());
        p.extend_from_slice(&[1, b'f']);
        p.extend_from_slice(&0u64.to_le_bytes());
        p.extend_from_slice(&1000u32.to_le_bytes());
        p.extend_from_slice(&[1, 2, 3]);
        assert!(malformed(MessageType::FileChunk, &p).contains("remain"));

        // A u32::MAX data length must be rejected without trying to allocate it.
        let n = p.len() - 7;
        p.truncate(n);
        p.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(malformed(MessageType::FileChunk, &p).contains("remain"));

        // Name length larger than what follows.
        assert!(malformed(MessageType::Welcome, &[200, b'a', b'b']).contains("remain"));
    }

    #[test]
    fn rejects_reason_over_limit() {
        let mut p = Vec::new();
        p.extend_from_slice(&(MAX_REASON_LEN as u16 + 1).to_le_bytes());
        p.resize(2 + MAX_REASON_LEN + 1, b'a');
        assert!(malformed(MessageType::Bye, &p).contains("over"));
    }

    #[test]
    fn rejects_bad_utf8() {
        assert!(malformed(MessageType::Welcome, &[2, 0xff, 0xfe, 0]).contains("UTF-8"));
        assert!(malformed(MessageType::NeedFull, &[1, 0, 0xc3]).contains("UTF-8"));
    }

    #[test]
    fn rejects_bad_role_and_option_tag() {
        assert!(malformed(MessageType::Hello, &[3, 0]).contains("role"));
        let mut p = vec![1, b's'];
        p.extend_from_slice(&1u64.to_le_bytes());
        p.push(2);
        assert!(malformed(MessageType::DeltaBegin, &p).contains("tag"));
    }

    /// A NetLog payload: `first`, the count as given, then the frames.
    fn net_log(first: u64, count: u32, frames: &[&[u8]]) -> Vec<u8> {
        let mut p = first.to_le_bytes().to_vec();
        p.extend_from_slice(&count.to_le_bytes());
        for f in frames {
            p.extend_from_slice(&(f.len() as u32).to_le_bytes());
            p.extend_from_slice(f);
        }
        p
    }

    #[test]
    fn net_log_count_is_checked_before_allocating() {
        // A count of 4 billion frames in a 12-byte payload.
        let reason = malformed(MessageType::NetLog, &net_log(0, u32::MAX, &[]));
        assert!(reason.contains("cannot fit"), "{reason}");
        // One more frame than the bytes left could hold, even if empty.
        let p = net_log(0, 3, &[b"", b""]);
        assert!(malformed(MessageType::NetLog, &p).contains("cannot fit"));
        // Exactly as many as can fit, all empty, is fine.
        let p = net_log(0, 2, &[b"", b""]);
        assert_eq!(
            Message::decode_payload(MessageType::NetLog, &p).unwrap(),
            Message::NetLog {
                first: 0,
                frames: vec![vec![], vec![]]
            }
        );
        // Fewer frames than counted.
        let p = net_log(0, 2, &[b"abcdefgh"]);
        assert!(malformed(MessageType::NetLog, &p).contains("remain"));
        // More frames than counted.
        let p = net_log(0, 1, &[b"a", b"b"]);
        assert!(malformed(MessageType::NetLog, &p).contains("trailing"));
    }

    #[test]
    fn net_log_frame_length_is_bounded() {
        let big = vec![0u8; MAX_NET_FRAME_LEN + 1];
        let reason = malformed(MessageType::NetLog, &net_log(0, 1, &[&big]));
        assert!(reason.contains("over 65600"), "{reason}");
        // A hostile length is refused before the bytes are looked for.
        let mut p = net_log(0, 1, &[]);
        p.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(malformed(MessageType::NetLog, &p).contains("over 65600"));
        let ok = vec![0u8; MAX_NET_FRAME_LEN];
        Message::decode_payload(MessageType::NetLog, &net_log(0, 1, &[&ok])).unwrap();
    }

    #[test]
    fn net_log_numbers_must_not_wrap() {
        let p = net_log(u64::MAX, 2, &[b"a", b"b"]);
        assert!(malformed(MessageType::NetLog, &p).contains("2^64"));
        let p = net_log(u64::MAX, 1, &[b"a"]);
        Message::decode_payload(MessageType::NetLog, &p).unwrap();
    }

    #[test]
    fn log_data_length_beyond_payload() {
        let mut p = 10u32.to_le_bytes().to_vec();
        p.extend_from_slice(&[1, 2, 3]);
        assert!(malformed(MessageType::Log, &p).contains("remain"));
        let p = u32::MAX.to_le_bytes();
        assert!(malformed(MessageType::Log, &p).contains("remain"));
    }

    #[test]
    fn rejects_unsafe_file_names_on_decode() {
        for bad in ["", ".", "..", "a/b", "/etc", "../x", "a\0b"] {
            let mut p = Vec::new();
            p.extend_from_slice(&1u64.to_le_bytes());
            p.push(bad.len() as u8);
            p.extend_from_slice(bad.as_bytes());
            p.extend_from_slice(&0u64.to_le_bytes());
            p.extend_from_slice(&0u32.to_le_bytes());
            let reason = malformed(MessageType::FileChunk, &p);
            assert!(reason.contains("file name"), "{bad:?}: {reason}");
        }
    }

    #[test]
    fn rejects_offset_overflow() {
        let mut p = Vec::new();
        p.extend_from_slice(&1u64.to_le_bytes());
        p.extend_from_slice(&[1, b'f']);
        p.extend_from_slice(&u64::MAX.to_le_bytes());
        p.extend_from_slice(&1u32.to_le_bytes());
        p.push(0);
        assert!(malformed(MessageType::FileChunk, &p).contains("overflow"));
    }

    #[test]
    fn encoder_refuses_what_the_decoder_would_reject() {
        let bad = [
            Message::Hello {
                role: Role::Primary,
                node: "n".repeat(256),
                service: "svc".into(),
                term: None,
            },
            Message::DeltaBegin {
                series: "s".repeat(256),
                epoch: 0,
                parent: None,
                files: 0,
                total_bytes: 0,
            },
            Message::FileChunk {
                epoch: 0,
                name: "../etc/passwd".into(),
                offset: 0,
                data: vec![],
            },
            Message::FileChunk {
                epoch: 0,
                name: "x".into(),
                offset: u64::MAX,
                data: vec![1],
            },
            Message::Bye {
                reason: "r".repeat(MAX_REASON_LEN + 1),
            },
            Message::BackupError {
                reason: "r".repeat(MAX_REASON_LEN + 1),
            },
            Message::NetLog {
                first: 0,
                frames: vec![vec![], vec![0; MAX_NET_FRAME_LEN + 1]],
            },
            Message::NetLog {
                first: u64::MAX,
                frames: vec![vec![], vec![]],
            },
        ];
        for m in &bad {
            let r = m.encode_payload(&mut Vec::new());
            assert!(matches!(r, Err(WireError::Invalid { .. })), "{m:?}: {r:?}");
        }
    }
}
