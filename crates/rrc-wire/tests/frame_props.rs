//! Property tests of the frame decoder against arbitrary input.

use proptest::prelude::*;
use rrc_wire::frame::TRAILER_LEN;
use rrc_wire::{Decoder, Encoder, Message, Role, WireError};

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

fn message() -> impl Strategy<Value = Message> {
    let role = prop_oneof![Just(Role::Primary), Just(Role::Backup)];
    prop_oneof![
        (role, short_text(), proptest::option::of(short_text()))
            .prop_map(|(role, node, series)| Message::Hello { role, node, series }),
        (short_text(), any::<Option<u64>>())
            .prop_map(|(node, resume_from)| Message::Welcome { node, resume_from }),
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
        (
            any::<u64>(),
            file_name(),
            0..u64::MAX / 2,
            proptest::collection::vec(any::<u8>(), 0..3000)
        )
            .prop_map(|(epoch, name, offset, data)| Message::FileChunk {
                epoch,
                name,
                offset,
                data,
            }),
        (any::<u64>(), any::<u32>(), any::<u64>()).prop_map(|(epoch, files, total_bytes)| {
            Message::DeltaEnd {
                epoch,
                files,
                total_bytes,
            }
        }),
        any::<u64>().prop_map(|epoch| Message::Committed { epoch }),
        (any::<u64>(), reason()).prop_map(|(epoch, reason)| Message::Refused { epoch, reason }),
        any::<u64>().prop_map(|sent_unix_ns| Message::Heartbeat { sent_unix_ns }),
        any::<u64>().prop_map(|echo_unix_ns| Message::HeartbeatAck { echo_unix_ns }),
        reason().prop_map(|reason| Message::NeedFull { reason }),
        reason().prop_map(|reason| Message::Bye { reason }),
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
            bytes[..3].copy_from_slice(b"RW\x01");
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
