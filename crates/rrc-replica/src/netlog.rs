//! The net log on disk: the inbound frames a replicated container was given
//! since a checkpoint, each with its number, in the order they were
//! delivered. It sits beside the event log of the same stretch
//! (`net.log` in the log directory), and is what a takeover rebuilds the
//! connections' receive side from.
//!
//! Layout: the 8 bytes `RRCNET1\n`, then one entry per frame: number (u64
//! LE), length (u32 LE), the frame as it crossed the gate (offload header
//! included). Numbers strictly increase. A reader refuses a bad magic, a
//! length over [`MAX_FRAME`], numbers that do not increase and a torn
//! entry, saying where.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// File name of the net log in a log directory.
pub const FILE: &str = "net.log";
const MAGIC: &[u8; 8] = b"RRCNET1\n";
/// Longest frame an entry may hold: the longest the link carries (a 64
/// KiB offloaded segment and its headers).
pub const MAX_FRAME: usize = rrc_wire::message::MAX_NET_FRAME_LEN;

#[derive(Debug, thiserror::Error)]
pub enum NetLogError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{}: {what} at byte {offset}", path.display())]
    Corrupt {
        path: PathBuf,
        offset: usize,
        what: &'static str,
    },
}

/// Writes the frames `(number, bytes)`, in order, to `dir/net.log`.
pub fn write<'a>(
    dir: &Path,
    frames: impl IntoIterator<Item = (u64, &'a [u8])>,
) -> Result<(), NetLogError> {
    let path = dir.join(FILE);
    let io = |source| NetLogError::Io {
        path: path.clone(),
        source,
    };
    let mut out = io::BufWriter::new(std::fs::File::create(&path).map_err(io)?);
    out.write_all(MAGIC).map_err(io)?;
    for (n, f) in frames {
        out.write_all(&n.to_le_bytes()).map_err(io)?;
        out.write_all(&(f.len() as u32).to_le_bytes()).map_err(io)?;
        out.write_all(f).map_err(io)?;
    }
    out.into_inner()
        .map_err(|e| io(e.into_error()))?
        .sync_all()
        .map_err(io)
}

/// Frames with their numbers.
pub type Frames = Vec<(u64, Vec<u8>)>;

/// Reads `dir/net.log`: its frames with their numbers.
pub fn read(dir: &Path) -> Result<Frames, NetLogError> {
    let path = dir.join(FILE);
    let bytes = std::fs::read(&path).map_err(|source| NetLogError::Io {
        path: path.clone(),
        source,
    })?;
    parse(&bytes).map_err(|(offset, what)| NetLogError::Corrupt { path, offset, what })
}

fn parse(bytes: &[u8]) -> Result<Frames, (usize, &'static str)> {
    if bytes.get(..8) != Some(MAGIC) {
        return Err((0, "not a net log"));
    }
    let mut out = Vec::new();
    let mut at = 8;
    let mut last = None;
    while at < bytes.len() {
        let head = bytes.get(at..at + 12).ok_or((at, "torn entry"))?;
        let n = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
        let len = u32::from_le_bytes(head[8..].try_into().expect("4 bytes")) as usize;
        if len > MAX_FRAME {
            return Err((at, "frame longer than any frame can be"));
        }
        if last.is_some_and(|l| n <= l) {
            return Err((at, "frame numbers do not increase"));
        }
        let frame = bytes
            .get(at + 12..at + 12 + len)
            .ok_or((at, "torn entry"))?;
        out.push((n, frame.to_vec()));
        last = Some(n);
        at += 12 + len;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let dir = std::env::temp_dir().join(format!("rrc-netlog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let frames = [(3u64, vec![1u8, 2, 3]), (4, vec![]), (9, vec![7; 100])];
        write(&dir, frames.iter().map(|(n, f)| (*n, f.as_slice()))).unwrap();
        assert_eq!(read(&dir).unwrap(), frames.to_vec());
        let bytes = std::fs::read(dir.join(FILE)).unwrap();
        for cut in 0..bytes.len() {
            let r = parse(&bytes[..cut]);
            // Only a cut between entries reads back (as fewer frames).
            if let Ok(f) = r {
                assert!(f.len() < 3 && cut >= 8);
            }
        }
        let mut swapped = bytes.clone();
        swapped[8] = 5;
        swapped[8 + 12 + 3] = 4;
        assert!(parse(&swapped).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
