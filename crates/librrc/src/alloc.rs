//! librrc's own memory: every allocation of its Rust code (log loading,
//! the ring set's handle) is a mapping of its own, never the program's
//! `malloc`. The program's allocator must see exactly the same calls
//! whether it is recorded or replayed: its locks and its choices are part
//! of what is recorded.
//!
//! For the same reason librrc's mappings are placed far below where the
//! kernel puts the program's (a hint, taken when that range is free): the
//! program's own mappings then land where they would without librrc, in a
//! recording and in its replay alike, and an allocator that merges
//! neighbouring mappings makes the same decisions.

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Where librrc's mappings go: 16 TiB, far from the program's heap (near
/// its binary) and from the top-down area the kernel maps into.
pub const LOW_AREA: usize = 0x1000_0000_0000;

static NEXT_HINT: AtomicUsize = AtomicUsize::new(LOW_AREA + (1 << 40));

/// A private anonymous mapping of `len` bytes in librrc's low area (or
/// wherever the kernel puts it if that is taken); `None` if none.
pub fn map_low(len: usize) -> Option<*mut u8> {
    let len = round(len);
    let hint = NEXT_HINT.fetch_add(len + PAGE, Ordering::Relaxed);
    // SAFETY: a raw mmap of fresh memory, bypassing any wrapper; the hint
    // is not MAP_FIXED, so nothing mapped is replaced.
    let p = unsafe {
        libc::syscall(
            libc::SYS_mmap,
            hint,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0usize,
        )
    };
    (p >= 0).then_some(p as *mut u8)
}

pub struct Pages;

const PAGE: usize = 4096;

fn round(len: usize) -> usize {
    len.max(1).div_ceil(PAGE) * PAGE
}

// SAFETY: every block is a fresh private anonymous mapping, page-aligned
// (so any alignment up to a page is met; larger ones are refused), unmapped
// with the same rounded length it was mapped with.
unsafe impl GlobalAlloc for Pages {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.align() > PAGE {
            return std::ptr::null_mut();
        }
        // SAFETY: a raw mmap of fresh memory, bypassing any wrapper.
        let p = unsafe {
            libc::syscall(
                libc::SYS_mmap,
                0usize,
                round(layout.size()),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0usize,
            )
        };
        if p < 0 {
            std::ptr::null_mut()
        } else {
            p as *mut u8
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc` with this layout's rounded size.
        unsafe { libc::syscall(libc::SYS_munmap, ptr, round(layout.size())) };
    }
}
