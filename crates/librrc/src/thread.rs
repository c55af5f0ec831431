//! Per-thread state: whether the thread is inside librrc already, and its
//! log id. Thread-locals here have constant initializers and no
//! destructors, so touching them never allocates nor registers anything.

use std::cell::Cell;

thread_local! {
    static DEPTH: Cell<u32> = const { Cell::new(0) };
    /// 0: not assigned yet; log ids start at 1.
    static LOG_ID: Cell<u32> = const { Cell::new(0) };
}

/// Being inside librrc on this thread; leaving it on drop.
pub struct Inside(());

impl Drop for Inside {
    fn drop(&mut self) {
        let _ = DEPTH.try_with(|d| d.set(d.get() - 1));
        // Signals that arrived meanwhile are handled now.
        crate::signals::run_held();
    }
}

/// Whether this thread is inside librrc.
pub fn inside() -> bool {
    DEPTH.try_with(|d| d.get() > 0).unwrap_or(true)
}

/// Enters librrc, unless this thread already is inside it (or is being
/// torn down and has no thread-locals left).
pub fn enter() -> Option<Inside> {
    DEPTH
        .try_with(|d| {
            if d.get() > 0 {
                None
            } else {
                d.set(1);
                Some(Inside(()))
            }
        })
        .ok()
        .flatten()
}

pub fn log_id() -> u32 {
    LOG_ID.try_with(|c| c.get()).unwrap_or(0)
}

pub fn set_log_id(id: u32) {
    let _ = LOG_ID.try_with(|c| c.set(id));
}
