//! User namespaces of the tree's (defined here only): each one a child of
//! the checkpointing process's or of another of the tree's, with its id
//! maps and whether `setgroups` is allowed in it. Ids outside a namespace
//! are the checkpointing process's (the host's, as `/proc/PID/status` and
//! the maps show them to it, whatever the namespaces between); a
//! process's ids in its image are always these.
//!
//! A restore makes each namespace before the tree, a parent before its
//! children, and each process in one enters it before it takes its own
//! credentials again, translated through the maps.

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
    /// The namespace of the tree's it is nested in (an index of
    /// `Manifest::user_namespaces`, an earlier one); none: a child of the
    /// checkpointing process's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<usize>,
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

    /// A map as its `/proc/PID/*_map` file is written by a process of the
    /// checkpointing process's namespace: one range a line.
    pub fn map_text(&self, kind: IdKind) -> String {
        self.map(kind)
            .iter()
            .map(|r| format!("{} {} {}\n", r.inside, r.outside, r.count))
            .collect()
    }

    /// The same written from `parent`, the namespace it is nested in
    /// (where the kernel wants its maps written from): each range's
    /// outside ids as the parent numbers them, which must all be mapped
    /// there, in one of its ranges.
    pub fn map_text_in(&self, kind: IdKind, parent: &UserNs) -> Option<String> {
        let mut text = String::new();
        for r in self.map(kind) {
            // The kernel wants each range within one of the parent's.
            let holder = parent.map(kind).iter().find(|p| {
                let off = r.outside.checked_sub(p.outside);
                off.is_some_and(|o| u64::from(o) + u64::from(r.count) <= u64::from(p.count))
            })?;
            let first = holder.inside + (r.outside - holder.outside);
            text += &format!("{} {} {}\n", r.inside, first, r.count);
        }
        Some(text)
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

    #[test]
    fn a_nested_namespaces_maps_are_written_as_its_parent_numbers_ids() {
        let range = |inside, outside, count| IdRange {
            inside,
            outside,
            count,
        };
        let parent = UserNs {
            uid_map: vec![range(0, 100_000, 65536)],
            gid_map: vec![range(0, 100_000, 10), range(10, 200_000, 10)],
            ..Default::default()
        };
        let child = UserNs {
            uid_map: vec![range(0, 101_000, 1000)],
            gid_map: vec![range(0, 200_005, 5)],
            parent: Some(0),
            ..Default::default()
        };
        assert_eq!(
            child.map_text_in(IdKind::Uid, &parent).unwrap(),
            "0 1000 1000\n"
        );
        assert_eq!(child.map_text_in(IdKind::Gid, &parent).unwrap(), "0 15 5\n");
        // Across two of the parent's ranges, or beyond them: not mapped.
        let across = UserNs {
            gid_map: vec![range(0, 100_005, 10)],
            ..child.clone()
        };
        assert_eq!(across.map_text_in(IdKind::Gid, &parent), None);
        let beyond = UserNs {
            uid_map: vec![range(0, 165_000, 1000)],
            ..child
        };
        assert_eq!(beyond.map_text_in(IdKind::Uid, &parent), None);
    }

    fn ns(uid: &str, gid: &str) -> UserNs {
        UserNs {
            owner: 1000,
            uid_map: UserNs::parse_map(uid).unwrap(),
            gid_map: UserNs::parse_map(gid).unwrap(),
            setgroups: false,
            parent: None,
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
