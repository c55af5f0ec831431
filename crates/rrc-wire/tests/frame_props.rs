//! Property tests of the frame decoder against arbitrary input.

use proptest::prelude::*;
use rrc_wire::frame::{HEADER_LEN, MAGIC, TRAILER_LEN, VERSION};
use rrc_wire::message::MAX_NET_FRAME_LEN;
use rrc_wire::{Decoder, Encoder, Message, MessageType, Role, WireError};

fn short_text() -> impl Strategy<Value = String> {
    // At most 60 chars of at most 4 bytes each: within the 255-byte limit.
    "(?s).{0,60}"
}

fn file_name() -> impl Strategy<Value = String> {
    "[^/\\x00]{1,60}".prop_filter("not . or ..", |s| s != "." && s != "..")
}

fn reason() -> impl Strategy<Value = String> {
    "(?s).{0,300}"
}

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..max)
}

/// Net-log frames, now and then one of the largest allowed.
fn net_frames() -> impl Strategy<Value = Vec<Vec<u8>>> {
    let frame = prop_oneof![
        8 => bytes(200),
        1 => Just(vec![0x5a; MAX_NET_FRAME_LEN]),
    ];
    proptest::collection::vec(frame, 0..6)
}

fn message() -> impl Strategy<Value = Message> {
    let role = prop_oneof![Just(Role::Primary), Just(Role::Backup)];
    prop_oneof![
        (role, short_text(), short_text(), any::<Option<u64>>()).prop_map(
            |(role, node, service, term)| Message::Hello {
                role,
                node,
                service,
                term
            }
        ),
        short_text().prop_map(|node| Message::Welcome { node }),
        (
            short_text(),
            any::<u64>(),
            any::<Option<u64>>(),
            any::<u32>(),
            any::<u64>()
        )
            .prop_map(|(series, epoch, parent, files, total_bytes)| {
                Message::DeltaBegin {
                    series,
                    epoch,
                    parent,
                    files,
                    total_bytes,
                }
            }),
        (any::<u64>(), file_name(), 0..u64::MAX / 2, bytes(3000)).prop_map(
            |(epoch, name, offset, data)| Message::FileChunk {
                epoch,
                name,
                offset,
                data,
            }
        ),
        (any::<u64>(), any::<u32>(), any::<u64>()).prop_map(|(epoch, files, total_bytes)| {
            Message::DeltaEnd {
                epoch,
                files,
                total_bytes,
            }
        }),
        any::<u64>().prop_map(|epoch| Message::Committed { epoch }),
        any::<u64>().prop_map(|sent_unix_ns| Message::Heartbeat { sent_unix_ns }),
        any::<u64>().prop_map(|echo_unix_ns| Message::HeartbeatAck { echo_unix_ns }),
        reason().prop_map(|reason| Message::NeedFull { reason }),
        reason().prop_map(|reason| Message::Bye { reason }),
        bytes(3000).prop_map(|data| Message::Log { data }),
        (0..u64::MAX / 2, net_frames())
            .prop_map(|(first, frames)| Message::NetLog { first, frames }),
        (any::<u64>(), any::<u64>()).prop_map(|(records, net)| Message::LogAck { records, net }),
        reason().prop_map(|reason| Message::BackupError { reason }),
    ]
}

/// Split points, as chunk lengths cycled over the input.
fn splits() -> impl Strategy<Value = Vec<usize>> {
    proptest::collection::vec(1usize..700, 1..20)
}

/// Feeds `bytes` in chunks and drains the decoder after each one. Returns
/// the messages produced and the error that stopped it, if any.
fn drive(d: &mut Decoder, bytes: &[u8], splits: &[usize]) -> (Vec<Message>, Option<WireError>) {
    let mut out = Vec::new();
    let mut rest = bytes;
    let mut i = 0;
    while !rest.is_empty() {
        let n = splits[i % splits.len()].min(rest.len());
        i += 1;
        d.feed(&rest[..n]);
        rest = &rest[n..];
        loop {
            match d.next() {
                Ok(Some(m)) => out.push(m),
                Ok(None) => break,
                Err(e) => return (out, Some(e)),
            }
        }
    }
    (out, None)
}

/// Every message the decoder produced must correspond byte for byte to a
/// correctly checksummed frame at its place in the input. The encoding is
/// canonical, so re-encoding in order reproduces exactly the consumed bytes.
fn check_yielded(input: &[u8], yielded: &[Message]) -> Result<(), TestCaseError> {
    let mut enc = Encoder::new();
    let mut off = 0;
    for m in yielded {
        let frame = enc.encode(m).expect("a decoded message re-encodes");
        prop_assert!(off + frame.len() <= input.len());
        let got = &input[off..off + frame.len()];
        prop_assert_eq!(got, &frame[..]);
        let body = &got[..got.len() - TRAILER_LEN];
        let crc = u32::from_le_bytes(got[got.len() - TRAILER_LEN..].try_into().unwrap());
        prop_assert_eq!(crc32fast::hash(body), crc);
        off += frame.len();
    }
    Ok(())
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Set(usize, u8),
    Delete(usize),
    Insert(usize, u8),
    Truncate(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(i, b)| Mutation::Flip(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, v)| Mutation::Set(i, v)),
        any::<usize>().prop_map(Mutation::Delete),
        (any::<usize>(), any::<u8>()).prop_map(|(i, v)| Mutation::Insert(i, v)),
        any::<usize>().prop_map(Mutation::Truncate),
    ]
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    if bytes.is_empty() {
        return;
    }
    let at = |i: usize| i % bytes.len();
    match *m {
        Mutation::Flip(i, b) => {
            let i = at(i);
            bytes[i] ^= 1 << b;
        }
        Mutation::Set(i, v) => {
            let i = at(i);
            bytes[i] = v;
        }
        Mutation::Delete(i) => {
            let i = at(i);
            bytes.remove(i);
        }
        Mutation::Insert(i, v) => {
            let i = at(i);
            bytes.insert(i, v);
        }
        Mutation::Truncate(i) => {
            let i = at(i);
            bytes.truncate(i);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn messages_round_trip_in_any_chunking(
        msgs in proptest::collection::vec(message(), 1..8),
        splits in splits(),
    ) {
        let mut enc = Encoder::new();
        let mut bytes = Vec::new();
        for m in &msgs {
            enc.encode_into(m, &mut bytes).unwrap();
        }
        let mut d = Decoder::new();
        let (got, err) = drive(&mut d, &bytes, &splits);
        prop_assert!(err.is_none(), "{:?}", err);
        prop_assert_eq!(got, msgs);
        prop_assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn random_bytes_never_panic_or_forge_messages(
        bytes in proptest::collection::vec(any::<u8>(), 0..4096),
        prefix_magic in any::<bool>(),
        splits in splits(),
    ) {
        let mut bytes = bytes;
        if prefix_magic && bytes.len() >= 4 {
            // Get past the magic/version checks so the rest is exercised too.
            bytes[..2].copy_from_slice(&MAGIC);
            bytes[2] = VERSION;
        }
        let mut d = Decoder::with_max_payload(2048);
        let (got, err) = drive(&mut d, &bytes, &splits);
        check_yielded(&bytes, &got)?;
        if err.is_some() {
            prop_assert!(matches!(d.next(), Err(WireError::Poisoned)));
        }
    }

    #[test]
    fn mutated_frames_never_panic_or_yield_bad_crc(
        msgs in proptest::collection::vec(message(), 1..4),
        mutations in proptest::collection::vec(mutation(), 1..4),
        splits in splits(),
    ) {
        let mut enc = Encoder::new();
        let mut bytes = Vec::new();
        for m in &msgs {
            enc.encode_into(m, &mut bytes).unwrap();
        }
        let original = bytes.clone();
        for m in &mutations {
            apply(&mut bytes, m);
        }
        let mut d = Decoder::new();
        let (got, err) = drive(&mut d, &bytes, &splits);
        check_yielded(&bytes, &got)?;
        if bytes != original {
            // Whatever changed, the damaged frame itself is never accepted:
            // either an error, or the decoder is still waiting for input.
            prop_assert!(got.len() < msgs.len() || err.is_some() || d.buffered() > 0);
        }
    }
}

/// A frame with the given header fields and payload, correctly checksummed,
/// as an old or hostile peer could send it.
fn raw_frame(version: u8, ty: u8, seq: u64, payload: &[u8]) -> Vec<u8> {
    let mut f = MAGIC.to_vec();
    f.push(version);
    f.push(ty);
    f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    f.extend_from_slice(&seq.to_le_bytes());
    f.extend_from_slice(payload);
    let crc = crc32fast::hash(&f);
    f.extend_from_slice(&crc.to_le_bytes());
    f
}

fn payload(m: &Message) -> Vec<u8> {
    let mut p = Vec::new();
    m.encode_payload(&mut p).unwrap();
    p
}

#[test]
fn a_version_1_peer_is_refused_with_a_clear_error() {
    // Hello as version 1 encoded it: role, node, no series.
    let f = raw_frame(1, 1, 0, &[1, 1, b'p', 0]);
    let mut d = Decoder::new();
    d.feed(&f);
    let e = d.next().unwrap_err();
    assert!(matches!(e, WireError::UnsupportedVersion(1)), "{e:?}");
    let text = e.to_string();
    assert!(
        text.contains("version 1") && text.contains("version 3"),
        "{text}"
    );
}

#[test]
fn the_retired_refused_type_is_rejected() {
    // Refused { epoch: 1, reason: "r" } as version 1 encoded it.
    let mut p = 1u64.to_le_bytes().to_vec();
    p.extend_from_slice(&[1, 0, b'r']);
    let mut d = Decoder::new();
    d.feed(&raw_frame(VERSION, 7, 0, &p));
    assert!(matches!(d.next(), Err(WireError::UnknownType(7))));
}

#[test]
fn the_strategy_covers_every_message_type() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..2000 {
        let m = message().new_tree(&mut runner).unwrap().current();
        seen.insert(m.message_type());
    }
    for t in MessageType::ALL {
        assert!(seen.contains(&t), "{} never generated", t.name());
    }
}

/// A NetLog payload whose count and frame lengths need not match what
/// follows.
fn hostile_net_log() -> impl Strategy<Value = Vec<u8>> {
    let count = prop_oneof![0u32..8, any::<u32>()];
    let len = prop_oneof![
        4 => 0u32..64,
        1 => (MAX_NET_FRAME_LEN as u32 - 2)..(MAX_NET_FRAME_LEN as u32 + 2),
        1 => any::<u32>(),
    ];
    let frames = proptest::collection::vec((len, bytes(64)), 0..8);
    (any::<u64>(), count, frames, bytes(8)).prop_map(|(first, count, frames, tail)| {
        let mut p = first.to_le_bytes().to_vec();
        p.extend_from_slice(&count.to_le_bytes());
        for (len, b) in frames {
            p.extend_from_slice(&len.to_le_bytes());
            p.extend_from_slice(&b);
        }
        p.extend_from_slice(&tail);
        p
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn truncated_or_extended_payloads_are_rejected(
        m in message(),
        cut in any::<prop::sample::Index>(),
        extra in proptest::collection::vec(any::<u8>(), 1..16),
    ) {
        let p = payload(&m);
        let ty = m.message_type();
        prop_assert_eq!(Message::decode_payload(ty, &p).unwrap(), m);
        if !p.is_empty() {
            let cut = cut.index(p.len());
            let r = Message::decode_payload(ty, &p[..cut]);
            prop_assert!(matches!(r, Err(WireError::Malformed { .. })), "cut at {}: {:?}", cut, r);
        }
        let mut longer = p.clone();
        longer.extend_from_slice(&extra);
        let r = Message::decode_payload(ty, &longer);
        prop_assert!(matches!(r, Err(WireError::Malformed { .. })), "{:?}", r);
    }

    #[test]
    fn truncated_frames_never_yield_a_message(
        m in message(),
        cut in any::<prop::sample::Index>(),
        splits in splits(),
    ) {
        let f = Encoder::new().encode(&m).unwrap();
        let cut = cut.index(f.len());
        let mut d = Decoder::new();
        let (got, err) = drive(&mut d, &f[..cut], &splits);
        prop_assert!(got.is_empty());
        prop_assert!(err.is_none(), "{:?}", err);
        // The caller can tell a stream cut mid-frame from a clean end.
        prop_assert_eq!(d.buffered(), cut);
    }

    #[test]
    fn oversized_frames_are_refused_from_the_header(m in message()) {
        let f = Encoder::new().encode(&m).unwrap();
        let len = (f.len() - HEADER_LEN - TRAILER_LEN) as u32;
        prop_assume!(len > 0);
        let mut d = Decoder::with_max_payload(len - 1);
        // Only the header: the length alone condemns it.
        d.feed(&f[..8]);
        let r = d.next();
        prop_assert!(matches!(r, Err(WireError::TooLarge { .. })), "{:?}", r);
        let r = Encoder::with_max_payload(len - 1).encode(&m);
        prop_assert!(matches!(r, Err(WireError::TooLarge { .. })), "{:?}", r);
    }

    #[test]
    fn arbitrary_payloads_never_panic_and_accepted_ones_are_canonical(
        ty in prop::sample::select(MessageType::ALL.to_vec()),
        p in bytes(600),
    ) {
        if let Ok(m) = Message::decode_payload(ty, &p) {
            prop_assert_eq!(m.message_type(), ty);
            prop_assert_eq!(payload(&m), p);
        }
    }

    #[test]
    fn hostile_net_logs_never_panic_and_accepted_ones_are_canonical(p in hostile_net_log()) {
        match Message::decode_payload(MessageType::NetLog, &p) {
            Ok(m) => {
                if let Message::NetLog { frames, .. } = &m {
                    prop_assert!(frames.iter().all(|f| f.len() <= MAX_NET_FRAME_LEN));
                }
                prop_assert_eq!(payload(&m), p);
            }
            Err(e) => prop_assert!(matches!(e, WireError::Malformed { .. }), "{:?}", e),
        }
    }
}
