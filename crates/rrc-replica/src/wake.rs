//! Waking the container's supervisor from another thread: a socket pair
//! whose read end the supervisor polls (a companion's wake descriptor) and
//! whose write end any thread may poke.

use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

/// The end that pokes. Cheap to clone; never blocks.
#[derive(Clone)]
pub struct Waker(Arc<UnixStream>);

/// The end the supervisor polls.
pub struct WakeFd(UnixStream);

/// A new pair.
pub fn pair() -> std::io::Result<(Waker, WakeFd)> {
    let (tx, rx) = UnixStream::pair()?;
    tx.set_nonblocking(true)?;
    rx.set_nonblocking(true)?;
    Ok((Waker(Arc::new(tx)), WakeFd(rx)))
}

impl Waker {
    /// Makes the read end readable. A full socket already is: the byte
    /// is not needed then.
    pub fn wake(&self) {
        let _ = (&*self.0).write(&[1]);
    }
}

impl WakeFd {
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }

    /// Empties it, so that the next poll sleeps until the next poke.
    pub fn clear(&self) {
        let mut buf = [0u8; 64];
        while matches!((&self.0).read(&mut buf), Ok(n) if n > 0) {}
    }
}
