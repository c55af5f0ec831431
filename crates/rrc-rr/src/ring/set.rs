//! Many rings in one memfd: one per thread slot, found through a small
//! directory, so the agent maps a single fd and sees every thread.
//!
//! # Layout
//!
//! | offset             | size | field                                   |
//! |-------------------:|-----:|-----------------------------------------|
//! | 0                  | 8    | magic `RRCRSET\0`                       |
//! | 8                  | 4    | layout version (3)                      |
//! | 12                 | 4    | slot count N                            |
//! | 16                 | 8    | ring capacity (same for every ring)     |
//! | 24                 | 8    | ring stride                             |
//! | 32                 | 8    | offset of ring 0                        |
//! | 40                 | 8    | last global sequence number handed out  |
//! | 48                 | 8    | last thread log id handed out           |
//! | 56                 | 4    | flags (see [`EAGER`])                   |
//! | 60                 | 4    | count of things that went unrecorded    |
//! | 64 + 64·i          | 64   | slot i: state u32, log id u32, tid u32  |
//! | offset + stride·i  |      | ring i (see [`crate::ring`])            |
//!
//! Rings start on page boundaries (stride and offset are multiples of 4096)
//! so different threads' rings never share a page or a cache line.
//!
//! The top bit of the sequence counter (never reached by counting) marks a
//! copy restored from a checkpoint for replay: see [`request_replay`].
//!
//! The two counters are the recording's, shared by every program image
//! that uses the set: a program that `exec`s another (a shell script, a
//! launcher) goes on numbering records and threads where it left off.
//!
//! The flags are the creator's requests to the recorder, fixed at
//! creation; the unrecorded counter is the recorder's report back: threads
//! that found no free ring, which leave nothing at all in the log, so that
//! the rrc process learns that the log does not cover everything even
//! though nothing in it says so. (What else cannot be recorded, a child
//! process or an event too large for a ring, leaves a record in its place
//! that says so.)
//!
//! # Slot life cycle
//!
//! `Free` → `Claiming` → `Active`, by the application thread that takes the
//! slot: it wins the `Free → Claiming` compare-and-swap, fills in its log
//! id and tid, and publishes them with a Release store of `Active`, so an
//! agent that reads `Active` with Acquire sees them. At thread exit the
//! thread marks it `Exited`; once the agent has drained the ring it puts
//! the slot back to `Free`. Ring positions are not reset: the next
//! producer carries on from the counters the last one left.

use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use super::shm::SharedMemory;
use super::{
    Consumer, Producer, RING_HEADER_LEN, RingError, RingRef, check_capacity, ring_region_len,
};

/// Magic number at the start of a ring set: `RRCRSET\0`.
pub const SET_MAGIC: u64 = u64::from_le_bytes(*b"RRCRSET\0");
/// Layout version of the ring set directory.
pub const SET_VERSION: u32 = 3;
/// Flag: the recorder pushes every record to its ring as soon as it is
/// made, instead of batching a thread's records until a flush point (for
/// replication, where a reply may wait for any thread's records).
pub const EAGER: u32 = 1 << 0;
/// Every flag this layout defines.
pub const KNOWN_FLAGS: u32 = EAGER;
/// Set in the last-sequence counter of a checkpointed copy of the set, by
/// [`mark_copy`]: the program restored from it replays.
pub const REPLAY_REQUESTED: u64 = 1 << 63;
/// Set in the last-sequence counter of a checkpointed copy of the set, by
/// [`mark_copy`]: the program restored from it stops recording and runs
/// on (nobody drains its rings).
pub const STOP_REQUESTED: u64 = 1 << 62;
const MARKS: u64 = REPLAY_REQUESTED | STOP_REQUESTED;

/// What a copy of a recording's program restored from a checkpoint is to
/// do, marked in its rings' sequence counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyMark {
    /// Replay the log (its configuration is where the rings' descriptor
    /// was).
    Replay,
    /// Stop recording and run on.
    Stop,
}

impl CopyMark {
    fn of(counter: u64) -> Option<CopyMark> {
        if counter & REPLAY_REQUESTED != 0 {
            Some(CopyMark::Replay)
        } else if counter & STOP_REQUESTED != 0 {
            Some(CopyMark::Stop)
        } else {
            None
        }
    }

    fn bit(self) -> u64 {
        match self {
            CopyMark::Replay => REPLAY_REQUESTED,
            CopyMark::Stop => STOP_REQUESTED,
        }
    }
}
/// Most slots a set may have.
pub const MAX_SLOTS: usize = 1 << 16;

const PAGE: usize = 4096;
const DIR_HEADER_LEN: usize = 64;
const SLOT_LEN: usize = 64;

#[repr(C, align(64))]
struct SetHeader {
    magic: AtomicU64,
    version: AtomicU32,
    slot_count: AtomicU32,
    ring_capacity: AtomicU64,
    ring_stride: AtomicU64,
    rings_offset: AtomicU64,
    last_seq: AtomicU64,
    last_log_id: AtomicU64,
    flags: AtomicU32,
    unrecorded: AtomicU32,
}

#[repr(C, align(64))]
struct SlotDesc {
    state: AtomicU32,
    log_id: AtomicU32,
    tid: AtomicU32,
    _pad: [AtomicU32; 13],
}

const _: () = {
    assert!(size_of::<SetHeader>() == DIR_HEADER_LEN);
    assert!(size_of::<SlotDesc>() == SLOT_LEN);
};

const FREE: u32 = 0;
const CLAIMING: u32 = 1;
const ACTIVE: u32 = 2;
const EXITED: u32 = 3;

/// Where a slot is in its life cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotState {
    /// Unused.
    Free,
    /// Being taken by a thread; its ids are not published yet.
    Claiming,
    /// In use by a live thread.
    Active,
    /// Its thread exited; the ring may still hold data to drain.
    Exited,
    /// A value no writer produces (a broken peer).
    Invalid(u32),
}

impl SlotState {
    fn from_raw(v: u32) -> Self {
        match v {
            FREE => SlotState::Free,
            CLAIMING => SlotState::Claiming,
            ACTIVE => SlotState::Active,
            EXITED => SlotState::Exited,
            other => SlotState::Invalid(other),
        }
    }
}

/// A snapshot of one slot's directory entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotInfo {
    /// Life-cycle state.
    pub state: SlotState,
    /// Thread log id of the owner (meaningful when `Active` or `Exited`).
    pub log_id: u32,
    /// Kernel thread id of the owner (likewise).
    pub tid: u32,
}

fn round_up(v: usize, to: usize) -> usize {
    v.div_ceil(to) * to
}

struct Geometry {
    stride: usize,
    rings_offset: usize,
    total: usize,
}

/// The layout of `slots` rings of `capacity` bytes, if both are allowed.
fn checked_geometry(slots: usize, capacity: u64) -> Result<Geometry, RingError> {
    check_capacity(capacity)?;
    if slots == 0 || slots > MAX_SLOTS {
        return Err(RingError::NoSuchSlot {
            index: slots,
            count: MAX_SLOTS,
        });
    }
    Ok(geometry(slots, capacity))
}

fn geometry(slots: usize, capacity: u64) -> Geometry {
    let stride = round_up(ring_region_len(capacity), PAGE);
    let rings_offset = round_up(DIR_HEADER_LEN + SLOT_LEN * slots, PAGE);
    Geometry {
        stride,
        rings_offset,
        total: rings_offset + stride * slots,
    }
}

/// N rings of equal capacity in one sealed memfd.
pub struct RingSet {
    shm: SharedMemory,
    slots: usize,
    capacity: u64,
    stride: usize,
    rings_offset: usize,
}

impl RingSet {
    /// Creates a set of `slots` rings of `capacity` bytes each, with no
    /// flags.
    pub fn create(slots: usize, capacity: u64) -> Result<Self, RingError> {
        Self::create_with(slots, capacity, 0)
    }

    /// Creates a set of `slots` rings of `capacity` bytes each, with
    /// `flags` (such as [`EAGER`]) for the recorder that attaches to it.
    pub fn create_with(slots: usize, capacity: u64, flags: u32) -> Result<Self, RingError> {
        if flags & !KNOWN_FLAGS != 0 {
            return Err(RingError::UnknownFlags { flags });
        }
        let g = checked_geometry(slots, capacity)?;
        let shm = SharedMemory::create("rrc-ring-set", g.total)?;
        let set = RingSet {
            shm,
            slots,
            capacity,
            stride: g.stride,
            rings_offset: g.rings_offset,
        };
        for i in 0..slots {
            // SAFETY: ring i's region lies inside the fresh mapping (total
            // covers every stride), is page-aligned, and nobody else has
            // the fd yet.
            unsafe { RingRef::init(set.ring_base(i), capacity)? };
        }
        let h = set.header();
        h.version.store(SET_VERSION, Ordering::Relaxed);
        h.slot_count.store(slots as u32, Ordering::Relaxed);
        h.ring_capacity.store(capacity, Ordering::Relaxed);
        h.ring_stride.store(g.stride as u64, Ordering::Relaxed);
        h.rings_offset
            .store(g.rings_offset as u64, Ordering::Relaxed);
        h.flags.store(flags, Ordering::Relaxed);
        // Release: publishes everything above to an Acquire load of magic.
        h.magic.store(SET_MAGIC, Ordering::Release);
        Ok(set)
    }

    /// Maps a set created by [`create`](Self::create) from its fd,
    /// validating the directory against the mapping's size.
    pub fn from_fd(fd: OwnedFd) -> Result<Self, RingError> {
        Self::from_fd_near(fd, 0)
    }

    /// [`from_fd`](Self::from_fd), mapping the set at address `hint` if
    /// that range is free: a recorded program's own mappings then land
    /// where they would without the recording.
    pub fn from_fd_near(fd: OwnedFd, hint: usize) -> Result<Self, RingError> {
        let shm = SharedMemory::open(fd, hint)?;
        if shm.len() < DIR_HEADER_LEN {
            return Err(RingError::TooSmall {
                what: "ring set header",
                len: shm.len(),
                needed: DIR_HEADER_LEN,
            });
        }
        // SAFETY: the mapping is page-aligned and at least a header long;
        // the header is all atomics, so any contents are valid.
        let h = unsafe { &*shm.as_ptr().cast::<SetHeader>() };
        let magic = h.magic.load(Ordering::Acquire);
        if magic != SET_MAGIC {
            return Err(RingError::BadMagic {
                what: "ring set",
                found: magic,
            });
        }
        let version = h.version.load(Ordering::Relaxed);
        if version != SET_VERSION {
            return Err(RingError::Version {
                what: "ring set",
                found: version,
                supported: SET_VERSION,
            });
        }
        // A flag this build does not know asks for something it would not
        // do: better refused than silently ignored.
        let flags = h.flags.load(Ordering::Relaxed);
        if flags & !KNOWN_FLAGS != 0 {
            return Err(RingError::UnknownFlags { flags });
        }
        let slots = h.slot_count.load(Ordering::Relaxed) as usize;
        let capacity = h.ring_capacity.load(Ordering::Relaxed);
        // Recompute the geometry rather than trusting stored offsets; the
        // stored ones must agree.
        let g = checked_geometry(slots, capacity)?;
        if h.ring_stride.load(Ordering::Relaxed) != g.stride as u64
            || h.rings_offset.load(Ordering::Relaxed) != g.rings_offset as u64
        {
            return Err(RingError::Version {
                what: "ring set geometry",
                found: version,
                supported: SET_VERSION,
            });
        }
        if g.total > shm.len() {
            return Err(RingError::TooSmall {
                what: "ring set",
                len: shm.len(),
                needed: g.total,
            });
        }
        Ok(RingSet {
            shm,
            slots,
            capacity,
            stride: g.stride,
            rings_offset: g.rings_offset,
        })
    }

    fn header(&self) -> &SetHeader {
        // SAFETY: the mapping starts with the (aligned, all-atomic) header
        // and outlives `&self`; its size was checked at construction.
        unsafe { &*self.shm.as_ptr().cast::<SetHeader>() }
    }

    fn slot_desc(&self, index: usize) -> Result<&SlotDesc, RingError> {
        if index >= self.slots {
            return Err(RingError::NoSuchSlot {
                index,
                count: self.slots,
            });
        }
        // SAFETY: slot descriptors occupy [64, 64 + 64·N), inside the
        // directory that precedes `rings_offset`; each is 64-byte aligned
        // and all-atomic; the mapping outlives `&self`.
        Ok(unsafe {
            &*self
                .shm
                .as_ptr()
                .add(DIR_HEADER_LEN + SLOT_LEN * index)
                .cast::<SlotDesc>()
        })
    }

    /// Start of ring `index`'s region; `index` must be below `slots`.
    fn ring_base(&self, index: usize) -> *mut u8 {
        debug_assert!(index < self.slots);
        // SAFETY: `rings_offset + stride·index` is within the mapping for
        // every valid index (total = rings_offset + stride·slots was
        // checked against the mapping's length).
        unsafe {
            self.shm
                .as_ptr()
                .add(self.rings_offset + self.stride * index)
        }
    }

    fn ring(&self, index: usize) -> Result<RingRef<'_>, RingError> {
        self.slot_desc(index)?;
        // SAFETY: the region is page-aligned, `stride` bytes long and lives
        // in the mapping owned by `self`; `attach` validates its header,
        // which another process may have damaged.
        unsafe { RingRef::attach(self.ring_base(index), self.stride) }
    }

    /// The memfd, to hand to the other process.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.shm.fd()
    }

    /// The next global sequence number of the recording (from 1), or, in
    /// a copy of the set restored from a checkpoint and marked (see
    /// [`mark_copy`]), what the copy is to do instead: then nothing may be
    /// recorded any more.
    ///
    /// Taking the number and checking for a mark is one atomic operation,
    /// so a checkpoint falls either before it (the number belongs to the
    /// recording) or after it (the restored program learns it is marked).
    pub fn next_seq(&self) -> Result<u64, CopyMark> {
        let prev = self.header().last_seq.fetch_add(1, Ordering::AcqRel);
        match CopyMark::of(prev) {
            Some(m) => Err(m),
            None => Ok(prev + 1),
        }
    }

    /// Bytes before the first ring: the header and the slot directory,
    /// all that a checkpoint of the recorded program needs to keep (the
    /// rings' contents are drained, and a replay reads the log).
    pub fn directory_len(&self) -> usize {
        self.rings_offset
    }

    /// The last sequence number handed out so far (0: none), without
    /// taking one: every record numbered up to it has been, or is being,
    /// made.
    pub fn last_seq(&self) -> u64 {
        self.header().last_seq.load(Ordering::Acquire) & !MARKS
    }

    /// How this copy was marked, if it was (see [`mark_copy`]).
    pub fn marked(&self) -> Option<CopyMark> {
        CopyMark::of(self.header().last_seq.load(Ordering::Acquire))
    }

    /// The next thread log id of the recording (from 1).
    pub fn next_log_id(&self) -> u32 {
        (self.header().last_log_id.fetch_add(1, Ordering::AcqRel) + 1) as u32
    }

    /// The last thread log id handed out so far (0: none).
    pub fn last_log_id(&self) -> u32 {
        self.header().last_log_id.load(Ordering::Acquire) as u32
    }

    /// Makes this set number on from where another recording of the same
    /// program stopped (a takeover gives the program new rings): sequence
    /// numbers after `last_seq`, log ids after `last_log_id`, so that the
    /// threads' ids stay unique. The counters only ever go up.
    pub fn continue_from(&self, last_seq: u64, last_log_id: u32) {
        let h = self.header();
        h.last_seq.fetch_max(last_seq & !MARKS, Ordering::AcqRel);
        h.last_log_id
            .fetch_max(u64::from(last_log_id), Ordering::AcqRel);
    }

    /// The flags the creator set (see [`EAGER`]).
    pub fn flags(&self) -> u32 {
        self.header().flags.load(Ordering::Relaxed)
    }

    /// Whether the recorder is to push every record as soon as it is made.
    pub fn eager(&self) -> bool {
        self.flags() & EAGER != 0
    }

    /// Counts one thing that went unrecorded (called by the recorder; no
    /// allocation, no lock).
    pub fn note_unrecorded(&self) {
        // Saturating: a count that wrapped would hide the problem.
        let _ = self
            .header()
            .unrecorded
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| n.checked_add(1));
    }

    /// How many threads found no free ring (they run unrecorded).
    pub fn unrecorded(&self) -> u32 {
        self.header().unrecorded.load(Ordering::Acquire)
    }

    /// Number of slots.
    pub fn slot_count(&self) -> usize {
        self.slots
    }

    /// Capacity of every ring.
    pub fn ring_capacity(&self) -> u64 {
        self.capacity
    }

    /// Takes the first free slot for thread log `log_id` (kernel tid
    /// `tid`) and returns its index. Called by the application thread.
    pub fn claim_slot(&self, log_id: u32, tid: u32) -> Result<usize, RingError> {
        for index in 0..self.slots {
            let desc = self.slot_desc(index)?;
            if desc
                .state
                .compare_exchange(FREE, CLAIMING, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                desc.log_id.store(log_id, Ordering::Relaxed);
                desc.tid.store(tid, Ordering::Relaxed);
                desc.state.store(ACTIVE, Ordering::Release);
                return Ok(index);
            }
        }
        Err(RingError::NoFreeSlot { count: self.slots })
    }

    /// Marks an active slot's thread as exited. Called by that thread
    /// after its last push (and after dropping its producer).
    pub fn retire_slot(&self, index: usize) -> Result<(), RingError> {
        self.transition(index, ACTIVE, EXITED)
    }

    /// Returns an exited slot whose ring has been drained to the free
    /// pool. Called by the agent.
    pub fn release_slot(&self, index: usize) -> Result<(), RingError> {
        let ring = self.ring(index)?;
        if !ring.is_empty() {
            let (head, tail) = (
                ring.header.head.load(Ordering::Acquire),
                ring.header.tail.load(Ordering::Acquire),
            );
            return Err(ring.corrupt("slot released before its ring was drained", head, tail));
        }
        self.transition(index, EXITED, FREE)
    }

    fn transition(&self, index: usize, from: u32, to: u32) -> Result<(), RingError> {
        self.slot_desc(index)?
            .state
            .compare_exchange(from, to, Ordering::AcqRel, Ordering::Relaxed)
            .map(drop)
            .map_err(|found| RingError::SlotState {
                index,
                found: SlotState::from_raw(found),
                expected: SlotState::from_raw(from),
            })
    }

    /// A snapshot of slot `index`'s directory entry.
    pub fn slot(&self, index: usize) -> Result<SlotInfo, RingError> {
        let desc = self.slot_desc(index)?;
        // Acquire: pairs with the Release that published the ids.
        let state = SlotState::from_raw(desc.state.load(Ordering::Acquire));
        Ok(SlotInfo {
            state,
            log_id: desc.log_id.load(Ordering::Relaxed),
            tid: desc.tid.load(Ordering::Relaxed),
        })
    }

    /// Claims the producer end of ring `index`.
    pub fn producer(&self, index: usize) -> Result<Producer<'_>, RingError> {
        self.ring(index)?.producer()
    }

    /// Claims the consumer end of ring `index`.
    pub fn consumer(&self, index: usize) -> Result<Consumer<'_>, RingError> {
        self.ring(index)?.consumer()
    }
}

// The ring header length is part of the stride computation; keep the
// dependency visible.
const _: () = assert!(RING_HEADER_LEN.is_multiple_of(64));
/// Marks the first page of a ring set, as a checkpoint image holds it, so
/// that the program restored from the image replays instead of recording
/// (its next attempt to take a sequence number says so). Returns the last
/// sequence number the recording had handed out at the checkpoint: every
/// record up to it happened before.
pub fn request_replay(first_page: &mut [u8]) -> Result<u64, RingError> {
    mark_copy(first_page, CopyMark::Replay)
}

/// Marks a checkpointed copy of a ring set (its first page, as saved in
/// the image) with what the program restored from it is to do; returns the
/// last sequence number handed out before the checkpoint.
pub fn mark_copy(first_page: &mut [u8], mark: CopyMark) -> Result<u64, RingError> {
    let too_small = RingError::TooSmall {
        what: "ring set header",
        len: first_page.len(),
        needed: DIR_HEADER_LEN,
    };
    let header = first_page.get_mut(..DIR_HEADER_LEN).ok_or(too_small)?;
    let u64_at = |h: &[u8], at: usize| u64::from_le_bytes(h[at..at + 8].try_into().expect("8"));
    let magic = u64_at(header, 0);
    if magic != SET_MAGIC {
        return Err(RingError::BadMagic {
            what: "ring set",
            found: magic,
        });
    }
    let version = u32::from_le_bytes(header[8..12].try_into().expect("4"));
    if version != SET_VERSION {
        return Err(RingError::Version {
            what: "ring set",
            found: version,
            supported: SET_VERSION,
        });
    }
    let at = std::mem::offset_of!(SetHeader, last_seq);
    let last = u64_at(header, at);
    if last & MARKS != 0 {
        return Err(RingError::Corrupt {
            what: "the ring set is already marked",
            head: 0,
            tail: 0,
            capacity: 0,
        });
    }
    header[at..at + 8].copy_from_slice(&(last | mark.bit()).to_le_bytes());
    Ok(last)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn a_set_marked_for_replay_hands_out_no_more_numbers() {
        let set = RingSet::create(2, 4096).unwrap();
        assert_eq!(set.next_seq(), Ok(1));
        assert_eq!(set.next_seq(), Ok(2));
        // What a checkpoint image holds: the first page, as bytes.
        let file = std::fs::File::from(nix::unistd::dup(set.fd()).unwrap());
        let mut page = vec![0u8; PAGE];
        file.read_exact_at(&mut page, 0).unwrap();
        assert_eq!(request_replay(&mut page).unwrap(), 2);
        assert!(
            request_replay(&mut page).is_err(),
            "marked twice must be refused"
        );
        file.write_all_at(&page, 0).unwrap();
        assert_eq!(set.next_seq(), Err(CopyMark::Replay));
        assert_eq!(set.next_seq(), Err(CopyMark::Replay));
    }

    #[test]
    fn new_rings_number_on_from_a_marked_recording() {
        let old = RingSet::create(1, 4096).unwrap();
        for _ in 0..5 {
            old.next_seq().unwrap();
        }
        old.next_log_id();
        old.next_log_id();
        // A restored copy's set, marked for replay, still counts refusals.
        let file = std::fs::File::from(nix::unistd::dup(old.fd()).unwrap());
        let mut page = vec![0u8; PAGE];
        file.read_exact_at(&mut page, 0).unwrap();
        request_replay(&mut page).unwrap();
        file.write_all_at(&page, 0).unwrap();
        assert!(old.next_seq().is_err());
        let new = RingSet::create(1, 4096).unwrap();
        new.continue_from(old.last_seq(), old.last_log_id());
        assert_eq!(new.next_seq(), Ok(7));
        assert_eq!(new.next_log_id(), 3);
        assert!(new.marked().is_none());
        // Never backwards.
        new.continue_from(1, 1);
        assert_eq!(new.next_seq(), Ok(8));
    }

    #[test]
    fn flags_are_the_creators_and_unknown_ones_are_refused() {
        let plain = RingSet::create(1, 4096).unwrap();
        assert_eq!(plain.flags(), 0);
        assert!(!plain.eager());
        let eager = RingSet::create_with(1, 4096, EAGER).unwrap();
        assert!(eager.eager());
        let other = RingSet::from_fd(nix::unistd::dup(eager.fd()).unwrap()).unwrap();
        assert!(other.eager(), "seen by the other side too");
        assert!(matches!(
            RingSet::create_with(1, 4096, 1 << 5),
            Err(RingError::UnknownFlags { flags: 32 })
        ));
        // A set whose flags were changed under a reader: refused at attach.
        let file = std::fs::File::from(nix::unistd::dup(plain.fd()).unwrap());
        let at = std::mem::offset_of!(SetHeader, flags) as u64;
        file.write_all_at(&(1u32 << 7).to_le_bytes(), at).unwrap();
        assert!(matches!(
            RingSet::from_fd(nix::unistd::dup(plain.fd()).unwrap()),
            Err(RingError::UnknownFlags { flags: 128 })
        ));
    }

    #[test]
    fn the_unrecorded_count_is_shared() {
        let set = RingSet::create(1, 4096).unwrap();
        let other = RingSet::from_fd(nix::unistd::dup(set.fd()).unwrap()).unwrap();
        assert_eq!(set.unrecorded(), 0);
        other.note_unrecorded();
        other.note_unrecorded();
        assert_eq!(set.unrecorded(), 2);
        assert_eq!(std::mem::offset_of!(SetHeader, flags), 56);
        assert_eq!(std::mem::offset_of!(SetHeader, unrecorded), 60);
    }

    #[test]
    fn only_a_ring_set_can_be_marked() {
        let mut page = vec![0u8; PAGE];
        assert!(matches!(
            request_replay(&mut page),
            Err(RingError::BadMagic { .. })
        ));
        assert!(matches!(
            request_replay(&mut page[..10]),
            Err(RingError::TooSmall { .. })
        ));
    }
}
