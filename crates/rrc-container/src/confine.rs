//! What a container's programs are kept from, as far as it goes today:
//! the capabilities a mainstream runtime grants by default (and no more),
//! the kernel's information and controls under `/proc` masked or made
//! read-only, `/sys` read-only, the device files a runtime lets a
//! container use by default (its cgroup refuses the others), and seccomp
//! filters refusing what a runtime's default profile refuses. Applied in
//! the container's first process before its program runs; a restore
//! applies the mounts and the device list the same way, and the checkpoint
//! engine carries the capabilities and the filters across (they are part
//! of each process's state).
//!
//! A root file system of the container's own is [`crate::rootfs`]'s
//! (`--root private`), not yet the default.

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

/// System calls refused (EPERM) to a container's programs: those a
/// mainstream runtime's default seccomp profile refuses to a container
/// without extra capabilities. Most would fail anyway for want of a
/// capability; the filter also closes what an unprivileged program could
/// reach: user namespaces (`unshare`, `clone` with `CLONE_NEWUSER`), the
/// kernel's keyrings, BPF, performance counters, io_uring, userfaultfd,
/// and reading or writing other processes' memory.
const REFUSED: &[i64] = &[
    libc::SYS_acct,
    libc::SYS_add_key,
    libc::SYS_bpf,
    libc::SYS_clock_adjtime,
    libc::SYS_clock_settime,
    libc::SYS_delete_module,
    libc::SYS_fanotify_init,
    libc::SYS_finit_module,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fsopen,
    libc::SYS_fspick,
    libc::SYS_init_module,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_io_uring_setup,
    libc::SYS_ioperm,
    libc::SYS_iopl,
    libc::SYS_kcmp,
    libc::SYS_kexec_file_load,
    libc::SYS_kexec_load,
    libc::SYS_keyctl,
    libc::SYS_lookup_dcookie,
    libc::SYS_mount,
    libc::SYS_mount_setattr,
    libc::SYS_move_mount,
    libc::SYS_name_to_handle_at,
    libc::SYS_open_by_handle_at,
    libc::SYS_open_tree,
    libc::SYS_perf_event_open,
    libc::SYS_pivot_root,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_quotactl,
    libc::SYS_reboot,
    libc::SYS_request_key,
    libc::SYS_setns,
    libc::SYS_settimeofday,
    libc::SYS_swapoff,
    libc::SYS_swapon,
    libc::SYS_sysfs,
    libc::SYS_syslog,
    libc::SYS__sysctl,
    libc::SYS_umount2,
    libc::SYS_unshare,
    libc::SYS_uselib,
    libc::SYS_userfaultfd,
    libc::SYS_ustat,
    libc::SYS_vhangup,
];

/// The calls [`REFUSED`] lists that a container allowed user namespaces
/// (`rrc run --user-namespaces`) may make: a sandbox's (bubblewrap's)
/// namespaces and mounts. Without CAP_SYS_ADMIN, which a container does
/// not have, they act only inside the user namespaces the program makes;
/// what they open is the kernel's larger surface there, which is why the
/// default refuses them.
const USER_NAMESPACE_CALLS: &[i64] = &[
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_mount_setattr,
    libc::SYS_move_mount,
    libc::SYS_open_tree,
    libc::SYS_fsopen,
    libc::SYS_fsmount,
    libc::SYS_fsconfig,
    libc::SYS_fspick,
];

/// The seccomp filters a container's first process installs just before
/// its program (the checkpoint engine carries them across a checkpoint
/// and restore like any process's filters): [`REFUSED`] and `clone` with
/// `CLONE_NEWUSER` refused with EPERM (but, with `user_namespaces`, those
/// and [`USER_NAMESPACE_CALLS`]); and `clone3`, whose flags sit in memory
/// a filter cannot read, answered ENOSYS so that the C library falls
/// back to `clone` (as mainstream runtimes do).
pub fn seccomp_filters(
    user_namespaces: bool,
) -> Result<Vec<seccompiler::BpfProgram>, seccompiler::Error> {
    use seccompiler::{
        SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
        SeccompRule, TargetArch,
    };
    use std::collections::BTreeMap;
    let arch = TargetArch::try_from(std::env::consts::ARCH)?;
    let mut refused: BTreeMap<i64, Vec<SeccompRule>> = (REFUSED.iter())
        .filter(|nr| !(user_namespaces && USER_NAMESPACE_CALLS.contains(nr)))
        .map(|nr| (*nr, Vec::new()))
        .collect();
    let new_user = libc::CLONE_NEWUSER as u64;
    if !user_namespaces {
        refused.insert(
            libc::SYS_clone,
            vec![SeccompRule::new(vec![SeccompCondition::new(
                0,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(new_user),
                new_user,
            )?])?],
        );
    }
    let refuse = SeccompFilter::new(
        refused,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )?;
    let no_clone3 = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )?;
    Ok(vec![refuse.try_into()?, no_clone3.try_into()?])
}
