//! Synchronization: the order in which threads acquire and release locks,
//! wait on and signal condition variables and semaphores. An acquisition
//! is recorded after it succeeded (while the lock is held, so the
//! recorded order of one lock's acquisitions is the real one); a release
//! before it happens (so it precedes the next acquisition); a wait when it
//! returns.
//!
//! In replay an operation waits for its turn in the recorded order. An
//! acquisition or release takes its turn before the real call (a thread
//! holding a lock out of turn could block the thread whose turn it is); a
//! wait makes the real call first (its wake-up comes from another thread's
//! turn) and takes its turn when it returns. A try or timed acquisition
//! returns what it returned when recorded: it blocks to succeed, or fails
//! without trying.

use libc::{c_int, pthread_cond_t, pthread_mutex_t, pthread_rwlock_t, sem_t, timespec};
use rrc_rr::log::{Event, SyncOp};

use crate::hooks::{logged, outcome, served};
use crate::real::get;
use crate::{record, replay};

/// Records the operation; true if the process turned out to be a copy
/// restored for replay (see [`record::emit`]).
fn note(op: SyncOp, obj: usize, ret: c_int) -> bool {
    logged(|| Event::Sync {
        op,
        obj: obj as u64,
        ret,
    })
}

/// After a switch to replay: an operation already made only takes its
/// turn.
fn take_turn_only(op: SyncOp, obj: usize, call: &'static str) {
    if let Some(t) = turn(op, obj, call) {
        t.complete();
    }
}

/// In replay, this thread's next record if it is `op` on `obj`. The object
/// is compared only when the replay runs in the recorded address space (a
/// restored checkpoint); from a program's start its heap may lie
/// elsewhere.
fn turn(op: SyncOp, obj: usize, call: &'static str) -> Option<replay::Turn> {
    if !replay::active() {
        return None;
    }
    let same = replay::same_addresses();
    replay::take(
        call,
        |e| matches!(e, Event::Sync { op: o, obj: a, .. } if *o == op && (!same || *a == obj as u64)),
    )
}

fn recorded_ret(t: &replay::Turn) -> c_int {
    match t.record.event {
        Event::Sync { ret, .. } => ret,
        _ => 0,
    }
}

/// In replay: the real call, made in this thread's turn, and returned.
macro_rules! real_call_in_turn {
    ($name:ident, $op:ident, $obj:ident $(, $arg:ident)*) => {
        if let Some(t) = turn(SyncOp::$op, $obj as usize, stringify!($name)) {
            // SAFETY: the program's arguments, passed on unchanged.
            let ret = unsafe { get::$name()($obj $(, $arg)*) };
            t.complete();
            return ret;
        }
    };
}

/// A copy restored for replay learned it here, after taking a lock: the
/// lock (if the call got it) is let go with `$undo` before the program
/// sees it, and the call is made again, the replay's way.
macro_rules! undo_and_call_again {
    ($name:ident, $undo:ident, $ret:expr, $obj:ident $(, $arg:ident)*) => {{
        if $ret == 0 {
            // SAFETY: the lock this thread just took, not yet seen by the
            // program.
            unsafe { get::$undo()($obj) };
        }
        // SAFETY: as the program called it.
        return unsafe { $name($obj $(, $arg)*) };
    }};
}

/// Acquisitions and releases: recorded around the real call; in replay
/// the turn comes first.
///
/// When the record reveals a copy restored for replay: a release (recorded
/// before it happens) is simply made again, the replay's way; an
/// acquisition that can be undone (`undo`: the matching release) is let
/// go and made again in turn; one that cannot (a signal, a once) keeps
/// its effect and only takes its turn.
macro_rules! ordered {
    ($name:ident, $op:ident, release, $obj:ident: $objty:ty $(, $arg:ident: $ty:ty)*) => {
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name($obj: $objty $(, $arg: $ty)*) -> c_int {
            real_call_in_turn!($name, $op, $obj $(, $arg)*);
            if note(SyncOp::$op, $obj as usize, 0) {
                // SAFETY: as the program called it, now in its turn.
                return unsafe { $name($obj $(, $arg)*) };
            }
            // SAFETY: the program's arguments, passed on unchanged.
            unsafe { get::$name()($obj $(, $arg)*) }
        }
    };
    ($name:ident, $op:ident, acquire, undo: $undo:ident, $obj:ident: $objty:ty $(, $arg:ident: $ty:ty)*) => {
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name($obj: $objty $(, $arg: $ty)*) -> c_int {
            real_call_in_turn!($name, $op, $obj $(, $arg)*);
            // SAFETY: the program's arguments, passed on unchanged.
            let ret = unsafe { get::$name()($obj $(, $arg)*) };
            if note(SyncOp::$op, $obj as usize, ret) {
                undo_and_call_again!($name, $undo, ret, $obj $(, $arg)*);
            }
            ret
        }
    };
    ($name:ident, $op:ident, acquire, $obj:ident: $objty:ty $(, $arg:ident: $ty:ty)*) => {
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name($obj: $objty $(, $arg: $ty)*) -> c_int {
            real_call_in_turn!($name, $op, $obj $(, $arg)*);
            // SAFETY: the program's arguments, passed on unchanged.
            let ret = unsafe { get::$name()($obj $(, $arg)*) };
            if note(SyncOp::$op, $obj as usize, ret) {
                take_turn_only(SyncOp::$op, $obj as usize, stringify!($name));
            }
            ret
        }
    };
}

/// Try and timed acquisitions: in replay, the recorded outcome. After a
/// switch to replay, a success is let go (`$undo`) and the call made
/// again.
macro_rules! attempt {
    ($name:ident, $op:ident, $blocking:ident, $undo:ident, $obj:ident: $objty:ty $(, $arg:ident: $ty:ty)*) => {
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name($obj: $objty $(, $arg: $ty)*) -> c_int {
            if let Some(t) = turn(SyncOp::$op, $obj as usize, stringify!($name)) {
                let ret = recorded_ret(&t);
                if ret == 0 {
                    // SAFETY: the program's lock, taken the blocking way.
                    unsafe { get::$blocking()($obj) };
                }
                t.complete();
                return ret;
            }
            // SAFETY: the program's arguments, passed on unchanged.
            let ret = unsafe { get::$name()($obj $(, $arg)*) };
            if note(SyncOp::$op, $obj as usize, ret) {
                undo_and_call_again!($name, $undo, ret, $obj $(, $arg)*);
            }
            ret
        }
    };
}

/// Waits: the real call, then the record (in replay, the turn).
macro_rules! wait {
    ($name:ident, $op:ident, errno: $errno:expr, $obj:ident: $objty:ty $(, $arg:ident: $ty:ty)*) => {
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name($obj: $objty $(, $arg: $ty)*) -> c_int {
            // As before a condition wait: no record left in the batch.
            record::flush_before_blocking();
            // SAFETY: the program's arguments, passed on unchanged.
            let ret = unsafe { get::$name()($obj $(, $arg)*) };
            if let Some(t) = turn(SyncOp::$op, $obj as usize, stringify!($name)) {
                t.complete();
                return ret;
            }
            let r = if $errno { outcome(i64::from(ret)) as c_int } else { ret };
            if note(SyncOp::$op, $obj as usize, r) {
                take_turn_only(SyncOp::$op, $obj as usize, stringify!($name));
            }
            ret
        }
    };
}

ordered!(pthread_mutex_lock, MutexLock, acquire, undo: pthread_mutex_unlock, m: *mut pthread_mutex_t);
attempt!(pthread_mutex_trylock, MutexTrylock, pthread_mutex_lock, pthread_mutex_unlock, m: *mut pthread_mutex_t);
attempt!(pthread_mutex_timedlock, MutexTimedlock, pthread_mutex_lock, pthread_mutex_unlock, m: *mut pthread_mutex_t, t: *const timespec);
ordered!(pthread_mutex_unlock, MutexUnlock, release, m: *mut pthread_mutex_t);

ordered!(pthread_rwlock_rdlock, RwlockRdlock, acquire, undo: pthread_rwlock_unlock, l: *mut pthread_rwlock_t);
ordered!(pthread_rwlock_wrlock, RwlockWrlock, acquire, undo: pthread_rwlock_unlock, l: *mut pthread_rwlock_t);
attempt!(pthread_rwlock_tryrdlock, RwlockTryrdlock, pthread_rwlock_rdlock, pthread_rwlock_unlock, l: *mut pthread_rwlock_t);
attempt!(pthread_rwlock_trywrlock, RwlockTrywrlock, pthread_rwlock_wrlock, pthread_rwlock_unlock, l: *mut pthread_rwlock_t);
attempt!(pthread_rwlock_timedrdlock, RwlockTimedrdlock, pthread_rwlock_rdlock, pthread_rwlock_unlock, l: *mut pthread_rwlock_t, t: *const timespec);
attempt!(pthread_rwlock_timedwrlock, RwlockTimedwrlock, pthread_rwlock_wrlock, pthread_rwlock_unlock, l: *mut pthread_rwlock_t, t: *const timespec);
ordered!(pthread_rwlock_unlock, RwlockUnlock, release, l: *mut pthread_rwlock_t);

/// Condition waits: the wait releases the mutex and takes it back before
/// returning, and the record marks the reacquisition. In replay the real
/// wait takes the mutex back out of turn, so it is let go again, and taken
/// back in turn.
macro_rules! cond_wait {
    ($name:ident, $op:ident $(, $arg:ident: $ty:ty)*) => {
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(
            c: *mut pthread_cond_t,
            m: *mut pthread_mutex_t
            $(, $arg: $ty)*
        ) -> c_int {
            // A thread may sleep here for long: what it recorded must not
            // wait in its batch meanwhile (the log would have a hole).
            record::flush_before_blocking();
            // SAFETY: the program's arguments, passed on unchanged.
            let ret = unsafe { get::$name()(c, m $(, $arg)*) };
            if replay::active() || note(SyncOp::$op, c as usize, ret) {
                // SAFETY: the program's mutex, which the wait returned
                // holding.
                unsafe { get::pthread_mutex_unlock()(m) };
                let t = turn(SyncOp::$op, c as usize, stringify!($name));
                // SAFETY: as above; the caller must get it back held.
                unsafe { get::pthread_mutex_lock()(m) };
                if let Some(t) = t {
                    t.complete();
                }
            }
            ret
        }
    };
}

cond_wait!(pthread_cond_wait, CondWait);
cond_wait!(pthread_cond_timedwait, CondTimedwait, t: *const timespec);
ordered!(pthread_cond_signal, CondSignal, acquire, c: *mut pthread_cond_t);
ordered!(pthread_cond_broadcast, CondBroadcast, acquire, c: *mut pthread_cond_t);

wait!(sem_wait, SemWait, errno: true, s: *mut sem_t);
wait!(sem_timedwait, SemTimedwait, errno: true, s: *mut sem_t, t: *const timespec);
ordered!(sem_post, SemPost, release, s: *mut sem_t);

#[unsafe(no_mangle)]
pub unsafe extern "C" fn sem_trywait(s: *mut sem_t) -> c_int {
    if let Some(t) = turn(SyncOp::SemTrywait, s as usize, "sem_trywait") {
        let ret = recorded_ret(&t);
        if ret == 0 {
            // SAFETY: the program's semaphore, taken the blocking way.
            unsafe { get::sem_wait()(s) };
        }
        t.complete();
        return served(i64::from(ret)) as c_int;
    }
    // SAFETY: the program's argument, passed on unchanged.
    let ret = unsafe { get::sem_trywait()(s) };
    let r = outcome(i64::from(ret)) as c_int;
    if note(SyncOp::SemTrywait, s as usize, r) {
        undo_and_call_again!(sem_trywait, sem_post, ret, s);
    }
    ret
}

ordered!(pthread_spin_lock, SpinLock, acquire, undo: pthread_spin_unlock, l: *mut libc::pthread_spinlock_t);
attempt!(pthread_spin_trylock, SpinTrylock, pthread_spin_lock, pthread_spin_unlock, l: *mut libc::pthread_spinlock_t);
ordered!(pthread_spin_unlock, SpinUnlock, release, l: *mut libc::pthread_spinlock_t);

ordered!(pthread_once, Once, acquire, o: *mut libc::pthread_once_t, f: extern "C" fn());
