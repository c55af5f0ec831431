//! The recorded events and their encoding.
//!
//! Events borrow their variable-length data (`Event<'a>`): the recorder
//! builds them from the buffers the intercepted call just filled, and the
//! decoder hands out views into the batch it validated, so neither side
//! copies or allocates.

use std::fmt;
use std::io::IoSlice;

use super::codec::{Decoder, Encoder};
use super::error::{DecodeError, EncodeError};

/// One entry of a thread's log: an event with its place in the global
/// order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    /// Process-wide sequence number, taken from one atomic counter when
    /// the event was recorded. Replay releases events in this order.
    pub seq: u64,
    /// Nanoseconds since the previous record of any thread, so replay can
    /// reproduce the pacing as well as the order.
    pub time_delta_ns: u64,
    /// What happened.
    pub event: Event<'a>,
}

/// Bytes an intercepted call returned to the application.
///
/// `Scattered` lets the recorder log a `readv`/`recvmsg` result straight
/// from the application's `iovec` array (`IoSlice` is ABI-compatible with
/// `struct iovec`) without gathering it first; `len` is the call's result,
/// which may end part-way through the parts. Decoding always yields `Flat`.
#[derive(Clone, Copy)]
pub enum Bytes<'a> {
    /// One contiguous buffer.
    Flat(&'a [u8]),
    /// The first `len` bytes of the concatenation of `parts`.
    Scattered {
        /// The buffers, in order.
        parts: &'a [IoSlice<'a>],
        /// How many bytes of them are meaningful.
        len: usize,
    },
}

impl<'a> Bytes<'a> {
    /// Number of meaningful bytes.
    pub fn len(&self) -> usize {
        match self {
            Bytes::Flat(b) => b.len(),
            Bytes::Scattered { len, .. } => *len,
        }
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The contiguous bytes, if this is `Flat` (always true after decoding).
    pub fn as_flat(&self) -> Option<&'a [u8]> {
        match self {
            Bytes::Flat(b) => Some(b),
            Bytes::Scattered { .. } => None,
        }
    }

    /// The meaningful bytes as a sequence of chunks, stopping at `len`.
    pub fn chunks(&self) -> impl Iterator<Item = &'a [u8]> + 'a {
        let (flat, parts, len): (Option<&'a [u8]>, &'a [IoSlice<'a>], usize) = match *self {
            Bytes::Flat(b) => (Some(b), &[], b.len()),
            Bytes::Scattered { parts, len } => (None, parts, len),
        };
        let mut left = len;
        flat.into_iter()
            .chain(parts.iter().map(|p| -> &'a [u8] { p }))
            .map(move |chunk| {
                let take = chunk.len().min(left);
                left -= take;
                &chunk[..take]
            })
            .filter(|c| !c.is_empty())
    }

    /// Copies the bytes out (for tests and tools; the recorder never needs it).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.len());
        for c in self.chunks() {
            v.extend_from_slice(c);
        }
        v
    }

    fn encode(&self, out: &mut Encoder<'_>) -> Result<(), EncodeError> {
        if let Bytes::Scattered { parts, len } = self {
            let available: usize = parts.iter().map(|p| p.len()).sum();
            if available < *len {
                return Err(EncodeError::ScatterShort {
                    len: *len,
                    available,
                });
            }
        }
        out.put_varint(self.len() as u64)?;
        for c in self.chunks() {
            out.put_raw(c)?;
        }
        Ok(())
    }
}

impl PartialEq for Bytes<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.chunks().flatten().eq(other.chunks().flatten())
    }
}

impl Eq for Bytes<'_> {}

impl fmt::Debug for Bytes<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Bytes[{}](", self.len())?;
        for (i, b) in self.chunks().flatten().enumerate() {
            if i == 32 {
                f.write_str("..")?;
                break;
            }
            write!(f, "{b:02x}")?;
        }
        f.write_str(")")
    }
}

mod sealed {
    pub trait Sealed {}
}

/// Item types a [`List`] can hold. Sealed: the set is part of the format.
pub trait ListItem<'a>: Copy + sealed::Sealed {
    /// Decodes the item at `bytes[*pos..]`, advancing `pos`. Only used on
    /// bytes the batch reader has already validated.
    #[doc(hidden)]
    fn decode_validated(bytes: &'a [u8], pos: &mut usize) -> Option<Self>;
}

/// Implements [`ListItem`] with a decoder that reports errors.
macro_rules! list_item {
    ($t:ty, $decode:path) => {
        impl<'a> sealed::Sealed for $t {}
        impl<'a> ListItem<'a> for $t {
            fn decode_validated(bytes: &'a [u8], pos: &mut usize) -> Option<Self> {
                let mut dec = Decoder::new(bytes.get(*pos..)?, 0);
                let item = $decode(&mut dec).ok()?;
                *pos += dec.pos();
                Some(item)
            }
        }
    };
}

/// A list of per-item results (ready epoll events, poll revents, received
/// messages): either a slice the recorder supplies, or a validated view
/// into a decoded batch, parsed lazily as it is iterated.
#[derive(Clone, Copy)]
pub struct List<'a, T> {
    repr: ListRepr<'a, T>,
}

#[derive(Clone, Copy)]
enum ListRepr<'a, T> {
    Items(&'a [T]),
    Encoded { count: u32, bytes: &'a [u8] },
}

impl<'a, T: ListItem<'a>> List<'a, T> {
    /// A list over items the caller holds.
    pub fn new(items: &'a [T]) -> Self {
        List {
            repr: ListRepr::Items(items),
        }
    }

    /// Number of items.
    pub fn len(&self) -> usize {
        match self.repr {
            ListRepr::Items(items) => items.len(),
            ListRepr::Encoded { count, .. } => count as usize,
        }
    }

    /// Whether the list has no items.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The items, in order.
    pub fn iter(&self) -> ListIter<'a, T> {
        ListIter(match self.repr {
            ListRepr::Items(items) => IterRepr::Items(items.iter()),
            ListRepr::Encoded { count, bytes } => IterRepr::Encoded {
                left: count,
                bytes,
                pos: 0,
            },
        })
    }

    fn encode(
        &self,
        out: &mut Encoder<'_>,
        item: impl Fn(&T, &mut Encoder<'_>) -> Result<(), EncodeError>,
    ) -> Result<(), EncodeError> {
        out.put_varint(self.len() as u64)?;
        for t in self.iter() {
            item(&t, out)?;
        }
        Ok(())
    }

    /// Reads a count and that many items with `decode`, validating all of
    /// them now so that later iteration cannot fail. Each item takes at
    /// least one byte, so a huge count fails fast on a short payload.
    fn decode(
        dec: &mut Decoder<'a>,
        what: &'static str,
        decode: fn(&mut Decoder<'a>) -> Result<T, DecodeError>,
    ) -> Result<Self, DecodeError> {
        let count = dec.u32(what)?;
        let start = dec.clone();
        for _ in 0..count {
            decode(dec)?;
        }
        Ok(List {
            repr: ListRepr::Encoded {
                count,
                bytes: start.slice_to(dec),
            },
        })
    }
}

/// Iterator over a [`List`].
pub struct ListIter<'a, T>(IterRepr<'a, T>);

enum IterRepr<'a, T> {
    Items(std::slice::Iter<'a, T>),
    Encoded {
        left: u32,
        bytes: &'a [u8],
        pos: usize,
    },
}

impl<'a, T: ListItem<'a>> Iterator for ListIter<'a, T> {
    type Item = T;

    fn next(&mut self) -> Option<T> {
        match &mut self.0 {
            IterRepr::Items(it) => it.next().copied(),
            IterRepr::Encoded { left, bytes, pos } => {
                if *left == 0 {
                    return None;
                }
                *left -= 1;
                // Validated when the list was decoded, so this cannot fail;
                // should it ever, the list just ends early.
                T::decode_validated(bytes, pos)
            }
        }
    }
}

impl<'a, T: ListItem<'a> + PartialEq> PartialEq for List<'a, T> {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl<'a, T: ListItem<'a> + Eq> Eq for List<'a, T> {}

impl<'a, T: ListItem<'a> + fmt::Debug> fmt::Debug for List<'a, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// One ready entry returned by `epoll_wait`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpollReady {
    /// The `events` mask.
    pub events: u32,
    /// The registration's `epoll_data_t`, as 64 bits.
    pub data: u64,
}

impl EpollReady {
    fn encode(&self, out: &mut Encoder<'_>) -> Result<(), EncodeError> {
        out.put_varint(u64::from(self.events))?;
        out.put_varint(self.data)?;
        Ok(())
    }

    fn decode(dec: &mut Decoder<'_>) -> Result<Self, DecodeError> {
        Ok(EpollReady {
            events: dec.u32("epoll events")?,
            data: dec.varint("epoll data")?,
        })
    }
}

list_item!(EpollReady, EpollReady::decode);
list_item!(u16, decode_revents);
list_item!(RecvMsg<'a>, RecvMsg::decode);

fn encode_revents(v: &u16, out: &mut Encoder<'_>) -> Result<(), EncodeError> {
    Ok(out.put_varint(u64::from(*v))?)
}

fn decode_revents(dec: &mut Decoder<'_>) -> Result<u16, DecodeError> {
    dec.u16("poll revents")
}

/// One message received by `recvmmsg`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecvMsg<'a> {
    /// The received bytes (`msg_len` of them).
    pub data: Bytes<'a>,
    /// The source address, `msg_namelen` bytes of it.
    pub addr: &'a [u8],
    /// `msg_flags` as returned.
    pub flags: i32,
    /// Ancillary data, `msg_controllen` bytes of it.
    pub control: &'a [u8],
}

impl<'a> RecvMsg<'a> {
    fn encode(&self, out: &mut Encoder<'_>) -> Result<(), EncodeError> {
        out.put_signed(i64::from(self.flags))?;
        self.data.encode(out)?;
        out.put_bytes(self.addr)?;
        out.put_bytes(self.control)?;
        Ok(())
    }

    fn decode(dec: &mut Decoder<'a>) -> Result<Self, DecodeError> {
        Ok(RecvMsg {
            flags: dec.i32("msg flags")?,
            data: Bytes::Flat(dec.bytes("message data")?),
            addr: dec.bytes("source address")?,
            control: dec.bytes("ancillary data")?,
        })
    }
}

/// Declares a field-less enum whose variants map to consecutive codes
/// added to a record tag base.
macro_rules! call_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $v:ident),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum $name { $($(#[$vm])* $v),+ }

        impl $name {
            /// Every variant, in code order.
            pub const ALL: &'static [$name] = &[$($name::$v),+];

            fn code(self) -> u8 {
                self as u8
            }

            fn from_code(code: u8) -> Option<Self> {
                Self::ALL.get(usize::from(code)).copied()
            }
        }
    };
}

call_enum!(
    /// Which read-family call produced a [`Event::Read`].
    ReadCall {
        /// `read(2)`
        Read,
        /// `readv(2)`
        Readv,
        /// `pread64(2)`
        Pread,
        /// `preadv(2)`
        Preadv,
        /// `preadv2(2)`
        Preadv2,
        /// `fread(3)` from a random-number device (`ret` counts items);
        /// the C library reads such a stream without going through
        /// `read`.
        Fread,
    }
);

call_enum!(
    /// Which receive call produced a [`Event::Recv`].
    RecvCall {
        /// `recv(2)`
        Recv,
        /// `recvfrom(2)`
        RecvFrom,
        /// `recvmsg(2)`
        RecvMsg,
    }
);

call_enum!(
    /// Which accept call produced a [`Event::Accept`].
    AcceptCall {
        /// `accept(2)`
        Accept,
        /// `accept4(2)`
        Accept4,
    }
);

call_enum!(
    /// Which epoll wait produced a [`Event::EpollWait`].
    EpollCall {
        /// `epoll_wait(2)`
        Wait,
        /// `epoll_pwait(2)`
        Pwait,
        /// `epoll_pwait2(2)`
        Pwait2,
    }
);

call_enum!(
    /// Which poll call produced a [`Event::Poll`].
    PollCall {
        /// `poll(2)`
        Poll,
        /// `ppoll(2)`
        Ppoll,
    }
);

call_enum!(
    /// Which select call produced a [`Event::Select`].
    SelectCall {
        /// `select(2)`
        Select,
        /// `pselect6(2)`
        Pselect,
    }
);

call_enum!(
    /// Which mapping call produced a [`Event::Mmap`].
    MmapCall {
        /// `mmap(2)`
        Mmap,
        /// `mremap(2)`
        Mremap,
    }
);

call_enum!(
    /// Which output call produced a [`Event::Write`].
    WriteCall {
        /// `write(2)`
        Write,
        /// `writev(2)`
        Writev,
        /// `send(2)`
        Send,
        /// `sendto(2)`
        SendTo,
        /// `sendmsg(2)`
        SendMsg,
        /// `sendfile(2)` (and `sendfile64`)
        SendFile,
    }
);

call_enum!(
    /// Which wait call produced a [`Event::Wait`].
    WaitCall {
        /// `wait(2)`
        Wait,
        /// `waitpid(2)`
        Waitpid,
        /// `wait3(2)`
        Wait3,
        /// `wait4(2)`
        Wait4,
        /// `waitid(2)`
        Waitid,
    }
);

/// What `waitid` filled in its `siginfo_t` besides the status (zero for
/// the other wait calls, and when no child was ready).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WaitChild {
    /// `si_pid`: the child, 0 if none was ready.
    pub pid: i32,
    /// `si_uid`: its real user id.
    pub uid: u32,
    /// `si_code`: `CLD_EXITED`, `CLD_KILLED`, `CLD_DUMPED`, `CLD_STOPPED`,
    /// `CLD_TRAPPED` or `CLD_CONTINUED`.
    pub code: i32,
}

call_enum!(
    /// A synchronization operation whose order across threads is recorded.
    SyncOp {
        /// `pthread_mutex_lock`
        MutexLock,
        /// `pthread_mutex_trylock`
        MutexTrylock,
        /// `pthread_mutex_timedlock`
        MutexTimedlock,
        /// `pthread_mutex_unlock`
        MutexUnlock,
        /// `pthread_rwlock_rdlock`
        RwlockRdlock,
        /// `pthread_rwlock_wrlock`
        RwlockWrlock,
        /// `pthread_rwlock_tryrdlock`
        RwlockTryrdlock,
        /// `pthread_rwlock_trywrlock`
        RwlockTrywrlock,
        /// `pthread_rwlock_timedrdlock`
        RwlockTimedrdlock,
        /// `pthread_rwlock_timedwrlock`
        RwlockTimedwrlock,
        /// `pthread_rwlock_unlock`
        RwlockUnlock,
        /// `pthread_cond_wait` (records the reacquisition of the mutex)
        CondWait,
        /// `pthread_cond_timedwait`
        CondTimedwait,
        /// `pthread_cond_signal`
        CondSignal,
        /// `pthread_cond_broadcast`
        CondBroadcast,
        /// `sem_wait`
        SemWait,
        /// `sem_trywait`
        SemTrywait,
        /// `sem_timedwait`
        SemTimedwait,
        /// `sem_post`
        SemPost,
        /// `pthread_spin_lock`
        SpinLock,
        /// `pthread_spin_trylock`
        SpinTrylock,
        /// `pthread_spin_unlock`
        SpinUnlock,
        /// `pthread_once` (the call that ran the initializer, or waited for it)
        Once,
    }
);

/// A nondeterministic event whose outcome replay must reproduce.
///
/// `ret` fields hold the call's result as the kernel reports it: the
/// non-negative result, or `-errno` on failure (the recorder converts libc's
/// `-1`/`errno` convention).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event<'a> {
    /// A system call whose only nondeterminism is its return value.
    Syscall {
        /// System call number.
        nr: u32,
        /// Result or `-errno`.
        ret: i64,
    },
    /// A read-family call; `/dev/urandom` reads are recorded this way too.
    Read {
        /// Which call.
        call: ReadCall,
        /// File descriptor read.
        fd: i32,
        /// Bytes read or `-errno`.
        ret: i64,
        /// The bytes returned.
        data: Bytes<'a>,
    },
    /// `recv`, `recvfrom` or `recvmsg`.
    Recv {
        /// Which call.
        call: RecvCall,
        /// Socket.
        fd: i32,
        /// Bytes received or `-errno`.
        ret: i64,
        /// The bytes returned.
        data: Bytes<'a>,
        /// Source address bytes (empty if none was asked for).
        addr: &'a [u8],
        /// `msg_flags` on return (0 for calls without a `msghdr`).
        flags: i32,
        /// Ancillary data bytes.
        control: &'a [u8],
    },
    /// `recvmmsg`, one entry per message received.
    RecvMmsg {
        /// Socket.
        fd: i32,
        /// Messages received or `-errno`.
        ret: i64,
        /// The messages.
        msgs: List<'a, RecvMsg<'a>>,
    },
    /// `accept` or `accept4`.
    Accept {
        /// Which call.
        call: AcceptCall,
        /// Listening socket.
        fd: i32,
        /// New descriptor or `-errno`.
        ret: i64,
        /// Peer address bytes.
        addr: &'a [u8],
    },
    /// `epoll_wait`, `epoll_pwait` or `epoll_pwait2`.
    EpollWait {
        /// Which call.
        call: EpollCall,
        /// The epoll descriptor.
        epfd: i32,
        /// Ready count or `-errno`.
        ret: i64,
        /// The ready entries.
        ready: List<'a, EpollReady>,
    },
    /// `poll` or `ppoll`.
    Poll {
        /// Which call.
        call: PollCall,
        /// Ready count or `-errno`.
        ret: i64,
        /// `revents` of every `pollfd`, in array order.
        revents: List<'a, u16>,
    },
    /// `select` or `pselect6`: the fd sets as they were returned.
    Select {
        /// Which call.
        call: SelectCall,
        /// Ready count or `-errno`.
        ret: i64,
        /// Read set bitmap bytes (empty if the set was null).
        readfds: &'a [u8],
        /// Write set bitmap bytes.
        writefds: &'a [u8],
        /// Exception set bitmap bytes.
        exceptfds: &'a [u8],
    },
    /// `clock_gettime`.
    ClockGettime {
        /// Clock id.
        clock: i32,
        /// 0 or `-errno`.
        ret: i32,
        /// Seconds.
        sec: i64,
        /// Nanoseconds.
        nsec: u32,
    },
    /// `gettimeofday`.
    Gettimeofday {
        /// 0 or `-errno`.
        ret: i32,
        /// Seconds.
        sec: i64,
        /// Microseconds.
        usec: u32,
    },
    /// `time`.
    Time {
        /// Seconds since the epoch.
        sec: i64,
    },
    /// `getrandom`.
    Getrandom {
        /// Bytes returned or `-errno`.
        ret: i64,
        /// The random bytes.
        data: Bytes<'a>,
    },
    /// `mmap` or `mremap`: where the kernel placed the mapping.
    Mmap {
        /// Which call.
        call: MmapCall,
        /// Address on success, `-errno` on failure.
        ret: i64,
        /// Length of the mapping.
        len: u64,
    },
    /// `pthread_create`.
    ThreadCreate {
        /// 0 or the error number `pthread_create` returned.
        ret: i32,
        /// Log id given to the new thread.
        child: u32,
    },
    /// The recording thread exited; its log ends here.
    ThreadExit,
    /// An output call, when it returned: only its result (the bytes are
    /// the program's own, reproduced by a replay), so that a replay returns
    /// the same short count or error.
    Write {
        /// Which call.
        call: WriteCall,
        /// The descriptor written to (`sendfile`: the output one).
        fd: i32,
        /// Bytes written or `-errno`.
        ret: i64,
    },
    /// A wait for a child process: whether a child had ended yet is not
    /// the program's to decide.
    Wait {
        /// Which call.
        call: WaitCall,
        /// The child's pid, 0 (`WNOHANG` and none ready) or `-errno`;
        /// `waitid`: 0 or `-errno`.
        ret: i64,
        /// The status word stored (`wait` .. `wait4`), or `waitid`'s
        /// `si_status`.
        status: i32,
        /// `waitid`'s other `siginfo_t` fields.
        child: WaitChild,
    },
    /// `fork` in the parent.
    Fork {
        /// Child pid or `-errno`.
        ret: i64,
    },
    /// `fork` was called but the child cannot be recorded; replay past this
    /// point is not possible.
    ForkUnsupported,
    /// A handler of the program's ran for signal `signo` on this thread,
    /// here in its order of events.
    Signal {
        /// The signal number.
        signo: i32,
    },
    /// A synchronization operation on the object at `obj`.
    Sync {
        /// The operation.
        op: SyncOp,
        /// Address of the lock, condition variable, semaphore or once.
        obj: u64,
        /// The operation's result (0, an error number, or `-errno` for
        /// semaphores).
        ret: i32,
    },
}

/// Record tags: the first byte of every record.
///
/// Families with several calls use consecutive tags starting at the base.
pub mod tag {
    /// [`Event::Syscall`](super::Event::Syscall)
    pub const SYSCALL: u8 = 0x01;
    /// [`Event::Read`](super::Event::Read), plus `ReadCall` code.
    pub const READ: u8 = 0x10;
    /// [`Event::Recv`](super::Event::Recv), plus `RecvCall` code.
    pub const RECV: u8 = 0x18;
    /// [`Event::RecvMmsg`](super::Event::RecvMmsg)
    pub const RECVMMSG: u8 = 0x1b;
    /// [`Event::Accept`](super::Event::Accept), plus `AcceptCall` code.
    pub const ACCEPT: u8 = 0x20;
    /// [`Event::EpollWait`](super::Event::EpollWait), plus `EpollCall` code.
    pub const EPOLL: u8 = 0x28;
    /// [`Event::Poll`](super::Event::Poll), plus `PollCall` code.
    pub const POLL: u8 = 0x2c;
    /// [`Event::Select`](super::Event::Select), plus `SelectCall` code.
    pub const SELECT: u8 = 0x2e;
    /// [`Event::ClockGettime`](super::Event::ClockGettime)
    pub const CLOCK_GETTIME: u8 = 0x30;
    /// [`Event::Gettimeofday`](super::Event::Gettimeofday)
    pub const GETTIMEOFDAY: u8 = 0x31;
    /// [`Event::Time`](super::Event::Time)
    pub const TIME: u8 = 0x32;
    /// [`Event::Getrandom`](super::Event::Getrandom)
    pub const GETRANDOM: u8 = 0x38;
    /// [`Event::Mmap`](super::Event::Mmap), plus `MmapCall` code.
    pub const MMAP: u8 = 0x40;
    /// [`Event::ThreadCreate`](super::Event::ThreadCreate)
    pub const THREAD_CREATE: u8 = 0x48;
    /// [`Event::ThreadExit`](super::Event::ThreadExit)
    pub const THREAD_EXIT: u8 = 0x49;
    /// [`Event::Fork`](super::Event::Fork)
    pub const FORK: u8 = 0x4a;
    /// [`Event::ForkUnsupported`](super::Event::ForkUnsupported)
    pub const FORK_UNSUPPORTED: u8 = 0x4b;
    /// [`Event::Signal`](super::Event::Signal)
    pub const SIGNAL: u8 = 0x4c;
    /// [`Event::Write`](super::Event::Write), plus `WriteCall` code.
    pub const WRITE: u8 = 0x50;
    /// [`Event::Wait`](super::Event::Wait), plus `WaitCall` code.
    pub const WAIT: u8 = 0x58;
    /// [`Event::Sync`](super::Event::Sync), plus `SyncOp` code (0x60..=0x76).
    pub const SYNC: u8 = 0x60;
}

impl<'a> Event<'a> {
    /// The record tag this event is written with.
    pub fn tag(&self) -> u8 {
        match self {
            Event::Syscall { .. } => tag::SYSCALL,
            Event::Read { call, .. } => tag::READ + call.code(),
            Event::Recv { call, .. } => tag::RECV + call.code(),
            Event::RecvMmsg { .. } => tag::RECVMMSG,
            Event::Accept { call, .. } => tag::ACCEPT + call.code(),
            Event::EpollWait { call, .. } => tag::EPOLL + call.code(),
            Event::Poll { call, .. } => tag::POLL + call.code(),
            Event::Select { call, .. } => tag::SELECT + call.code(),
            Event::ClockGettime { .. } => tag::CLOCK_GETTIME,
            Event::Gettimeofday { .. } => tag::GETTIMEOFDAY,
            Event::Time { .. } => tag::TIME,
            Event::Getrandom { .. } => tag::GETRANDOM,
            Event::Mmap { call, .. } => tag::MMAP + call.code(),
            Event::ThreadCreate { .. } => tag::THREAD_CREATE,
            Event::ThreadExit => tag::THREAD_EXIT,
            Event::Fork { .. } => tag::FORK,
            Event::ForkUnsupported => tag::FORK_UNSUPPORTED,
            Event::Signal { .. } => tag::SIGNAL,
            Event::Write { call, .. } => tag::WRITE + call.code(),
            Event::Wait { call, .. } => tag::WAIT + call.code(),
            Event::Sync { op, .. } => tag::SYNC + op.code(),
        }
    }

    /// Writes the fields that follow the record header (tag, sequence gap
    /// and time delta are written by the batch writer).
    pub(crate) fn encode_body(&self, out: &mut Encoder<'_>) -> Result<(), EncodeError> {
        match self {
            Event::Syscall { nr, ret } => {
                out.put_varint(u64::from(*nr))?;
                out.put_signed(*ret)?;
            }
            Event::Read { fd, ret, data, .. } => {
                out.put_signed(i64::from(*fd))?;
                out.put_signed(*ret)?;
                data.encode(out)?;
            }
            Event::Recv {
                fd,
                ret,
                data,
                addr,
                flags,
                control,
                ..
            } => {
                out.put_signed(i64::from(*fd))?;
                out.put_signed(*ret)?;
                out.put_signed(i64::from(*flags))?;
                data.encode(out)?;
                out.put_bytes(addr)?;
                out.put_bytes(control)?;
            }
            Event::RecvMmsg { fd, ret, msgs } => {
                out.put_signed(i64::from(*fd))?;
                out.put_signed(*ret)?;
                msgs.encode(out, RecvMsg::encode)?;
            }
            Event::Accept { fd, ret, addr, .. } => {
                out.put_signed(i64::from(*fd))?;
                out.put_signed(*ret)?;
                out.put_bytes(addr)?;
            }
            Event::EpollWait {
                epfd, ret, ready, ..
            } => {
                out.put_signed(i64::from(*epfd))?;
                out.put_signed(*ret)?;
                ready.encode(out, EpollReady::encode)?;
            }
            Event::Poll { ret, revents, .. } => {
                out.put_signed(*ret)?;
                revents.encode(out, encode_revents)?;
            }
            Event::Select {
                ret,
                readfds,
                writefds,
                exceptfds,
                ..
            } => {
                out.put_signed(*ret)?;
                out.put_bytes(readfds)?;
                out.put_bytes(writefds)?;
                out.put_bytes(exceptfds)?;
            }
            Event::ClockGettime {
                clock,
                ret,
                sec,
                nsec,
            } => {
                out.put_signed(i64::from(*clock))?;
                out.put_signed(i64::from(*ret))?;
                out.put_signed(*sec)?;
                out.put_varint(u64::from(*nsec))?;
            }
            Event::Gettimeofday { ret, sec, usec } => {
                out.put_signed(i64::from(*ret))?;
                out.put_signed(*sec)?;
                out.put_varint(u64::from(*usec))?;
            }
            Event::Time { sec } => out.put_signed(*sec)?,
            Event::Getrandom { ret, data } => {
                out.put_signed(*ret)?;
                data.encode(out)?;
            }
            Event::Mmap { ret, len, .. } => {
                out.put_signed(*ret)?;
                out.put_varint(*len)?;
            }
            Event::ThreadCreate { ret, child } => {
                out.put_signed(i64::from(*ret))?;
                out.put_varint(u64::from(*child))?;
            }
            Event::ThreadExit | Event::ForkUnsupported => {}
            Event::Fork { ret } => out.put_signed(*ret)?,
            Event::Signal { signo } => out.put_signed(i64::from(*signo))?,
            Event::Write { fd, ret, .. } => {
                out.put_signed(i64::from(*fd))?;
                out.put_signed(*ret)?;
            }
            Event::Wait {
                ret, status, child, ..
            } => {
                out.put_signed(*ret)?;
                out.put_signed(i64::from(*status))?;
                out.put_signed(i64::from(child.pid))?;
                out.put_varint(u64::from(child.uid))?;
                out.put_signed(i64::from(child.code))?;
            }
            Event::Sync { obj, ret, .. } => {
                out.put_varint(*obj)?;
                out.put_signed(i64::from(*ret))?;
            }
        }
        Ok(())
    }

    /// Reads the body of a record whose tag byte (at batch offset
    /// `tag_offset`) has already been consumed.
    pub(crate) fn decode_body(
        tag_byte: u8,
        tag_offset: usize,
        dec: &mut Decoder<'a>,
    ) -> Result<Self, DecodeError> {
        let unknown = DecodeError::UnknownTag {
            tag: tag_byte,
            offset: tag_offset,
        };
        // Which family a tag belongs to, and the call code within it.
        let sub = |base: u8| tag_byte.wrapping_sub(base);
        let event = match tag_byte {
            tag::SYSCALL => Event::Syscall {
                nr: dec.u32("syscall number")?,
                ret: dec.signed("syscall result")?,
            },
            t if (tag::READ..tag::READ + 6).contains(&t) => Event::Read {
                call: ReadCall::from_code(sub(tag::READ)).ok_or(unknown)?,
                fd: dec.i32("fd")?,
                ret: dec.signed("read result")?,
                data: Bytes::Flat(dec.bytes("read data")?),
            },
            t if (tag::RECV..tag::RECV + 3).contains(&t) => Event::Recv {
                call: RecvCall::from_code(sub(tag::RECV)).ok_or(unknown)?,
                fd: dec.i32("fd")?,
                ret: dec.signed("recv result")?,
                flags: dec.i32("msg flags")?,
                data: Bytes::Flat(dec.bytes("recv data")?),
                addr: dec.bytes("source address")?,
                control: dec.bytes("ancillary data")?,
            },
            tag::RECVMMSG => Event::RecvMmsg {
                fd: dec.i32("fd")?,
                ret: dec.signed("recvmmsg result")?,
                msgs: List::decode(dec, "message count", RecvMsg::decode)?,
            },
            t if (tag::ACCEPT..tag::ACCEPT + 2).contains(&t) => Event::Accept {
                call: AcceptCall::from_code(sub(tag::ACCEPT)).ok_or(unknown)?,
                fd: dec.i32("fd")?,
                ret: dec.signed("accept result")?,
                addr: dec.bytes("peer address")?,
            },
            t if (tag::EPOLL..tag::EPOLL + 3).contains(&t) => Event::EpollWait {
                call: EpollCall::from_code(sub(tag::EPOLL)).ok_or(unknown)?,
                epfd: dec.i32("epfd")?,
                ret: dec.signed("epoll result")?,
                ready: List::decode(dec, "ready count", EpollReady::decode)?,
            },
            t if (tag::POLL..tag::POLL + 2).contains(&t) => Event::Poll {
                call: PollCall::from_code(sub(tag::POLL)).ok_or(unknown)?,
                ret: dec.signed("poll result")?,
                revents: List::decode(dec, "pollfd count", decode_revents)?,
            },
            t if (tag::SELECT..tag::SELECT + 2).contains(&t) => Event::Select {
                call: SelectCall::from_code(sub(tag::SELECT)).ok_or(unknown)?,
                ret: dec.signed("select result")?,
                readfds: dec.bytes("read fd set")?,
                writefds: dec.bytes("write fd set")?,
                exceptfds: dec.bytes("except fd set")?,
            },
            tag::CLOCK_GETTIME => Event::ClockGettime {
                clock: dec.i32("clock id")?,
                ret: dec.i32("clock_gettime result")?,
                sec: dec.signed("seconds")?,
                nsec: dec.u32("nanoseconds")?,
            },
            tag::GETTIMEOFDAY => Event::Gettimeofday {
                ret: dec.i32("gettimeofday result")?,
                sec: dec.signed("seconds")?,
                usec: dec.u32("microseconds")?,
            },
            tag::TIME => Event::Time {
                sec: dec.signed("seconds")?,
            },
            tag::GETRANDOM => Event::Getrandom {
                ret: dec.signed("getrandom result")?,
                data: Bytes::Flat(dec.bytes("random bytes")?),
            },
            t if (tag::MMAP..tag::MMAP + 2).contains(&t) => Event::Mmap {
                call: MmapCall::from_code(sub(tag::MMAP)).ok_or(unknown)?,
                ret: dec.signed("mapping address")?,
                len: dec.varint("mapping length")?,
            },
            tag::THREAD_CREATE => Event::ThreadCreate {
                ret: dec.i32("pthread_create result")?,
                child: dec.u32("child log id")?,
            },
            tag::THREAD_EXIT => Event::ThreadExit,
            tag::FORK => Event::Fork {
                ret: dec.signed("fork result")?,
            },
            tag::FORK_UNSUPPORTED => Event::ForkUnsupported,
            tag::SIGNAL => Event::Signal {
                signo: dec.i32("signal number")?,
            },
            t if (tag::WRITE..tag::WRITE + 6).contains(&t) => Event::Write {
                call: WriteCall::from_code(sub(tag::WRITE)).ok_or(unknown)?,
                fd: dec.i32("fd")?,
                ret: dec.signed("write result")?,
            },
            t if (tag::WAIT..tag::WAIT + 5).contains(&t) => Event::Wait {
                call: WaitCall::from_code(sub(tag::WAIT)).ok_or(unknown)?,
                ret: dec.signed("wait result")?,
                status: dec.i32("wait status")?,
                child: WaitChild {
                    pid: dec.i32("child pid")?,
                    uid: dec.u32("child uid")?,
                    code: dec.i32("child code")?,
                },
            },
            t if t >= tag::SYNC => Event::Sync {
                op: SyncOp::from_code(sub(tag::SYNC)).ok_or(unknown)?,
                obj: dec.varint("object address")?,
                ret: dec.i32("sync result")?,
            },
            _ => return Err(unknown),
        };
        Ok(event)
    }
}
