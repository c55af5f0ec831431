//! The shared-memory SPSC ring: a model check, a two-thread stress run,
//! a cross-process run over fork, and the full/recover and set life cycle.

use std::collections::VecDeque;
use std::os::fd::AsFd;
use std::time::Duration;

use proptest::prelude::*;
use rrc_rr::ring::{
    MESSAGE_OVERHEAD, RingError, RingSet, SharedRing, SlotState, new_eventfd, wait_eventfd,
};

#[derive(Debug, Clone)]
enum Op {
    Push(usize),
    Pop,
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(
        prop_oneof![3 => (0usize..120).prop_map(Op::Push), 2 => Just(Op::Pop)],
        0..400,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Random pushes and pops, wrapping many times, against a queue model
    /// with the same byte accounting.
    #[test]
    fn ring_matches_queue_model(cap_log2 in 6u32..9, ops in ops()) {
        let cap = 1u64 << cap_log2;
        let ring = SharedRing::create(cap).unwrap();
        let mut p = ring.producer().unwrap();
        let mut c = ring.consumer().unwrap();
        let mut model: VecDeque<Vec<u8>> = VecDeque::new();
        let mut used = 0u64;
        let mut counter = 0u8;
        let mut out = Vec::new();
        for op in ops {
            match op {
                Op::Push(len) => {
                    let msg: Vec<u8> = (0..len).map(|_| { counter = counter.wrapping_add(1); counter }).collect();
                    let need = (MESSAGE_OVERHEAD + len) as u64;
                    let fits = used + need <= cap;
                    prop_assert_eq!(p.try_push(&msg), fits);
                    if fits {
                        used += need;
                        model.push_back(msg);
                    }
                }
                Op::Pop => {
                    let got = c.pop_into(&mut out).unwrap();
                    match model.pop_front() {
                        Some(want) => {
                            prop_assert!(got);
                            prop_assert_eq!(&out, &want);
                            used -= (MESSAGE_OVERHEAD + want.len()) as u64;
                        }
                        None => prop_assert!(!got),
                    }
                }
            }
        }
        let mut rest = Vec::new();
        c.drain(&mut out, |m| rest.push(m.to_vec())).unwrap();
        prop_assert_eq!(rest, Vec::from(model));
        prop_assert!(ring.is_empty());
    }
}

/// Message `i`: its index, a payload whose length and bytes derive from
/// it, and a CRC of both.
fn make_message(i: u64, buf: &mut [u8; 96]) -> usize {
    let len = 8 + (i % 61) as usize;
    buf[..8].copy_from_slice(&i.to_le_bytes());
    for (k, b) in buf[8..len].iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(31).wrapping_add(k as u8);
    }
    let crc = crc32fast::hash(&buf[..len]);
    buf[len..len + 4].copy_from_slice(&crc.to_le_bytes());
    len + 4
}

fn check_message(expect: u64, msg: &[u8]) {
    let mut want = [0u8; 96];
    let len = make_message(expect, &mut want);
    assert_eq!(msg, &want[..len], "message {expect} differs");
    let (body, crc) = msg.split_at(msg.len() - 4);
    assert_eq!(crc32fast::hash(body).to_le_bytes(), crc);
}

#[test]
fn two_threads_pass_a_million_messages_in_order() {
    const N: u64 = 1_000_000;
    let ring = SharedRing::create(4096).unwrap();
    let mut p = ring.producer().unwrap();
    let mut c = ring.consumer().unwrap();
    std::thread::scope(|s| {
        s.spawn(move || {
            let mut buf = [0u8; 96];
            for i in 0..N {
                let len = make_message(i, &mut buf);
                while !p.try_push(&buf[..len]) {
                    std::hint::spin_loop();
                    std::thread::yield_now();
                }
            }
        });
        let mut next = 0u64;
        let mut scratch = Vec::new();
        while next < N {
            let n = c
                .drain(&mut scratch, |m| {
                    check_message(next, m);
                    next += 1;
                })
                .unwrap();
            if n == 0 {
                std::thread::yield_now();
            }
        }
    });
    assert!(ring.is_empty());
}

#[test]
fn full_ring_rejects_pushes_and_recovers() {
    let ring = SharedRing::create(64).unwrap();
    let mut p = ring.producer().unwrap();
    let mut c = ring.consumer().unwrap();
    assert_eq!(p.max_message_len(), 60);
    assert!(!p.try_push(&[0; 61]), "larger than the ring");
    // 5 × (4 + 8) = 60 bytes; a sixth does not fit in the remaining 4.
    for i in 0..5u8 {
        assert!(p.try_push(&[i; 8]));
    }
    assert!(!p.try_push(&[9; 8]));
    assert!(!p.try_push(&[9; 1]));
    assert!(p.try_push(&[]), "an empty message needs only its length");
    assert!(!p.try_push(&[]));
    let mut out = Vec::new();
    assert!(c.pop_into(&mut out).unwrap());
    assert_eq!(out, [0; 8]);
    // Freed 12 bytes: one 8-byte message fits again, wrapping the end.
    assert!(p.try_push(&[7; 8]));
    assert!(!p.try_push(&[7; 1]));
    let mut all = Vec::new();
    assert_eq!(c.drain(&mut out, |m| all.push(m.to_vec())).unwrap(), 6);
    assert_eq!(
        all,
        [
            vec![1; 8],
            vec![2; 8],
            vec![3; 8],
            vec![4; 8],
            vec![],
            vec![7; 8]
        ]
    );
    assert!(p.try_push(&[1; 60]), "whole ring available after draining");
}

#[test]
fn each_end_can_be_claimed_once() {
    let ring = SharedRing::create(256).unwrap();
    let p = ring.producer().unwrap();
    assert!(matches!(
        ring.producer(),
        Err(RingError::Claimed { role: "producer" })
    ));
    let c = ring.consumer().unwrap();
    assert!(matches!(
        ring.consumer(),
        Err(RingError::Claimed { role: "consumer" })
    ));
    drop(p);
    drop(c);
    let mut p = ring.producer().unwrap();
    assert!(p.try_push(b"after reclaim"));
    let mut c = ring.consumer().unwrap();
    let mut out = Vec::new();
    assert!(c.pop_into(&mut out).unwrap());
    assert_eq!(out, b"after reclaim");
}

#[test]
fn capacity_and_fd_validation() {
    assert!(matches!(
        SharedRing::create(100),
        Err(RingError::BadCapacity(100))
    ));
    assert!(matches!(
        SharedRing::create(32),
        Err(RingError::BadCapacity(32))
    ));
    // A memfd that was never sealed is refused.
    let fd = rustix::fs::memfd_create("unsealed", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    rustix::fs::ftruncate(&fd, 8192).unwrap();
    assert!(matches!(SharedRing::from_fd(fd), Err(RingError::Unsealed)));
    // A sealed one with no ring in it has no magic.
    let fd = rustix::fs::memfd_create(
        "empty",
        rustix::fs::MemfdFlags::CLOEXEC | rustix::fs::MemfdFlags::ALLOW_SEALING,
    )
    .unwrap();
    rustix::fs::ftruncate(&fd, 8192).unwrap();
    rustix::fs::fcntl_add_seals(
        &fd,
        rustix::fs::SealFlags::SHRINK | rustix::fs::SealFlags::GROW,
    )
    .unwrap();
    assert!(matches!(
        SharedRing::from_fd(fd),
        Err(RingError::BadMagic { what: "ring", .. })
    ));
    // A ring set's fd is not a ring either.
    let set = RingSet::create(2, 1024).unwrap();
    let dup = set.fd().try_clone_to_owned().unwrap();
    assert!(matches!(
        SharedRing::from_fd(dup),
        Err(RingError::BadMagic { what: "ring", .. })
    ));
}

#[test]
fn ring_set_slot_life_cycle() {
    let set = RingSet::create(3, 1024).unwrap();
    let agent = RingSet::from_fd(set.fd().try_clone_to_owned().unwrap()).unwrap();
    assert_eq!(agent.slot_count(), 3);
    assert_eq!(agent.ring_capacity(), 1024);
    let a = set.claim_slot(10, 1000).unwrap();
    let b = set.claim_slot(11, 1001).unwrap();
    let c = set.claim_slot(12, 1002).unwrap();
    assert_eq!((a, b, c), (0, 1, 2));
    assert!(matches!(
        set.claim_slot(13, 1003),
        Err(RingError::NoFreeSlot { count: 3 })
    ));
    let info = agent.slot(b).unwrap();
    assert_eq!(
        (info.state, info.log_id, info.tid),
        (SlotState::Active, 11, 1001)
    );
    {
        let mut p = set.producer(b).unwrap();
        assert!(p.try_push(b"last words"));
    }
    set.retire_slot(b).unwrap();
    assert!(matches!(
        set.retire_slot(b),
        Err(RingError::SlotState { .. })
    ));
    // Not drained yet: the agent may not free it.
    assert!(agent.release_slot(b).is_err());
    let mut out = Vec::new();
    assert!(agent.consumer(b).unwrap().pop_into(&mut out).unwrap());
    assert_eq!(out, b"last words");
    agent.release_slot(b).unwrap();
    assert_eq!(agent.slot(b).unwrap().state, SlotState::Free);
    // The freed slot is reused, continuing from where the ring was.
    assert_eq!(set.claim_slot(14, 1004).unwrap(), b);
    assert!(set.producer(b).unwrap().try_push(b"new owner"));
    assert!(agent.consumer(b).unwrap().pop_into(&mut out).unwrap());
    assert_eq!(out, b"new owner");
    assert!(matches!(
        set.producer(3),
        Err(RingError::NoSuchSlot { index: 3, count: 3 })
    ));
}

/// A forked child records into its slot of a ring set while the parent,
/// through its own mapping of the fd, drains it, woken by an eventfd.
#[test]
fn child_process_produces_parent_consumes() {
    const N: u64 = 200_000;
    let set = RingSet::create(4, 1 << 14).unwrap();
    let agent = RingSet::from_fd(set.fd().try_clone_to_owned().unwrap()).unwrap();
    let efd = new_eventfd().unwrap();

    // SAFETY: the child only touches the shared mapping, the stack and raw
    // system calls (no allocation, no locks), then `_exit`s.
    match unsafe { nix::unistd::fork() }.unwrap() {
        nix::unistd::ForkResult::Child => {
            let code = (|| {
                let slot = set.claim_slot(42, std::process::id()).ok()?;
                let mut p = set.producer(slot).ok()?;
                p.set_wake_fd(Some(efd.as_fd()));
                let mut buf = [0u8; 96];
                for i in 0..N {
                    let len = make_message(i, &mut buf);
                    while !p.try_push(&buf[..len]) {
                        std::hint::spin_loop();
                    }
                }
                drop(p);
                set.retire_slot(slot).ok()
            })()
            .map_or(1, |()| 0);
            // SAFETY: terminates the child without running the parent's
            // destructors or atexit handlers.
            unsafe { libc::_exit(code) };
        }
        nix::unistd::ForkResult::Parent { child } => {
            // Find the child's slot through the directory.
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            let slot = loop {
                let found = (0..agent.slot_count()).find(|&i| agent.slot(i).unwrap().log_id == 42);
                if let Some(i) = found {
                    break i;
                }
                assert!(std::time::Instant::now() < deadline, "child never claimed");
                std::thread::sleep(Duration::from_millis(1));
            };
            let mut c = agent.consumer(slot).unwrap();
            let mut next = 0u64;
            let mut scratch = Vec::new();
            let mut sleeps = 0;
            while next < N {
                c.drain(&mut scratch, |m| {
                    check_message(next, m);
                    next += 1;
                })
                .unwrap();
                if next < N && c.ready_to_sleep() {
                    sleeps += 1;
                    let woke = wait_eventfd(efd.as_fd(), Some(Duration::from_secs(10))).unwrap();
                    assert!(woke, "no wake-up with {next} of {N} messages received");
                }
            }
            let status = nix::sys::wait::waitpid(child, None).unwrap();
            assert_eq!(status, nix::sys::wait::WaitStatus::Exited(child, 0));
            assert_eq!(agent.slot(slot).unwrap().state, SlotState::Exited);
            drop(c);
            agent.release_slot(slot).unwrap();
            eprintln!("parent slept {sleeps} times");
        }
    }
}
