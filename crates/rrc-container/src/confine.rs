//! What a container's programs are kept from, as far as it goes today:
//! the capabilities a mainstream runtime grants by default (and no more),
//! the kernel's information and controls under `/proc` masked or made
//! read-only, `/sys` read-only, and the device files a runtime lets a
//! container use by default (its cgroup refuses the others). Applied in the
//! container's first process before its program runs; a restore applies the
//! mounts and the device list the same way, and the checkpoint engine
//! carries the capabilities across (they are part of each process's
//! credentials).
//!
//! Not yet: a root file system of the container's own and a seccomp
//! profile (see the README's security section).

use nix::mount::{MsFlags, mount};
use rrc_cgroup::{Access, DeviceKind, DeviceRule};

/// The devices a container may use: any node may be created (a program
/// cannot open what it creates unless listed here), and the usual
/// character devices opened: null, zero, full, random, urandom, the
/// terminal (`/dev/tty`, `/dev/ptmx` and pseudo-terminals), and tun. No
/// block device, no memory device, no kernel log. (Major and minor
/// numbers from the kernel's `Documentation/admin-guide/devices.txt`.)
pub const DEVICES: &[DeviceRule] = &[
    any(DeviceKind::Char, Access::MKNOD),
    any(DeviceKind::Block, Access::MKNOD),
    char(1, Some(3)),    // /dev/null
    char(1, Some(5)),    // /dev/zero
    char(1, Some(7)),    // /dev/full
    char(1, Some(8)),    // /dev/random
    char(1, Some(9)),    // /dev/urandom
    char(5, Some(0)),    // /dev/tty
    char(5, Some(2)),    // /dev/ptmx
    char(136, None),     // /dev/pts/*
    char(10, Some(200)), // /dev/net/tun
];

const fn any(kind: DeviceKind, access: Access) -> DeviceRule {
    DeviceRule {
        kind,
        major: None,
        minor: None,
        access,
    }
}

const fn char(major: u32, minor: Option<u32>) -> DeviceRule {
    DeviceRule {
        kind: DeviceKind::Char,
        major: Some(major),
        minor,
        access: Access::ALL,
    }
}

/// Capabilities a container keeps (those Docker and Podman grant by
/// default): enough to run a server as root inside, change its own files'
/// owners and drop to another user; none to load modules, mount, trace
/// other processes, change the network or the clock. (Numbers from
/// `linux/capability.h`, which the libc crate does not carry.)
const KEPT: &[u32] = &[
    0,  // CAP_CHOWN
    1,  // CAP_DAC_OVERRIDE
    3,  // CAP_FOWNER
    4,  // CAP_FSETID
    5,  // CAP_KILL
    6,  // CAP_SETGID
    7,  // CAP_SETUID
    8,  // CAP_SETPCAP
    10, // CAP_NET_BIND_SERVICE
    13, // CAP_NET_RAW
    18, // CAP_SYS_CHROOT
    27, // CAP_MKNOD
    29, // CAP_AUDIT_WRITE
    31, // CAP_SETFCAP
];

/// The bounding set a container has: [`KEPT`] as a mask.
pub fn bounding_set() -> u64 {
    KEPT.iter().fold(0u64, |m, c| m | 1 << c)
}

/// Files under `/proc` that tell a program about the host's kernel (its
/// memory, keys, timers, scheduling): replaced by `/dev/null`.
const MASKED_FILES: &[&str] = &[
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/sched_debug",
    "/proc/sysrq-trigger",
];
/// Directories under `/proc` and `/sys` hidden behind an empty read-only
/// file system.
const MASKED_DIRS: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];
/// Kernel controls a program may read but not change.
const READ_ONLY: &[&str] = &["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys"];

/// In the container's mount namespace, once `/proc` and `/sys` are
/// mounted: masks and read-only views. A path this kernel does not have
/// is skipped.
pub(crate) fn mounts() -> nix::Result<()> {
    let missing = |r: nix::Result<()>| match r {
        Err(nix::errno::Errno::ENOENT) => Ok(()),
        r => r,
    };
    for f in MASKED_FILES {
        missing(mount(
            Some("/dev/null"),
            *f,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        ))?;
    }
    for d in MASKED_DIRS {
        missing(mount(
            Some("tmpfs"),
            *d,
            Some("tmpfs"),
            MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None::<&str>,
        ))?;
    }
    for d in READ_ONLY {
        missing(mount(
            Some(*d),
            *d,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        ))?;
        missing(mount(
            None::<&str>,
            *d,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        ))?;
    }
    Ok(())
}

/// In the container's first process, just before its program: every
/// capability but [`KEPT`] leaves the bounding set (the program, root or
/// not, gets no more than that at exec) and none is ambient.
pub(crate) fn capabilities() -> nix::Result<()> {
    let kept = bounding_set();
    for cap in 0..64u32 {
        if kept & (1 << cap) != 0 {
            continue;
        }
        // SAFETY: prctl with integer arguments.
        let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        if r != 0 {
            match nix::errno::Errno::last() {
                // Past the last capability this kernel knows.
                nix::errno::Errno::EINVAL => break,
                e => return Err(e),
            }
        }
    }
    // SAFETY: prctl with integer arguments.
    let r = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    if r != 0 {
        return Err(nix::errno::Errno::last());
    }
    Ok(())
}
