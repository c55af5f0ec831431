//! rrc's checkpoint/restore engine.
//!
//! A *checkpoint* stops every thread of a process tree with ptrace, reads
//! what the kernel shows in /proc and through ptrace, asks each process for
//! the rest by making system calls in it (signal handlers, timers, the brk),
//! copies its memory, and writes an [`image`]. A *restore* forks a skeleton
//! process per recorded pid (same pids and tids, via `clone3`'s `set_tid`),
//! replaces each skeleton's address space with the recorded one, and
//! rebuilds threads, files and the remaining kernel state, again by making
//! system calls inside the skeletons, before letting them run.
//!
//! Modules: [`ptrace`], [`remote`] and [`procmem`] are the mechanism
//! (stopping threads, injecting calls, reading and writing their memory);
//! [`procfs`] reads /proc; [`dump`] and [`restore`] are the two halves of
//! the engine, which share nothing but that mechanism, the helpers of
//! `common` and [`image`], the format between them.
//! [`incremental`] takes series of checkpoints that save only what changed
//! (found by [`dirty`]), and [`store`] applies them onto an image.
//! [`edit`] prepares an image for a restore that is to differ from the
//! original (a replay).

mod common;
pub mod dirty;
pub mod dump;
pub mod edit;
mod error;
pub mod image;
pub mod incremental;
pub mod netlock;
pub mod procfs;
pub mod procmem;
pub mod ptrace;
pub mod remote;
pub mod restore;
mod rtnl;
pub mod sockdiag;
pub mod sockopt;
pub mod store;
mod sys;
pub mod tcp;
pub mod unixdiag;

pub use error::{Error, Result};

/// `prctl` options, from linux/prctl.h.
pub(crate) mod pr {
    pub const GET_KEEPCAPS: u64 = 7;
    pub const SET_KEEPCAPS: u64 = 8;
    pub const SET_NAME: u64 = 15;
    pub const GET_NAME: u64 = 16;
    pub const CAPBSET_DROP: u64 = 24;
    pub const GET_SECUREBITS: u64 = 27;
    pub const SET_SECUREBITS: u64 = 28;
    pub const SET_TIMERSLACK: u64 = 29;
    pub const GET_TIMERSLACK: u64 = 30;
    pub const SET_THP_DISABLE: u64 = 41;
    pub const GET_THP_DISABLE: u64 = 42;
    pub const CAP_AMBIENT: u64 = 47;
    pub const CAP_AMBIENT_RAISE: u64 = 2;
}

/// x86-64 system call numbers used by the engine.
pub(crate) mod nr {
    pub use libc::{
        SYS_arch_prctl, SYS_brk, SYS_chdir, SYS_chroot, SYS_close, SYS_dup3, SYS_epoll_create1,
        SYS_epoll_ctl, SYS_epoll_wait, SYS_eventfd2, SYS_fcntl, SYS_getitimer, SYS_getpriority,
        SYS_gettid, SYS_lseek, SYS_madvise, SYS_memfd_create, SYS_mmap, SYS_mprotect, SYS_munmap,
        SYS_openat, SYS_personality, SYS_pipe2, SYS_prctl, SYS_prlimit64, SYS_rseq,
        SYS_rt_sigaction, SYS_rt_sigqueueinfo, SYS_rt_tgsigqueueinfo, SYS_seccomp,
        SYS_set_robust_list, SYS_set_tid_address, SYS_setgroups, SYS_setitimer, SYS_setresgid,
        SYS_setresuid, SYS_sigaltstack, SYS_signalfd4, SYS_timer_create, SYS_timer_getoverrun,
        SYS_timer_gettime, SYS_timer_settime, SYS_timerfd_create, SYS_timerfd_settime, SYS_umask,
        SYS_write,
    };
}
