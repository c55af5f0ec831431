//! Synchronization: the order in which threads acquire and release locks,
//! wait on and signal condition variables and semaphores. An acquisition
//! is recorded after it succeeded (while the lock is held, so the
//! recorded order of one lock's acquisitions is the real one); a release
//! before it happens (so it precedes the next acquisition).

use libc::{c_int, pthread_cond_t, pthread_mutex_t, pthread_rwlock_t, sem_t, timespec};
use rrc_rr::log::{Event, SyncOp};

use crate::hooks::{SavedErrno, outcome};
use crate::real::get;
use crate::{record, thread};

fn note(op: SyncOp, obj: usize, ret: c_int) {
    record::emit(&Event::Sync {
        op,
        obj: obj as u64,
        ret,
    });
}

/// A wrapper that calls the C library, then records the operation with
/// the call's result (pthread functions return an error number).
macro_rules! after {
    ($name:ident, $op:ident, $obj:ident: $objty:ty $(, $arg:ident: $ty:ty)*) => {
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name($obj: $objty $(, $arg: $ty)*) -> c_int {
            // SAFETY: the program's arguments, passed on unchanged.
            let ret = unsafe { get::$name()($obj $(, $arg)*) };
            if let Some(_inside) = thread::enter() {
                let _e = SavedErrno::save();
                note(SyncOp::$op, $obj as usize, ret);
            }
            ret
        }
    };
}

/// A wrapper that records the operation, then calls the C library.
macro_rules! before {
    ($name:ident, $op:ident, $obj:ident: $objty:ty) => {
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name($obj: $objty) -> c_int {
            if let Some(_inside) = thread::enter() {
                note(SyncOp::$op, $obj as usize, 0);
            }
            // SAFETY: the program's argument, passed on unchanged.
            unsafe { get::$name()($obj) }
        }
    };
}

/// As `after`, for the semaphore calls that return -1 and set errno.
macro_rules! sem_after {
    ($name:ident, $op:ident, $obj:ident: $objty:ty $(, $arg:ident: $ty:ty)*) => {
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name($obj: $objty $(, $arg: $ty)*) -> c_int {
            // SAFETY: the program's arguments, passed on unchanged.
            let ret = unsafe { get::$name()($obj $(, $arg)*) };
            if let Some(_inside) = thread::enter() {
                let _e = SavedErrno::save();
                note(SyncOp::$op, $obj as usize, outcome(i64::from(ret)) as c_int);
            }
            ret
        }
    };
}

after!(pthread_mutex_lock, MutexLock, m: *mut pthread_mutex_t);
after!(pthread_mutex_trylock, MutexTrylock, m: *mut pthread_mutex_t);
after!(pthread_mutex_timedlock, MutexTimedlock, m: *mut pthread_mutex_t, t: *const timespec);
before!(pthread_mutex_unlock, MutexUnlock, m: *mut pthread_mutex_t);

after!(pthread_rwlock_rdlock, RwlockRdlock, l: *mut pthread_rwlock_t);
after!(pthread_rwlock_wrlock, RwlockWrlock, l: *mut pthread_rwlock_t);
after!(pthread_rwlock_tryrdlock, RwlockTryrdlock, l: *mut pthread_rwlock_t);
after!(pthread_rwlock_trywrlock, RwlockTrywrlock, l: *mut pthread_rwlock_t);
after!(pthread_rwlock_timedrdlock, RwlockTimedrdlock, l: *mut pthread_rwlock_t, t: *const timespec);
after!(pthread_rwlock_timedwrlock, RwlockTimedwrlock, l: *mut pthread_rwlock_t, t: *const timespec);
before!(pthread_rwlock_unlock, RwlockUnlock, l: *mut pthread_rwlock_t);

// The wait releases the mutex and takes it back before returning: the
// record marks the reacquisition.
after!(pthread_cond_wait, CondWait, c: *mut pthread_cond_t, m: *mut pthread_mutex_t);
after!(pthread_cond_timedwait, CondTimedwait, c: *mut pthread_cond_t, m: *mut pthread_mutex_t, t: *const timespec);
after!(pthread_cond_signal, CondSignal, c: *mut pthread_cond_t);
after!(pthread_cond_broadcast, CondBroadcast, c: *mut pthread_cond_t);

sem_after!(sem_wait, SemWait, s: *mut sem_t);
sem_after!(sem_trywait, SemTrywait, s: *mut sem_t);
sem_after!(sem_timedwait, SemTimedwait, s: *mut sem_t, t: *const timespec);
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sem_post(s: *mut sem_t) -> c_int {
    if let Some(_inside) = thread::enter() {
        note(SyncOp::SemPost, s as usize, 0);
    }
    // SAFETY: the program's argument, passed on unchanged.
    unsafe { get::sem_post()(s) }
}

after!(pthread_spin_lock, SpinLock, l: *mut libc::pthread_spinlock_t);
after!(pthread_spin_trylock, SpinTrylock, l: *mut libc::pthread_spinlock_t);
before!(pthread_spin_unlock, SpinUnlock, l: *mut libc::pthread_spinlock_t);

after!(pthread_once, Once, o: *mut libc::pthread_once_t, f: extern "C" fn());
