//! The functions librrc wraps, as the C library defines them: found with
//! `dlsym(RTLD_NEXT, ...)` once, at load time (when the program is still
//! single-threaded), and on first use by a call that comes before that
//! (another library's constructor).

use std::sync::atomic::{AtomicUsize, Ordering};

/// Declares, for each wrapped function, a cached address and an accessor
/// returning it as a typed function pointer.
macro_rules! real_functions {
    ($($name:ident: fn($($arg:ty),*) -> $ret:ty;)*) => {
        $(
            #[allow(non_upper_case_globals)]
            static $name: AtomicUsize = AtomicUsize::new(0);
        )*

        /// Typed accessors of the real functions.
        pub mod get {
            use super::*;
            $(
                #[inline]
                pub fn $name() -> unsafe extern "C" fn($($arg),*) -> $ret {
                    let mut addr = super::$name.load(Ordering::Acquire);
                    if addr == 0 {
                        addr = resolve(concat!(stringify!($name), "\0"));
                        super::$name.store(addr, Ordering::Release);
                    }
                    // SAFETY: `addr` is the address dlsym gave for the C
                    // library function of this name, whose C signature is
                    // the one declared here (the glibc prototype).
                    unsafe {
                        std::mem::transmute::<usize, unsafe extern "C" fn($($arg),*) -> $ret>(addr)
                    }
                }
            )*
        }

        /// Resolves every function now.
        pub fn resolve_all() {
            $( let _ = get::$name(); )*
        }
    };
}

use libc::{
    c_int, c_uint, c_void, clockid_t, epoll_event, iovec, msghdr, nfds_t, pollfd, size_t, sockaddr,
    socklen_t, ssize_t, time_t, timespec, timeval,
};

real_functions! {
    read: fn(c_int, *mut c_void, size_t) -> ssize_t;
    readv: fn(c_int, *const iovec, c_int) -> ssize_t;
    pread64: fn(c_int, *mut c_void, size_t, libc::off64_t) -> ssize_t;
    recv: fn(c_int, *mut c_void, size_t, c_int) -> ssize_t;
    recvfrom: fn(c_int, *mut c_void, size_t, c_int, *mut sockaddr, *mut socklen_t) -> ssize_t;
    recvmsg: fn(c_int, *mut msghdr, c_int) -> ssize_t;
    accept: fn(c_int, *mut sockaddr, *mut socklen_t) -> c_int;
    accept4: fn(c_int, *mut sockaddr, *mut socklen_t, c_int) -> c_int;
    epoll_wait: fn(c_int, *mut epoll_event, c_int, c_int) -> c_int;
    epoll_pwait: fn(c_int, *mut epoll_event, c_int, c_int, *const libc::sigset_t) -> c_int;
    epoll_pwait2: fn(c_int, *mut epoll_event, c_int, *const timespec, *const libc::sigset_t) -> c_int;
    fread: fn(*mut c_void, size_t, size_t, *mut libc::FILE) -> size_t;
    getentropy: fn(*mut c_void, size_t) -> c_int;
    poll: fn(*mut pollfd, nfds_t, c_int) -> c_int;
    clock_gettime: fn(clockid_t, *mut timespec) -> c_int;
    gettimeofday: fn(*mut timeval, *mut c_void) -> c_int;
    time: fn(*mut time_t) -> time_t;
    getrandom: fn(*mut c_void, size_t, c_uint) -> ssize_t;
    pthread_create: fn(*mut libc::pthread_t, *const libc::pthread_attr_t, StartRoutine, *mut c_void) -> c_int;
    pthread_exit: fn(*mut c_void) -> ();
    fork: fn() -> libc::pid_t;
    sigaction: fn(c_int, *const libc::sigaction, *mut libc::sigaction) -> c_int;
    write: fn(c_int, *const c_void, size_t) -> ssize_t;
    writev: fn(c_int, *const iovec, c_int) -> ssize_t;
    send: fn(c_int, *const c_void, size_t, c_int) -> ssize_t;
    sendto: fn(c_int, *const c_void, size_t, c_int, *const sockaddr, socklen_t) -> ssize_t;
    sendmsg: fn(c_int, *const msghdr, c_int) -> ssize_t;
    sendfile: fn(c_int, c_int, *mut libc::off_t, size_t) -> ssize_t;
    wait: fn(*mut c_int) -> libc::pid_t;
    waitpid: fn(libc::pid_t, *mut c_int, c_int) -> libc::pid_t;
    wait3: fn(*mut c_int, c_int, *mut libc::rusage) -> libc::pid_t;
    wait4: fn(libc::pid_t, *mut c_int, c_int, *mut libc::rusage) -> libc::pid_t;
    waitid: fn(libc::idtype_t, libc::id_t, *mut libc::siginfo_t, c_int) -> c_int;
    pthread_mutex_lock: fn(*mut libc::pthread_mutex_t) -> c_int;
    pthread_mutex_trylock: fn(*mut libc::pthread_mutex_t) -> c_int;
    pthread_mutex_timedlock: fn(*mut libc::pthread_mutex_t, *const timespec) -> c_int;
    pthread_mutex_unlock: fn(*mut libc::pthread_mutex_t) -> c_int;
    pthread_rwlock_rdlock: fn(*mut libc::pthread_rwlock_t) -> c_int;
    pthread_rwlock_wrlock: fn(*mut libc::pthread_rwlock_t) -> c_int;
    pthread_rwlock_tryrdlock: fn(*mut libc::pthread_rwlock_t) -> c_int;
    pthread_rwlock_trywrlock: fn(*mut libc::pthread_rwlock_t) -> c_int;
    pthread_rwlock_timedrdlock: fn(*mut libc::pthread_rwlock_t, *const timespec) -> c_int;
    pthread_rwlock_timedwrlock: fn(*mut libc::pthread_rwlock_t, *const timespec) -> c_int;
    pthread_rwlock_unlock: fn(*mut libc::pthread_rwlock_t) -> c_int;
    pthread_cond_wait: fn(*mut libc::pthread_cond_t, *mut libc::pthread_mutex_t) -> c_int;
    pthread_cond_timedwait: fn(*mut libc::pthread_cond_t, *mut libc::pthread_mutex_t, *const timespec) -> c_int;
    pthread_cond_signal: fn(*mut libc::pthread_cond_t) -> c_int;
    pthread_cond_broadcast: fn(*mut libc::pthread_cond_t) -> c_int;
    sem_wait: fn(*mut libc::sem_t) -> c_int;
    sem_trywait: fn(*mut libc::sem_t) -> c_int;
    sem_timedwait: fn(*mut libc::sem_t, *const timespec) -> c_int;
    sem_post: fn(*mut libc::sem_t) -> c_int;
    pthread_spin_lock: fn(*mut libc::pthread_spinlock_t) -> c_int;
    pthread_spin_trylock: fn(*mut libc::pthread_spinlock_t) -> c_int;
    pthread_spin_unlock: fn(*mut libc::pthread_spinlock_t) -> c_int;
    pthread_once: fn(*mut libc::pthread_once_t, extern "C" fn()) -> c_int;
    select: fn(c_int, *mut libc::fd_set, *mut libc::fd_set, *mut libc::fd_set, *mut timeval) -> c_int;
    pselect: fn(c_int, *mut libc::fd_set, *mut libc::fd_set, *mut libc::fd_set, *const timespec, *const libc::sigset_t) -> c_int;
    ppoll: fn(*mut pollfd, nfds_t, *const timespec, *const libc::sigset_t) -> c_int;
    recvmmsg: fn(c_int, *mut libc::mmsghdr, c_uint, c_int, *mut timespec) -> c_int;
    close: fn(c_int) -> c_int;
    mmap: fn(*mut c_void, size_t, c_int, c_int, c_int, libc::off_t) -> *mut c_void;
    mremap: fn(*mut c_void, size_t, size_t, c_int, *mut c_void) -> *mut c_void;
}

/// A thread's start routine.
pub type StartRoutine = extern "C" fn(*mut c_void) -> *mut c_void;

/// The next definition of `name` after this library's.
fn resolve(name: &'static str) -> usize {
    // SAFETY: `name` is NUL-terminated (the macro appends the NUL) and
    // RTLD_NEXT is a valid pseudo-handle.
    let p = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr().cast()) };
    if p.is_null() {
        crate::fatal(b"librrc: a wrapped C library function is missing\n");
    }
    p as usize
}
