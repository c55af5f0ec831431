//! The messages exchanged between `rrc primary` and `rrc backup`, and their
//! payload encoding.
//!
//! The encoding is written by hand rather than derived so that decoding never
//! allocates more than the bytes actually present: every length read from the
//! wire is checked against what remains of the payload before anything is
//! reserved for it. Integers are little endian. Strings carry a length prefix
//! (u8 for names, u16 for free-text reasons) and must be UTF-8. Optional
//! values are a tag byte, 0 for absent and 1 for present, followed by the value.
//! There is exactly one encoding of each message, so a decoder that accepts a
//! payload and an encoder that re-encodes the result agree byte for byte.

use crate::error::{Result, WireError};

/// Longest node name, series name or file name, in bytes.
pub const MAX_NAME_LEN: usize = 255;

/// Longest free-text reason (Refused, NeedFull, Bye), in bytes. Reasons end up
/// in logs on the other host, so they are bounded well below a frame.
pub const MAX_REASON_LEN: usize = 4096;

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
    Refused = 7,
    Heartbeat = 8,
    HeartbeatAck = 9,
    NeedFull = 10,
    Bye = 11,
}

impl MessageType {
    pub const ALL: [MessageType; 11] = [
        MessageType::Hello,
        MessageType::Welcome,
        MessageType::DeltaBegin,
        MessageType::FileChunk,
        MessageType::DeltaEnd,
        MessageType::Committed,
        MessageType::Refused,
        MessageType::Heartbeat,
        MessageType::HeartbeatAck,
        MessageType::NeedFull,
        MessageType::Bye,
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
            MessageType::Refused => "Refused",
            MessageType::Heartbeat => "Heartbeat",
            MessageType::HeartbeatAck => "HeartbeatAck",
            MessageType::NeedFull => "NeedFull",
            MessageType::Bye => "Bye",
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
        series: Option<String>,
    },
    /// The backup's answer to Hello: the last epoch it has committed for the
    /// series, so the primary knows which parent the next delta may build on.
    Welcome {
        node: String,
        resume_from: Option<u64>,
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
    Refused {
        epoch: u64,
        reason: String,
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
            Message::Refused { .. } => MessageType::Refused,
            Message::Heartbeat { .. } => MessageType::Heartbeat,
            Message::HeartbeatAck { .. } => MessageType::HeartbeatAck,
            Message::NeedFull { .. } => MessageType::NeedFull,
            Message::Bye { .. } => MessageType::Bye,
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
            Message::Hello { role, node, series } => {
                w.u8(role.to_wire());
                w.name("node", node)?;
                match series {
                    None => w.u8(0),
                    Some(s) => {
                        w.u8(1);
                        w.name("series", s)?;
                    }
                }
            }
            Message::Welcome { node, resume_from } => {
                w.name("node", node)?;
                w.opt_u64(*resume_from);
            }
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
                let len = u32::try_from(data.len())
                    .map_err(|_| WireError::invalid(w.msg, "chunk longer than 4 GiB"))?;
                w.u32(len);
                w.out.extend_from_slice(data);
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
            Message::Refused { epoch, reason } => {
                w.u64(*epoch);
                w.reason(reason)?;
            }
            Message::Heartbeat { sent_unix_ns } => w.u64(*sent_unix_ns),
            Message::HeartbeatAck { echo_unix_ns } => w.u64(*echo_unix_ns),
            Message::NeedFull { reason } | Message::Bye { reason } => w.reason(reason)?,
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
                let series = match r.tag("series")? {
                    false => None,
                    true => Some(r.name("series")?),
                };
                Message::Hello { role, node, series }
            }
            MessageType::Welcome => Message::Welcome {
                node: r.name("node")?,
                resume_from: r.opt_u64("resume_from")?,
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
                let len = r.u32("data length")? as usize;
                let data = r.take("data", len)?.to_vec();
                if offset.checked_add(len as u64).is_none() {
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
            MessageType::Refused => Message::Refused {
                epoch: r.u64("epoch")?,
                reason: r.reason()?,
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
            (MessageType::Refused, 7),
            (MessageType::Heartbeat, 8),
            (MessageType::HeartbeatAck, 9),
            (MessageType::NeedFull, 10),
            (MessageType::Bye, 11),
        ];
        for (t, n) in expected {
            assert_eq!(t.as_u8(), n);
            assert_eq!(MessageType::from_u8(n), Some(t));
        }
        assert_eq!(MessageType::from_u8(0), None);
        assert_eq!(MessageType::from_u8(12), None);
        assert_eq!(MessageType::from_u8(255), None);
    }

    #[test]
    fn exact_encoding_of_hello() {
        let m = Message::Hello {
            role: Role::Backup,
            node: "b1".into(),
            series: Some("s".into()),
        };
        assert_eq!(payload(&m), vec![2, 2, b'b', b'1', 1, 1, b's']);
    }

    #[test]
    fn every_variant_round_trips() {
        let all = [
            Message::Hello {
                role: Role::Primary,
                node: "p".into(),
                series: None,
            },
            Message::Welcome {
                node: "n".repeat(255),
                resume_from: Some(u64::MAX),
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
            Message::Refused {
                epoch: 7,
                reason: "disk full ✗".into(),
            },
            Message::Heartbeat { sent_unix_ns: 1 },
            Message::HeartbeatAck { echo_unix_ns: 2 },
            Message::NeedFull {
                reason: String::new(),
            },
            Message::Bye {
                reason: "x".repeat(MAX_REASON_LEN),
            },
        ];
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
                series: Some("s".into()),
            },
            Message::Welcome {
                node: "n".into(),
                resume_from: Some(3),
            },
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
            Message::Refused {
                epoch: 1,
                reason: "r".into(),
            },
            Message::Heartbeat { sent_unix_ns: 1 },
            Message::HeartbeatAck { echo_unix_ns: 1 },
            Message::NeedFull { reason: "r".into() },
            Message::Bye { reason: "r".into() },
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
        assert!(malformed(MessageType::Hello, &[3, 0, 0]).contains("role"));
        assert!(malformed(MessageType::Hello, &[1, 0, 2]).contains("tag"));
        let mut p = vec![0];
        p.push(7);
        assert!(malformed(MessageType::Welcome, &p).contains("tag"));
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
                series: None,
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
        ];
        for m in &bad {
            let r = m.encode_payload(&mut Vec::new());
            assert!(matches!(r, Err(WireError::Invalid { .. })), "{m:?}: {r:?}");
        }
    }
}
