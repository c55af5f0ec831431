//! User namespaces of the tree's (defined here only): each one a child of
//! the checkpointing process's, with its id maps and whether `setgroups`
//! is allowed in it. Ids outside a namespace are those of the parent (the
//! host's, as `/proc/PID/status` shows them to it); a process's ids in its
//! image are always these.
//!
//! A restore makes each namespace before the tree, and each process in
//! one enters it before it takes its own credentials again, translated
//! through the maps.

use serde::{Deserialize, Serialize};

/// The most ranges a map may have (the kernel's `UID_GID_MAP_MAX_EXTENTS`).
pub const MAX_RANGES: usize = 340;

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct UserNs {
    /// The uid that made it, outside: a process with that effective uid
    /// there has every capability in it.
    pub owner: u32,
    pub uid_map: Vec<IdRange>,
    pub gid_map: Vec<IdRange>,
    /// `/proc/PID/setgroups` reads "allow" (false: "deny", as an
    /// unprivileged `unshare -r` leaves it).
    pub setgroups: bool,
}

/// `count` ids from `inside` in the namespace are `outside` onwards in its
/// parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdRange {
    pub inside: u32,
    pub outside: u32,
    pub count: u32,
}

/// Which of a namespace's maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdKind {
    Uid,
    Gid,
}

impl IdKind {
    /// Its file in `/proc/PID/`.
    pub fn file(self) -> &'static str {
        match self {
            IdKind::Uid => "uid_map",
            IdKind::Gid => "gid_map",
        }
    }
}

impl UserNs {
    pub fn map(&self, kind: IdKind) -> &[IdRange] {
        match kind {
            IdKind::Uid => &self.uid_map,
            IdKind::Gid => &self.gid_map,
        }
    }

    /// The id `outside` (a host id) is inside the namespace, if it is
    /// mapped there.
    pub fn inside(&self, kind: IdKind, outside: u32) -> Option<u32> {
        self.map(kind).iter().find_map(|r| {
            let off = outside.checked_sub(r.outside)?;
            (off < r.count).then(|| r.inside + off)
        })
    }

    /// Whether every uid and gid of `c` (not its groups: those are set
    /// outside, and shown as the overflow id when unmapped) is mapped in
    /// it.
    pub fn maps(&self, c: &super::Creds) -> bool {
        (c.uid.iter()).all(|id| self.inside(IdKind::Uid, *id).is_some())
            && (c.gid.iter()).all(|id| self.inside(IdKind::Gid, *id).is_some())
    }

    /// A map as its `/proc/PID/*_map` file is written: one range a line.
    pub fn map_text(&self, kind: IdKind) -> String {
        self.map(kind)
            .iter()
            .map(|r| format!("{} {} {}\n", r.inside, r.outside, r.count))
            .collect()
    }

    /// Parses a `/proc/PID/*_map` file as read from the parent namespace.
    pub fn parse_map(text: &str) -> Result<Vec<IdRange>, String> {
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let f: Vec<u32> = l
                    .split_whitespace()
                    .map(|v| v.parse().map_err(|_| format!("bad id map line {l:?}")))
                    .collect::<Result<_, _>>()?;
                match f[..] {
                    [inside, outside, count] => Ok(IdRange {
                        inside,
                        outside,
                        count,
                    }),
                    _ => Err(format!("bad id map line {l:?}")),
                }
            })
            .collect()
    }

    /// What the kernel would refuse to write, found at load: no ranges or
    /// too many, an empty one, one that wraps, or two that overlap inside
    /// or outside.
    pub fn check(&self) -> Result<(), String> {
        for kind in [IdKind::Uid, IdKind::Gid] {
            let map = self.map(kind);
            let name = kind.file();
            if map.is_empty() || map.len() > MAX_RANGES {
                return Err(format!("its {name} has {} ranges", map.len()));
            }
            let span = |start: u32, count: u32| {
                let end = start.checked_add(count.checked_sub(1)?)?;
                Some((start, end))
            };
            let mut inside = Vec::new();
            let mut outside = Vec::new();
            for r in map {
                match (span(r.inside, r.count), span(r.outside, r.count)) {
                    (Some(i), Some(o)) => {
                        inside.push(i);
                        outside.push(o);
                    }
                    _ => return Err(format!("its {name} has a range out of bounds")),
                }
            }
            for spans in [&mut inside, &mut outside] {
                spans.sort_unstable();
                if spans.windows(2).any(|w| w[1].0 <= w[0].1) {
                    return Err(format!("its {name} has overlapping ranges"));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(uid: &str, gid: &str) -> UserNs {
        UserNs {
            owner: 1000,
            uid_map: UserNs::parse_map(uid).unwrap(),
            gid_map: UserNs::parse_map(gid).unwrap(),
            setgroups: false,
        }
    }

    #[test]
    fn ids_translate_through_the_ranges() {
        let u = ns(
            "         0       1000          1\n         1     100000      65536\n",
            "0 1000 1\n",
        );
        assert_eq!(u.check(), Ok(()));
        assert_eq!(u.inside(IdKind::Uid, 1000), Some(0));
        assert_eq!(u.inside(IdKind::Uid, 100_000), Some(1));
        assert_eq!(u.inside(IdKind::Uid, 165_535), Some(65536));
        assert_eq!(u.inside(IdKind::Uid, 165_536), None);
        assert_eq!(u.inside(IdKind::Uid, 0), None);
        assert_eq!(u.inside(IdKind::Gid, 1000), Some(0));
        assert_eq!(u.map_text(IdKind::Gid), "0 1000 1\n");
    }

    #[test]
    fn maps_the_kernel_would_refuse_are_found() {
        assert!(ns("0 0 0\n", "0 0 1\n").check().is_err());
        assert!(ns("0 4294967295 2\n", "0 0 1\n").check().is_err());
        assert!(ns("0 0 10\n5 100 10\n", "0 0 1\n").check().is_err());
        assert!(ns("0 0 10\n20 5 10\n", "0 0 1\n").check().is_err());
        assert!(ns("0 0 1\n", "").check().is_err());
        assert!(UserNs::parse_map("0 0\n").is_err());
        assert!(UserNs::parse_map("a b c\n").is_err());
        assert_eq!(ns("0 0 4294967295\n", "0 0 1\n").check(), Ok(()));
    }
}
