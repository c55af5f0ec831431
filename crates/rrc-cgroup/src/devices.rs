//! Which device files a group's processes may open or create: a list of
//! rules, everything else refused (EPERM at `open` or `mknod`).
//!
//! On cgroup v1 the `devices` controller takes the rules as text
//! (`devices.deny`, then `devices.allow`). Cgroup v2 has no such files: the
//! kernel asks a BPF program of type `CGROUP_DEVICE` attached to the group.
//! No maintained crate assembles such a program without a BPF toolchain,
//! and the program is a dozen instructions per rule, so it is built here;
//! the only `unsafe` is the two `bpf` system calls that load and attach it.

use std::fs;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use crate::{Cgroup, Error, Result, Version, write_file};

/// Which kind of device a rule is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    Char,
    Block,
}

/// Operations on a device: open it for reading, for writing, create its
/// node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access(u8);

impl Access {
    pub const MKNOD: Access = Access(1);
    pub const READ: Access = Access(2);
    pub const WRITE: Access = Access(4);
    pub const ALL: Access = Access(7);

    fn letters(self) -> String {
        let mut s = String::new();
        for (bit, c) in [(Self::READ, 'r'), (Self::WRITE, 'w'), (Self::MKNOD, 'm')] {
            if self.0 & bit.0 != 0 {
                s.push(c);
            }
        }
        s
    }
}

/// One allowed set of devices: `None` for a number means any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceRule {
    pub kind: DeviceKind,
    pub major: Option<u32>,
    pub minor: Option<u32>,
    pub access: Access,
}

impl DeviceRule {
    /// The rule in the v1 controller's syntax, e.g. `c 1:3 rwm`.
    fn v1_text(&self) -> String {
        let num = |n: Option<u32>| n.map_or("*".to_string(), |n| n.to_string());
        format!(
            "{} {}:{} {}",
            match self.kind {
                DeviceKind::Char => 'c',
                DeviceKind::Block => 'b',
            },
            num(self.major),
            num(self.minor),
            self.access.letters()
        )
    }
}

impl Cgroup {
    /// Lets the group's processes use only the devices `allowed` lists.
    /// Call it on a new group, before any process is in it.
    pub fn limit_devices(&self, allowed: &[DeviceRule]) -> Result<()> {
        match self.version {
            Version::V1 => {
                // A v1 layout without the devices controller mounted
                // cannot limit devices: say so rather than run unlimited.
                let dir = self
                    .dirs
                    .iter()
                    .find(|d| d.join("devices.deny").exists())
                    .ok_or(Error::NoDevicesController)?;
                write_file(&dir.join("devices.deny"), "a")?;
                for rule in allowed {
                    write_file(&dir.join("devices.allow"), &rule.v1_text())?;
                }
                Ok(())
            }
            Version::V2 => attach_program(self.main_dir(), &program(allowed)),
        }
    }
}

// The BPF instruction set, as far as the program needs it
// (`linux/bpf_common.h`, `linux/bpf.h`).
const BPF_LDX_MEM_W: u8 = 0x61;
const BPF_ALU64_AND_K: u8 = 0x57;
const BPF_ALU64_RSH_K: u8 = 0x77;
const BPF_ALU64_MOV_K: u8 = 0xb7;
const BPF_ALU64_MOV_X: u8 = 0xbf;
const BPF_JMP_JNE_K: u8 = 0x55;
const BPF_EXIT: u8 = 0x95;
/// `bpf_cgroup_dev_ctx.access_type`'s low half.
const BPF_DEVCG_DEV_BLOCK: i32 = 1;
const BPF_DEVCG_DEV_CHAR: i32 = 2;

/// `struct bpf_insn`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Insn {
    code: u8,
    /// dst in the low four bits, src in the high four.
    regs: u8,
    off: i16,
    imm: i32,
}

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | dst,
        off,
        imm,
    }
}

/// The program: the context (`struct bpf_cgroup_dev_ctx`: access_type,
/// major, minor) is read into r2 (kind), r3 (access), r4 (major), r5
/// (minor); each rule is a block that jumps to the next one on the first
/// field that does not match, and returns 1 (allowed) at its end; after
/// the last one, 0.
fn program(allowed: &[DeviceRule]) -> Vec<Insn> {
    let mut p = vec![
        insn(BPF_LDX_MEM_W, 2, 1, 0, 0),
        insn(BPF_ALU64_MOV_X, 3, 2, 0, 0),
        insn(BPF_ALU64_AND_K, 2, 0, 0, 0xffff),
        insn(BPF_ALU64_RSH_K, 3, 0, 0, 16),
        insn(BPF_LDX_MEM_W, 4, 1, 4, 0),
        insn(BPF_LDX_MEM_W, 5, 1, 8, 0),
    ];
    for rule in allowed {
        // The tests, each a jump past the rest of the block; the offset
        // is filled once the block's length is known.
        let mut block = vec![insn(
            BPF_JMP_JNE_K,
            2,
            0,
            0,
            match rule.kind {
                DeviceKind::Char => BPF_DEVCG_DEV_CHAR,
                DeviceKind::Block => BPF_DEVCG_DEV_BLOCK,
            },
        )];
        if let Some(major) = rule.major {
            block.push(insn(BPF_JMP_JNE_K, 4, 0, 0, major as i32));
        }
        if let Some(minor) = rule.minor {
            block.push(insn(BPF_JMP_JNE_K, 5, 0, 0, minor as i32));
        }
        // Access asked for beyond the rule's: r6 = r3 & !access.
        block.push(insn(BPF_ALU64_MOV_X, 6, 3, 0, 0));
        block.push(insn(
            BPF_ALU64_AND_K,
            6,
            0,
            0,
            !i32::from(rule.access.0) & 7,
        ));
        block.push(insn(BPF_JMP_JNE_K, 6, 0, 0, 0));
        block.push(insn(BPF_ALU64_MOV_K, 0, 0, 0, 1));
        block.push(insn(BPF_EXIT, 0, 0, 0, 0));
        let len = block.len();
        for (i, ins) in block.iter_mut().enumerate() {
            if ins.code == BPF_JMP_JNE_K {
                // To the first instruction after the block.
                ins.off = (len - i - 1) as i16;
            }
        }
        p.extend(block);
    }
    p.push(insn(BPF_ALU64_MOV_K, 0, 0, 0, 0));
    p.push(insn(BPF_EXIT, 0, 0, 0, 0));
    p
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;
/// Several programs on one group and its ancestors, all of which must
/// allow an access (so a container inside a lab host stays within the
/// host's limits).
const BPF_F_ALLOW_MULTI: u32 = 2;

/// `union bpf_attr` for `BPF_PROG_LOAD`, up to the fields used.
#[repr(C)]
#[derive(Default)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
}

/// `union bpf_attr` for `BPF_PROG_ATTACH`.
#[repr(C)]
#[derive(Default)]
struct ProgAttach {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
}

fn attach_program(dir: &Path, prog: &[Insn]) -> Result<()> {
    let bpf_error = |what: &str, source: std::io::Error| Error::Write {
        path: dir.join(format!("({what})")),
        source,
    };
    let license = c"GPL";
    let mut log = vec![0u8; 4096];
    let load = ProgLoad {
        prog_type: BPF_PROG_TYPE_CGROUP_DEVICE,
        insn_cnt: prog.len() as u32,
        insns: prog.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        ..Default::default()
    };
    // SAFETY: `load` is a valid bpf_attr prefix of the size passed; the
    // pointers in it (instructions, license, log) outlive the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &load as *const ProgLoad,
            std::mem::size_of::<ProgLoad>(),
        )
    };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        let verifier =
            String::from_utf8_lossy(&log[..log.iter().position(|&b| b == 0).unwrap_or(0)])
                .trim()
                .to_string();
        tracing::error!(%verifier, "the device program was refused");
        return Err(bpf_error("loading the device program", e));
    }
    // SAFETY: a new descriptor the kernel just returned, owned by nobody.
    let prog_fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let group = fs::File::open(dir).map_err(|source| Error::Read {
        path: dir.into(),
        source,
    })?;
    let attach = ProgAttach {
        target_fd: group.as_raw_fd() as u32,
        attach_bpf_fd: prog_fd.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_DEVICE,
        attach_flags: BPF_F_ALLOW_MULTI,
    };
    // SAFETY: `attach` is a valid bpf_attr prefix of the size passed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_ATTACH,
            &attach as *const ProgAttach,
            std::mem::size_of::<ProgAttach>(),
        )
    };
    if r < 0 {
        return Err(bpf_error(
            "attaching the device program",
            std::io::Error::last_os_error(),
        ));
    }
    // The group holds the program from now on; our descriptor may go.
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_read_as_the_v1_controller_writes_them() {
        let r = DeviceRule {
            kind: DeviceKind::Char,
            major: Some(136),
            minor: None,
            access: Access::ALL,
        };
        assert_eq!(r.v1_text(), "c 136:* rwm");
        let m = DeviceRule {
            kind: DeviceKind::Block,
            major: None,
            minor: None,
            access: Access::MKNOD,
        };
        assert_eq!(m.v1_text(), "b *:* m");
    }

    #[test]
    fn every_jump_of_the_program_lands_on_the_next_block_or_the_refusal() {
        let rules = [
            DeviceRule {
                kind: DeviceKind::Char,
                major: Some(1),
                minor: Some(3),
                access: Access::ALL,
            },
            DeviceRule {
                kind: DeviceKind::Block,
                major: None,
                minor: None,
                access: Access::MKNOD,
            },
        ];
        let p = program(&rules);
        let exits: Vec<usize> = (0..p.len()).filter(|&i| p[i].code == BPF_EXIT).collect();
        assert_eq!(exits.len(), 3, "one per rule and the refusal");
        for (i, ins) in p.iter().enumerate() {
            if ins.code == BPF_JMP_JNE_K {
                let to = i + 1 + ins.off as usize;
                // A jump lands right after an exit: the next block's start
                // or the final refusal.
                assert!(exits.contains(&(to - 1)), "jump at {i} lands at {to}");
            }
        }
        // The refusal returns 0.
        assert_eq!(p[p.len() - 2], insn(BPF_ALU64_MOV_K, 0, 0, 0, 0));
    }
}
