//! The CLI's one piece of process plumbing that needs `unsafe`.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

/// Makes `cmd`'s child start `program` with exactly `argv` and `envp` (in
/// their order, which `Command` would not keep) and with `src` at
/// descriptor `fd`. `src` must stay open until the child has started.
pub fn exec_exactly(
    cmd: &mut Command,
    program: std::ffi::CString,
    argv: Vec<std::ffi::CString>,
    envp: Vec<std::ffi::CString>,
    src: &OwnedFd,
    fd: i32,
) {
    let src = src.as_raw_fd();
    let mut argv_p: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_p.push(std::ptr::null());
    let mut envp_p: Vec<*const libc::c_char> = envp.iter().map(|e| e.as_ptr()).collect();
    envp_p.push(std::ptr::null());
    // The strings the pointers point into live in the closure with them.
    let keep = (program, argv, envp);
    struct Ptrs(Vec<*const libc::c_char>, Vec<*const libc::c_char>);
    // SAFETY: the pointers refer into `keep`, moved into the same closure,
    // and are only read in the forked child.
    unsafe impl Send for Ptrs {}
    // SAFETY: as above.
    unsafe impl Sync for Ptrs {}
    let ptrs = Ptrs(argv_p, envp_p);
    // SAFETY: the closure runs in the forked child before exec and calls
    // only dup2 and execve, both async-signal-safe, on memory prepared
    // before the fork.
    unsafe {
        cmd.pre_exec(move || {
            // The whole values, not only the fields used, are what the
            // closure must hold: the pointers point into all of `keep`.
            let p = &ptrs;
            let k = &keep;
            if libc::dup2(src, fd) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::execve(k.0.as_ptr(), p.0.as_ptr(), p.1.as_ptr());
            Err(std::io::Error::last_os_error())
        });
    }
}
