//! Property tests of the batch format: every event round-trips, the writer
//! never overruns its buffer, and damaged input is rejected without panics.

use std::io::IoSlice;

use proptest::prelude::*;
use rrc_rr::log::{
    AcceptCall, BatchReader, BatchWriter, Bytes, DecodeError, EncodeError, EpollCall, EpollReady,
    Event, FORMAT_VERSION, HEADER_LEN, List, MmapCall, PollCall, ReadCall, Record, RecvCall,
    RecvMsg, SelectCall, SyncOp, WaitCall, WaitChild, WriteCall,
};

/// data, source address, flags, ancillary data
type OwnedMsg = (Vec<u8>, Vec<u8>, i32, Vec<u8>);

/// An owned description of an event, from which the borrowed `Event` is
/// built on demand.
#[derive(Debug, Clone)]
enum Owned {
    Syscall(u32, i64),
    Read(ReadCall, i32, i64, Vec<u8>, Option<Vec<usize>>),
    Recv(RecvCall, i32, i64, Vec<u8>, Vec<u8>, i32, Vec<u8>),
    RecvMmsg(i32, i64, Vec<OwnedMsg>),
    Accept(AcceptCall, i32, i64, Vec<u8>),
    Epoll(EpollCall, i32, i64, Vec<EpollReady>),
    Poll(PollCall, i64, Vec<u16>),
    Select(SelectCall, i64, Vec<u8>, Vec<u8>, Vec<u8>),
    Clock(i32, i32, i64, u32),
    Tod(i32, i64, u32),
    Time(i64),
    Getrandom(i64, Vec<u8>),
    Mmap(MmapCall, i64, u64),
    ThreadCreate(i32, u32),
    ThreadExit,
    Fork(i64),
    ForkUnsupported,
    Signal(i32),
    Write(WriteCall, i32, i64),
    Wait(WaitCall, i64, i32, WaitChild),
    Sync(SyncOp, u64, i32),
}

impl Owned {
    /// Calls `f` with the borrowed event this describes.
    fn with_event<R>(&self, f: impl FnOnce(Event<'_>) -> R) -> R {
        match self {
            Owned::Syscall(nr, ret) => f(Event::Syscall { nr: *nr, ret: *ret }),
            Owned::Read(call, fd, ret, data, split) => {
                // Optionally present the data as scattered parts cut at
                // the given points, plus a slack part beyond `len`.
                let mut parts = Vec::new();
                if let Some(cuts) = split {
                    let mut rest: &[u8] = data;
                    for &c in cuts {
                        let (a, b) = rest.split_at(c.min(rest.len()));
                        parts.push(IoSlice::new(a));
                        rest = b;
                    }
                    parts.push(IoSlice::new(rest));
                    parts.push(IoSlice::new(b"slack beyond len"));
                }
                let data = if split.is_some() {
                    Bytes::Scattered {
                        parts: &parts,
                        len: data.len(),
                    }
                } else {
                    Bytes::Flat(data)
                };
                f(Event::Read {
                    call: *call,
                    fd: *fd,
                    ret: *ret,
                    data,
                })
            }
            Owned::Recv(call, fd, ret, data, addr, flags, control) => f(Event::Recv {
                call: *call,
                fd: *fd,
                ret: *ret,
                data: Bytes::Flat(data),
                addr,
                flags: *flags,
                control,
            }),
            Owned::RecvMmsg(fd, ret, msgs) => {
                let msgs: Vec<RecvMsg<'_>> = msgs
                    .iter()
                    .map(|(data, addr, flags, control)| RecvMsg {
                        data: Bytes::Flat(data),
                        addr,
                        flags: *flags,
                        control,
                    })
                    .collect();
                f(Event::RecvMmsg {
                    fd: *fd,
                    ret: *ret,
                    msgs: List::new(&msgs),
                })
            }
            Owned::Accept(call, fd, ret, addr) => f(Event::Accept {
                call: *call,
                fd: *fd,
                ret: *ret,
                addr,
            }),
            Owned::Epoll(call, epfd, ret, ready) => f(Event::EpollWait {
                call: *call,
                epfd: *epfd,
                ret: *ret,
                ready: List::new(ready),
            }),
            Owned::Poll(call, ret, revents) => f(Event::Poll {
                call: *call,
                ret: *ret,
                revents: List::new(revents),
            }),
            Owned::Select(call, ret, r, w, e) => f(Event::Select {
                call: *call,
                ret: *ret,
                readfds: r,
                writefds: w,
                exceptfds: e,
            }),
            Owned::Clock(clock, ret, sec, nsec) => f(Event::ClockGettime {
                clock: *clock,
                ret: *ret,
                sec: *sec,
                nsec: *nsec,
            }),
            Owned::Tod(ret, sec, usec) => f(Event::Gettimeofday {
                ret: *ret,
                sec: *sec,
                usec: *usec,
            }),
            Owned::Time(sec) => f(Event::Time { sec: *sec }),
            Owned::Getrandom(ret, data) => f(Event::Getrandom {
                ret: *ret,
                data: Bytes::Flat(data),
            }),
            Owned::Mmap(call, ret, len) => f(Event::Mmap {
                call: *call,
                ret: *ret,
                len: *len,
            }),
            Owned::ThreadCreate(ret, child) => f(Event::ThreadCreate {
                ret: *ret,
                child: *child,
            }),
            Owned::ThreadExit => f(Event::ThreadExit),
            Owned::Fork(ret) => f(Event::Fork { ret: *ret }),
            Owned::ForkUnsupported => f(Event::ForkUnsupported),
            Owned::Signal(signo) => f(Event::Signal { signo: *signo }),
            Owned::Write(call, fd, ret) => f(Event::Write {
                call: *call,
                fd: *fd,
                ret: *ret,
            }),
            Owned::Wait(call, ret, status, child) => f(Event::Wait {
                call: *call,
                ret: *ret,
                status: *status,
                child: *child,
            }),
            Owned::Sync(op, obj, ret) => f(Event::Sync {
                op: *op,
                obj: *obj,
                ret: *ret,
            }),
        }
    }
}

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..max)
}

fn pick<T: Copy + std::fmt::Debug + 'static>(all: &'static [T]) -> impl Strategy<Value = T> {
    prop::sample::select(all)
}

fn owned_event() -> impl Strategy<Value = Owned> {
    prop_oneof![
        (any::<u32>(), any::<i64>()).prop_map(|(n, r)| Owned::Syscall(n, r)),
        (
            pick(ReadCall::ALL),
            any::<i32>(),
            any::<i64>(),
            bytes(300),
            prop::option::of(prop::collection::vec(0usize..64, 0..4))
        )
            .prop_map(|(c, fd, r, d, s)| Owned::Read(c, fd, r, d, s)),
        (
            pick(RecvCall::ALL),
            any::<i32>(),
            any::<i64>(),
            bytes(200),
            bytes(28),
            any::<i32>(),
            bytes(40)
        )
            .prop_map(|(c, fd, r, d, a, fl, ct)| Owned::Recv(c, fd, r, d, a, fl, ct)),
        (
            any::<i32>(),
            any::<i64>(),
            prop::collection::vec((bytes(64), bytes(16), any::<i32>(), bytes(16)), 0..6)
        )
            .prop_map(|(fd, r, m)| Owned::RecvMmsg(fd, r, m)),
        (pick(AcceptCall::ALL), any::<i32>(), any::<i64>(), bytes(28))
            .prop_map(|(c, fd, r, a)| Owned::Accept(c, fd, r, a)),
        (
            pick(EpollCall::ALL),
            any::<i32>(),
            any::<i64>(),
            prop::collection::vec(
                (any::<u32>(), any::<u64>()).prop_map(|(events, data)| EpollReady { events, data }),
                0..20
            )
        )
            .prop_map(|(c, fd, r, v)| Owned::Epoll(c, fd, r, v)),
        (
            pick(PollCall::ALL),
            any::<i64>(),
            prop::collection::vec(any::<u16>(), 0..20)
        )
            .prop_map(|(c, r, v)| Owned::Poll(c, r, v)),
        (
            pick(SelectCall::ALL),
            any::<i64>(),
            bytes(128),
            bytes(128),
            bytes(128)
        )
            .prop_map(|(c, r, a, b, e)| Owned::Select(c, r, a, b, e)),
        (any::<i32>(), any::<i32>(), any::<i64>(), any::<u32>())
            .prop_map(|(c, r, s, n)| Owned::Clock(c, r, s, n)),
        (any::<i32>(), any::<i64>(), any::<u32>()).prop_map(|(r, s, u)| Owned::Tod(r, s, u)),
        any::<i64>().prop_map(Owned::Time),
        (any::<i64>(), bytes(256)).prop_map(|(r, d)| Owned::Getrandom(r, d)),
        (pick(MmapCall::ALL), any::<i64>(), any::<u64>())
            .prop_map(|(c, r, l)| Owned::Mmap(c, r, l)),
        (any::<i32>(), any::<u32>()).prop_map(|(r, c)| Owned::ThreadCreate(r, c)),
        Just(Owned::ThreadExit),
        any::<i64>().prop_map(Owned::Fork),
        Just(Owned::ForkUnsupported),
        any::<i32>().prop_map(Owned::Signal),
        (pick(WriteCall::ALL), any::<i32>(), any::<i64>())
            .prop_map(|(c, fd, r)| Owned::Write(c, fd, r)),
        (
            pick(WaitCall::ALL),
            any::<i64>(),
            any::<i32>(),
            (any::<i32>(), any::<u32>(), any::<i32>()).prop_map(|(pid, uid, code)| WaitChild {
                pid,
                uid,
                code
            })
        )
            .prop_map(|(c, r, st, ch)| Owned::Wait(c, r, st, ch)),
        (pick(SyncOp::ALL), any::<u64>(), any::<i32>()).prop_map(|(o, a, r)| Owned::Sync(o, a, r)),
    ]
}

/// Events with their sequence numbers (strictly increasing, sometimes with
/// big jumps) and time deltas.
fn record_list() -> impl Strategy<Value = Vec<(u64, u64, Owned)>> {
    (
        any::<u32>(),
        prop::collection::vec(
            (
                prop_oneof![3 => 1u64..3, 1 => 1u64..1 << 40],
                prop_oneof![any::<u64>(), 0u64..1000],
                owned_event(),
            ),
            0..40,
        ),
    )
        .prop_map(|(start, items)| {
            let mut seq = u64::from(start);
            items
                .into_iter()
                .map(|(step, dt, ev)| {
                    seq += step;
                    (seq, dt, ev)
                })
                .collect()
        })
}

/// Encodes `records` into one batch; panics if they do not fit.
fn encode(log_id: u32, records: &[(u64, u64, Owned)]) -> Vec<u8> {
    let mut buf = vec![0u8; 1 << 20];
    let mut w = BatchWriter::new(&mut buf, log_id).unwrap();
    for (seq, dt, owned) in records {
        owned
            .with_event(|event| {
                w.push(&Record {
                    seq: *seq,
                    time_delta_ns: *dt,
                    event,
                })
            })
            .unwrap();
    }
    w.finish().to_vec()
}

/// Decodes every record of a batch, reporting the first error.
fn decode_all(batch: &[u8]) -> Result<usize, DecodeError> {
    let mut n = 0;
    for r in BatchReader::new(batch)? {
        r?;
        n += 1;
    }
    Ok(n)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn every_event_round_trips(log_id: u32, records in record_list()) {
        let batch = encode(log_id, &records);
        let mut reader = BatchReader::new(&batch).unwrap();
        prop_assert_eq!(reader.header().log_id, log_id);
        prop_assert_eq!(reader.header().record_count as usize, records.len());
        for (seq, dt, owned) in &records {
            let got = reader.next_record().unwrap().expect("record missing");
            prop_assert_eq!(got.seq, *seq);
            prop_assert_eq!(got.time_delta_ns, *dt);
            owned.with_event(|want| {
                prop_assert_eq!(got.event, want);
                prop_assert_eq!(got.event.tag(), want.tag());
                Ok(())
            })?;
        }
        prop_assert_eq!(reader.next_record(), Ok(None));
    }

    #[test]
    fn writer_stays_in_its_buffer_and_reports_full(
        cap in HEADER_LEN..600,
        records in record_list(),
    ) {
        const GUARD: u8 = 0xa5;
        let mut backing = vec![GUARD; cap + 64];
        let accepted;
        let batch = {
            let mut w = BatchWriter::new(&mut backing[..cap], 9).unwrap();
            let mut n = 0;
            for (seq, dt, owned) in &records {
                let before = w.len();
                let res = owned.with_event(|event| w.push(&Record { seq: *seq, time_delta_ns: *dt, event }));
                match res {
                    Ok(()) => n += 1,
                    Err(EncodeError::Full) => {
                        prop_assert_eq!(w.len(), before);
                        // A full batch stays full for this record.
                        break;
                    }
                    Err(e) => return Err(TestCaseError::fail(format!("unexpected {e}"))),
                }
                prop_assert!(w.len() <= cap);
            }
            accepted = n;
            w.finish().to_vec()
        };
        prop_assert!(backing[cap..].iter().all(|&b| b == GUARD));
        prop_assert!(batch.len() <= cap);
        prop_assert_eq!(decode_all(&batch), Ok(accepted));
        // The record refused as full really needs more than the space left:
        // measure its encoded size right after its predecessor.
        if accepted < records.len() {
            let size = if accepted == 0 {
                encode(9, &records[..1]).len() - HEADER_LEN
            } else {
                encode(9, &records[accepted - 1..=accepted]).len()
                    - encode(9, &records[accepted - 1..accepted]).len()
            };
            prop_assert!(size > cap - batch.len(), "size {} free {}", size, cap - batch.len());
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(data in bytes(512)) {
        let _ = decode_all(&data);
        if let Ok((r, _)) = BatchReader::split_first(&data) {
            for rec in r { let _ = rec; }
        }
    }

    #[test]
    fn arbitrary_payload_with_valid_crc_never_panics(
        count in 0u32..50,
        first_seq: u64,
        payload in bytes(400),
    ) {
        let batch = with_header(7, count, first_seq, &payload);
        if let Ok(n) = decode_all(&batch) {
            prop_assert_eq!(n, count as usize);
        }
    }

    #[test]
    fn any_bit_flip_is_detected(records in record_list(), pick: prop::sample::Index, bit in 0u8..8) {
        let mut batch = encode(3, &records);
        let at = pick.index(batch.len());
        batch[at] ^= 1 << bit;
        prop_assert!(decode_all(&batch).is_err());
    }

    #[test]
    fn any_truncation_is_detected(records in record_list(), pick: prop::sample::Index) {
        let batch = encode(3, &records);
        let cut = pick.index(batch.len());
        prop_assert!(decode_all(&batch[..cut]).is_err());
    }

    #[test]
    fn writer_rejects_non_increasing_sequence(a in 1u64..1000, b in 0u64..1000) {
        let mut buf = [0u8; 256];
        let mut w = BatchWriter::new(&mut buf, 0).unwrap();
        w.push(&Record { seq: a, time_delta_ns: 0, event: Event::ThreadExit }).unwrap();
        let res = w.push(&Record { seq: b, time_delta_ns: 0, event: Event::ThreadExit });
        if b > a {
            prop_assert_eq!(res, Ok(()));
        } else {
            prop_assert_eq!(res, Err(EncodeError::SeqNotIncreasing { prev: a, next: b }));
        }
    }
}

/// Builds a batch with a correct header and CRC around `payload`.
fn with_header(log_id: u32, count: u32, first_seq: u64, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(HEADER_LEN + payload.len());
    b.extend_from_slice(b"RRCL");
    b.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    b.extend_from_slice(&0u16.to_le_bytes());
    b.extend_from_slice(&log_id.to_le_bytes());
    b.extend_from_slice(&count.to_le_bytes());
    b.extend_from_slice(&first_seq.to_le_bytes());
    b.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    let mut h = crc32fast::Hasher::new();
    h.update(&b);
    h.update(payload);
    b.extend_from_slice(&h.finalize().to_le_bytes());
    b.extend_from_slice(payload);
    b
}

#[test]
fn header_errors_are_specific() {
    let good = encode(1, &[(5, 0, Owned::Time(1))]);
    // Version 1 (before writes and waits were recorded) and a later one.
    for old_or_new in [1, FORMAT_VERSION + 1] {
        let mut v = good.clone();
        v[4..6].copy_from_slice(&old_or_new.to_le_bytes());
        assert_eq!(
            BatchReader::new(&v).err(),
            Some(DecodeError::UnsupportedVersion {
                found: old_or_new,
                supported: 2
            })
        );
    }
    let mut v = good.clone();
    v[0] = b'X';
    assert!(matches!(
        BatchReader::new(&v),
        Err(DecodeError::BadMagic { .. })
    ));
    let mut v = good.clone();
    v[6] = 1;
    assert!(matches!(
        BatchReader::new(&v),
        Err(DecodeError::ReservedFlags { flags: 1 })
    ));
    let mut v = good.clone();
    v[24..28].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        BatchReader::new(&v),
        Err(DecodeError::Oversized { .. })
    ));
    let mut v = good.clone();
    v.push(0);
    assert!(matches!(
        BatchReader::new(&v),
        Err(DecodeError::TrailingBytes { count: 1 })
    ));
    let last = good.len() - 1;
    let mut v = good;
    v[last] ^= 0xff;
    assert!(matches!(
        BatchReader::new(&v),
        Err(DecodeError::Checksum { .. })
    ));
}

#[test]
fn structural_errors_behind_a_valid_crc() {
    // Unknown tag.
    let b = with_header(1, 1, 0, &[0xff, 0]);
    assert_eq!(
        decode_all(&b),
        Err(DecodeError::UnknownTag {
            tag: 0xff,
            offset: HEADER_LEN
        })
    );
    // Extra bytes after the declared records.
    let b = with_header(1, 1, 0, &[rrc_rr::log::tag::THREAD_EXIT, 0, 0]);
    assert_eq!(decode_all(&b), Err(DecodeError::TrailingBytes { count: 1 }));
    // A sequence gap that overflows.
    let mut p = vec![
        rrc_rr::log::tag::THREAD_EXIT,
        0,
        rrc_rr::log::tag::THREAD_EXIT,
    ];
    p.extend_from_slice(&[
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01, 0,
    ]);
    let b = with_header(1, 2, 5, &p);
    assert_eq!(decode_all(&b), Err(DecodeError::SeqOverflow { prev: 5 }));
    // A byte string longer than the payload.
    let b = with_header(
        1,
        1,
        0,
        &[rrc_rr::log::tag::GETRANDOM, 0, 0, 0x80, 0x80, 0x04],
    );
    assert!(matches!(decode_all(&b), Err(DecodeError::Truncated { .. })));
    // A list count far beyond the payload.
    let b = with_header(1, 1, 0, &[rrc_rr::log::tag::POLL, 0, 0, 0xff, 0xff, 0x03]);
    assert!(matches!(decode_all(&b), Err(DecodeError::Truncated { .. })));
    // An fd that does not fit in i32.
    let b = with_header(
        1,
        1,
        0,
        &[
            rrc_rr::log::tag::READ,
            0,
            0xff,
            0xff,
            0xff,
            0xff,
            0x7f,
            0,
            0,
        ],
    );
    assert!(matches!(
        decode_all(&b),
        Err(DecodeError::OutOfRange { what: "fd", .. })
    ));
}

#[test]
fn scattered_data_shorter_than_claimed_is_refused() {
    let parts = [IoSlice::new(b"abc")];
    let mut buf = [0u8; 128];
    let mut w = BatchWriter::new(&mut buf, 0).unwrap();
    let res = w.push(&Record {
        seq: 1,
        time_delta_ns: 0,
        event: Event::Read {
            call: ReadCall::Readv,
            fd: 3,
            ret: 4,
            data: Bytes::Scattered {
                parts: &parts,
                len: 4,
            },
        },
    });
    assert_eq!(
        res,
        Err(EncodeError::ScatterShort {
            len: 4,
            available: 3
        })
    );
    assert!(w.is_empty());
}

#[test]
fn writes_and_waits_have_their_tags_and_layout() {
    use rrc_rr::log::tag;
    let records = [
        (
            1,
            0,
            Owned::Write(WriteCall::Write, 4, -i64::from(libc::EAGAIN)),
        ),
        (2, 0, Owned::Write(WriteCall::SendFile, 5, 300)),
        (
            3,
            0,
            Owned::Wait(WaitCall::Waitpid, 0, 0, WaitChild::default()),
        ),
        (
            4,
            0,
            Owned::Wait(
                WaitCall::Waitid,
                0,
                3,
                WaitChild {
                    pid: 77,
                    uid: 0,
                    code: libc::CLD_EXITED,
                },
            ),
        ),
    ];
    let batch = encode(1, &records);
    assert_eq!(
        &batch[HEADER_LEN..],
        &[
            // write: fd 4, ret -EAGAIN (zigzag 21)
            tag::WRITE,
            0,
            8,
            21,
            // sendfile: gap 0, delta 0, fd 5, ret 300 (zigzag 600)
            tag::WRITE + 5,
            0,
            0,
            10,
            0xd8,
            0x04,
            // waitpid: ret 0, status 0, pid 0, uid 0, code 0
            tag::WAIT + 1,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            // waitid: ret 0, status 3, pid 77, uid 0, code CLD_EXITED (1)
            tag::WAIT + 4,
            0,
            0,
            0,
            6,
            154,
            1,
            0,
            2,
        ][..]
    );
    // Past the last call of each family: unknown tags.
    for t in [tag::WRITE + 6, tag::WAIT + 5] {
        let b = with_header(1, 1, 0, &[t, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            decode_all(&b),
            Err(DecodeError::UnknownTag {
                tag: t,
                offset: HEADER_LEN
            })
        );
    }
}
