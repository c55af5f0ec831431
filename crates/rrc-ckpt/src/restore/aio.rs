//! Linux AIO contexts made again.
//!
//! A context is known to its program by the address of its completion
//! ring. The restored process makes a context of the same size
//! (`io_setup`) wherever the kernel puts it, brings the kernel's own
//! position in the ring to the image's, fills in the events the program
//! had not read yet, and moves the ring to its address (`mremap`, which
//! the kernel follows for AIO rings).
//!
//! The kernel keeps where it writes the next completion to itself and
//! counts free slots by the completions it has made, so both are set the
//! only way there is: by completing requests. Writes of one byte to a
//! memfd complete within `io_submit`. The program's `head` (the next
//! event it reads) is in the ring, which the kernel reads back, so the
//! restore sets it by writing it.

use nix::unistd::Pid;

use crate::image::aio_ring::{self, EVENT, HEAD, HEADER, ID, NR, TAIL};
use crate::image::{Vma, VmaKind};
use crate::procmem;
use crate::restore::tracee::Tracee;
use crate::{Error, Result, nr};

/// Requests submitted per `io_submit`: their pointers go through the
/// scratch region.
const PER_SUBMIT: u64 = 4096;
/// `struct iocb`: 64 bytes; where its buffer, length and file are.
const IOCB: usize = 64;
const IOCB_OPCODE: usize = 16;
const IOCB_FILDES: usize = 20;
const IOCB_BUF: usize = 24;
const IOCB_NBYTES: usize = 32;
const IOCB_CMD_PWRITE: u16 = 1;

fn rerr(pid: i32, detail: String) -> Error {
    Error::Restore {
        pid,
        stage: "AIO context",
        detail,
    }
}

/// Makes the AIO contexts among `vmas` again. The rest of the address
/// space is in place: the kernel puts each new ring in a gap that nothing
/// of the image needs. A new context takes the lowest free place in the
/// process's table, so they are made in the order of their ids, with
/// placeholders (destroyed at the end) where the image has none.
pub fn make_rings(t: &mut Tracee, vmas: &[Vma]) -> Result<()> {
    let mut rings: Vec<(u32, &Vma)> = vmas
        .iter()
        .filter_map(|v| match v.kind {
            VmaKind::AioRing { id, .. } => Some((id, v)),
            _ => None,
        })
        .collect();
    rings.sort_by_key(|(id, _)| *id);
    let mut placeholders = Vec::new();
    // The id the next context gets (ids are checked below MAX_CONTEXTS).
    let mut next = 0;
    for (id, v) in rings {
        while next < id {
            placeholders.push(setup(t, 1)?);
            next += 1;
        }
        make_ring(t, v)?;
        next += 1;
    }
    for ctx in placeholders {
        t.call("io_destroy", libc::SYS_io_destroy, &[ctx])?;
    }
    Ok(())
}

/// A new context for `nr_events`; its handle.
fn setup(t: &mut Tracee, nr_events: u64) -> Result<u64> {
    let out = t.out(8)?;
    t.call("io_setup", libc::SYS_io_setup, &[nr_events, out])?;
    let mut ctx = [0u8; 8];
    procmem::read(t.pid, out, &mut ctx)?;
    Ok(u64::from_ne_bytes(ctx))
}

fn make_ring(t: &mut Tracee, v: &Vma) -> Result<()> {
    let pid = t.ns_pid;
    let VmaKind::AioRing {
        id,
        nr,
        head,
        tail,
        events,
    } = &v.kind
    else {
        return Ok(());
    };
    let (id, nr, head, tail) = (*id, *nr, *head, *tail);
    let len = v.end - v.start;
    let pending = aio_ring::pending(nr, head, tail);
    // Checked when the image was loaded; again here, as the slicing below
    // relies on it.
    aio_ring::check_vma(v).map_err(|what| rerr(pid, format!("at {:#x}: {what}", v.start)))?;
    let ctx = setup(t, aio_ring::setup_request(u64::from(nr)))?;
    let (made, made_id) = (word(t.pid, ctx + NR as u64)?, word(t.pid, ctx + ID as u64)?);
    if made != nr || made_id != id {
        t.call("io_destroy", libc::SYS_io_destroy, &[ctx])?;
        return Err(rerr(
            pid,
            format!(
                "io_setup made context {made_id} with a ring of {made} events where the \
                 image's at {:#x} was context {id} with {nr} (this machine has more possible \
                 CPUs?)",
                v.start
            ),
        ));
    }
    // Up to `head` with every completion read, then up to `tail` with
    // none: the kernel then counts exactly the pending events as taking
    // slots.
    let name = t.arg_str("rrc-aio")?;
    let fd = t.call(
        "memfd for AIO",
        nr::SYS_memfd_create,
        &[name, libc::MFD_CLOEXEC as u64],
    )?;
    let advanced = advance(t, ctx, fd, u64::from(head), true)
        .and_then(|()| advance(t, ctx, fd, pending, false));
    t.call("close", nr::SYS_close, &[fd])?;
    advanced?;
    let now = word(t.pid, ctx + TAIL as u64)?;
    if now != tail {
        return Err(rerr(
            pid,
            format!("the kernel's tail is at {now} where it was to be at {tail}"),
        ));
    }
    // The pending events, from head on, wrapping at the ring's end.
    let slot = |i: u32| ctx + (HEADER + i as usize * EVENT) as u64;
    let first = (pending as usize).min((nr - head) as usize) * EVENT;
    procmem::write(t.pid, slot(head), &events.0[..first])?;
    procmem::write(t.pid, slot(0), &events.0[first..])?;
    let at = t.call(
        "move an AIO ring into place",
        libc::SYS_mremap,
        &[
            ctx,
            len,
            len,
            (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64,
            v.start,
        ],
    )?;
    if at != v.start {
        return Err(rerr(
            pid,
            format!("mremap put the ring at {at:#x}, not {:#x}", v.start),
        ));
    }
    let made_prot = (libc::PROT_READ | libc::PROT_WRITE) as u32;
    if v.prot != made_prot {
        t.call(
            "protect an AIO ring",
            nr::SYS_mprotect,
            &[v.start, len, u64::from(v.prot)],
        )?;
    }
    Ok(())
}

/// Completes `count` requests in context `ctx` (writes of a byte to `fd`);
/// with `read_all`, the program's head follows the kernel's tail.
fn advance(t: &mut Tracee, ctx: u64, fd: u64, count: u64, read_all: bool) -> Result<()> {
    let nr = u64::from(word(t.pid, ctx + NR as u64)?);
    let mut done = 0;
    let mut stuck = 0;
    while done < count {
        let n = (count - done).min(nr - 1).min(PER_SUBMIT);
        // The request writes its own first byte.
        let iocb_at = t.out(IOCB)?;
        let mut iocb = [0u8; IOCB];
        iocb[IOCB_OPCODE..IOCB_OPCODE + 2].copy_from_slice(&IOCB_CMD_PWRITE.to_ne_bytes());
        iocb[IOCB_FILDES..IOCB_FILDES + 4].copy_from_slice(&(fd as u32).to_ne_bytes());
        iocb[IOCB_BUF..IOCB_BUF + 8].copy_from_slice(&iocb_at.to_ne_bytes());
        iocb[IOCB_NBYTES..IOCB_NBYTES + 8].copy_from_slice(&1u64.to_ne_bytes());
        procmem::write(t.pid, iocb_at, &iocb)?;
        let pointers: Vec<u8> = (0..n).flat_map(|_| iocb_at.to_ne_bytes()).collect();
        let list = t.arg(&pointers)?;
        let r = t.raw_on(t.pid, libc::SYS_io_submit, &[ctx, n, list])?;
        // The kernel hands out free slots per CPU in batches; fewer than
        // asked (or none, EAGAIN) can be taken while others are cached.
        if r > 0 {
            done += r as u64;
            stuck = 0;
        } else if r == -libc::EAGAIN as i64 && stuck < 100 {
            stuck += 1;
        } else {
            return Err(rerr(
                t.ns_pid,
                format!(
                    "io_submit completed {done} of the {count} requests that set the ring's \
                     position: {}",
                    std::io::Error::from_raw_os_error(-r as i32)
                ),
            ));
        }
        if read_all {
            let head = word(t.pid, ctx + TAIL as u64)?;
            procmem::write(t.pid, ctx + HEAD as u64, &head.to_ne_bytes())?;
        }
    }
    Ok(())
}

fn word(pid: Pid, at: u64) -> Result<u32> {
    let mut b = [0u8; 4];
    procmem::read(pid, at, &mut b)?;
    Ok(u32::from_ne_bytes(b))
}
