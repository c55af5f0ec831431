//! Positions in the replication log, and how far a contiguous run of it
//! reaches.
//!
//! The log has two numbered streams: the program's event records (numbered
//! by one counter shared by every thread of the recorded program, so
//! records arrive out of order across threads) and the inbound frames of
//! the net log (numbered in the order they were delivered). A position is a
//! number in each. A checkpoint stands at a position (everything up to it
//! happened before the checkpoint); an outbound frame is tagged with one
//! (everything up to it may have produced the frame); the backup
//! acknowledges one (it holds everything up to it).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A place in both streams of the log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogPosition {
    /// Every event record numbered up to this one.
    pub records: u64,
    /// Every inbound frame numbered up to this one.
    pub net: u64,
}

impl LogPosition {
    /// Whether everything up to `other` is within this position.
    pub fn covers(&self, other: &LogPosition) -> bool {
        self.records >= other.records && self.net >= other.net
    }

    /// The later of two positions, stream by stream.
    pub fn max(self, other: LogPosition) -> LogPosition {
        LogPosition {
            records: self.records.max(other.records),
            net: self.net.max(other.net),
        }
    }
}

/// The annotation key under which a checkpoint of a replicated container
/// records the log position it stands at.
pub const POSITION_ANNOTATION: &str = "log_position";

/// Numbers seen so far, and how far they run without a gap from a base.
#[derive(Debug, Clone, Default)]
pub struct Contiguous {
    /// Every number up to this one has been seen (or lies below the base).
    prefix: u64,
    /// Runs seen above `prefix + 1`: start -> end, inclusive, disjoint and
    /// not adjacent to each other.
    above: BTreeMap<u64, u64>,
}

impl Contiguous {
    /// Nothing seen above `base`.
    pub fn from_base(base: u64) -> Contiguous {
        Contiguous {
            prefix: base,
            above: BTreeMap::new(),
        }
    }

    /// The highest number up to which nothing is missing.
    pub fn prefix(&self) -> u64 {
        self.prefix
    }

    /// The highest number seen at all.
    pub fn highest(&self) -> u64 {
        self.above
            .last_key_value()
            .map_or(self.prefix, |(_, e)| *e.max(&self.prefix))
    }

    /// Whether numbers above the prefix are waiting for a gap to fill.
    pub fn has_gap(&self) -> bool {
        !self.above.is_empty()
    }

    /// Records `n` as seen. Numbers at or below the prefix change nothing.
    pub fn insert(&mut self, n: u64) {
        if n <= self.prefix {
            return;
        }
        if n == self.prefix + 1 {
            self.prefix = n;
            // The common case: in order, nothing above.
            while let Some(entry) = self.above.first_entry() {
                if *entry.key() > self.prefix + 1 {
                    break;
                }
                let end = entry.remove();
                self.prefix = self.prefix.max(end);
            }
            return;
        }
        // Inside or next to a run already seen?
        if let Some((&s, e)) = self.above.range_mut(..=n).next_back()
            && n <= *e + 1
        {
            if n == *e + 1 {
                *e = n;
                // Joined to the next run?
                if let Some(next_end) = self.above.remove(&(n + 1)) {
                    *self.above.get_mut(&s).expect("present") = next_end;
                }
            }
            return;
        }
        let end = self.above.remove(&(n + 1)).unwrap_or(n);
        self.above.insert(n, end);
    }

    /// Everything up to `base` counts as seen (a checkpoint covers it).
    pub fn advance_to(&mut self, base: u64) {
        if base <= self.prefix {
            return;
        }
        self.prefix = base;
        let rest = self.above.split_off(&(base + 1));
        let overlapping = self.above.last_key_value().map(|(_, e)| *e);
        self.above = rest;
        if let Some(e) = overlapping {
            self.prefix = self.prefix.max(e);
        }
        // Runs now adjacent to the prefix join it.
        while let Some(entry) = self.above.first_entry() {
            if *entry.key() > self.prefix + 1 {
                break;
            }
            let end = entry.remove();
            self.prefix = self.prefix.max(end);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn in_order_and_out_of_order() {
        let mut c = Contiguous::from_base(10);
        c.insert(11);
        c.insert(13);
        c.insert(14);
        assert_eq!(c.prefix(), 11);
        assert!(c.has_gap());
        assert_eq!(c.highest(), 14);
        c.insert(12);
        assert_eq!(c.prefix(), 14);
        assert!(!c.has_gap());
        c.insert(3);
        assert_eq!(c.prefix(), 14);
        c.insert(20);
        c.advance_to(17);
        assert_eq!(c.prefix(), 17);
        c.insert(18);
        c.insert(19);
        assert_eq!(c.prefix(), 20);
    }

    proptest! {
        /// The prefix is what a plain set of the numbers says it is, for
        /// any order of insertion and any advance.
        #[test]
        fn matches_a_set(nums in prop::collection::vec(1u64..60, 0..80), base in 0u64..20, adv in 0u64..70) {
            let mut c = Contiguous::from_base(base);
            let mut set = std::collections::BTreeSet::new();
            for (i, n) in nums.iter().enumerate() {
                c.insert(*n);
                set.insert(*n);
                if i == nums.len() / 2 {
                    c.advance_to(adv);
                }
            }
            let floor = if nums.is_empty() { base } else { base.max(adv) };
            let mut expect = floor;
            while set.contains(&(expect + 1)) {
                expect += 1;
            }
            prop_assert_eq!(c.prefix(), expect);
        }
    }
}
