//! The arbiter: which host serves a replicated service.
//!
//! A primary and its backup cannot tell a dead peer from a broken link
//! between them. Both hosts may still reach the clients, so whichever side
//! acts on its own (the backup taking over, the primary releasing replies
//! its backup never acknowledged) risks two copies of the service
//! answering for one address. The arbiter settles it: each service has a
//! record, its *term* (a number that only grows) and the host that serves
//! under it. A side that lost the other must win a compare-and-swap of
//! that record from the term it knows to the next one before it acts; at
//! most one side can, and the other stops.
//!
//! This crate holds the record's format ([`Term`]), the one capability an
//! arbiter needs ([`Arbiter`]: read, and swap if unchanged), its etcd
//! implementation ([`etcd::Etcd`]), and the two claims built on them
//! ([`take`] for a starting primary, [`succeed`] for a side that lost the
//! other). No lease or timeout of the arbiter's stands in a takeover's
//! path: a swap is one round trip.

pub mod etcd;
mod memory;

pub use memory::Memory;

use serde::{Deserialize, Serialize};

/// Where the records live: one key per service under this prefix.
pub const KEY_PREFIX: &str = "/rrc/services/";

/// A service's record: its term, and the host serving under it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Term {
    pub number: u64,
    pub holder: String,
}

impl Term {
    /// The record as stored: the swap compares these bytes, so the
    /// encoding is fixed (fields in this order, no spaces).
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a term serializes")
    }

    pub fn decode(service: &str, bytes: &[u8]) -> Result<Term, ArbiterError> {
        serde_json::from_slice(bytes).map_err(|e| ArbiterError::Corrupt {
            service: service.into(),
            why: e.to_string(),
        })
    }

    fn next(&self, holder: &str) -> Result<Term, ArbiterError> {
        Ok(Term {
            number: self.number.checked_add(1).ok_or(ArbiterError::Exhausted)?,
            holder: holder.into(),
        })
    }
}

impl std::fmt::Display for Term {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "term {} ({})", self.number, self.holder)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ArbiterError {
    #[error("the arbiter cannot be reached: {0}")]
    Unreachable(String),
    #[error("the arbiter's record of service {service:?} is not rrc's: {why}")]
    Corrupt { service: String, why: String },
    #[error("service name {0:?}: use letters, digits, '-', '_' and '.'")]
    BadName(String),
    #[error("the service's term cannot grow any more")]
    Exhausted,
    #[error("the arbiter's record changed under every try: another host keeps claiming it")]
    Contended,
    #[error("invalid arbiter endpoint {0:?}: use HOST:PORT or http://HOST:PORT")]
    BadEndpoint(String),
}

impl ArbiterError {
    /// Whether asking again later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, ArbiterError::Unreachable(_) | ArbiterError::Contended)
    }
}

/// What a swap found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Swapped {
    /// The record now holds the new term.
    Done,
    /// The record was not what the swap expected; it stands as this (`None`:
    /// there is none).
    Stood(Option<Term>),
}

/// A store that can settle who serves: linearizable reads and a
/// compare-and-swap of one record per service.
pub trait Arbiter: Send + Sync {
    /// Where it is, for messages.
    fn describe(&self) -> String;
    /// The service's record now, if it has one.
    fn read(&self, service: &str) -> Result<Option<Term>, ArbiterError>;
    /// Replaces the record with `to` if it is exactly `from` (`None`: if
    /// there is none).
    fn swap(&self, service: &str, from: Option<&Term>, to: &Term) -> Result<Swapped, ArbiterError>;
}

/// The outcome of a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The claimant serves from now on, under this term.
    Won(Term),
    /// Someone else moved the record first: it stands as this, and the
    /// claimant must stop.
    Lost(Option<Term>),
}

/// The key of a service's record.
pub fn key(service: &str) -> Result<String, ArbiterError> {
    let ok = !service.is_empty()
        && service.len() <= 128
        && service
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if !ok {
        return Err(ArbiterError::BadName(service.into()));
    }
    Ok(format!("{KEY_PREFIX}{service}"))
}

/// How many times a starting primary re-reads a record that changed
/// between its read and its swap.
const TAKE_TRIES: usize = 3;

/// A starting primary takes the service: the term after whatever the
/// record holds (the first if none), as `me`. Returns the new term and
/// the one it replaced.
pub fn take(
    arb: &dyn Arbiter,
    service: &str,
    me: &str,
) -> Result<(Term, Option<Term>), ArbiterError> {
    for _ in 0..TAKE_TRIES {
        let now = arb.read(service)?;
        let to = match &now {
            Some(t) => t.next(me)?,
            None => Term {
                number: 1,
                holder: me.into(),
            },
        };
        if arb.swap(service, now.as_ref(), &to)? == Swapped::Done {
            return Ok((to, now));
        }
    }
    Err(ArbiterError::Contended)
}

/// A side that lost the other claims the service for itself (`me`): the
/// term after `known`, the one both sides served under, if nobody moved
/// the record since.
pub fn succeed(
    arb: &dyn Arbiter,
    service: &str,
    known: &Term,
    me: &str,
) -> Result<Claim, ArbiterError> {
    let to = known.next(me)?;
    Ok(match arb.swap(service, Some(known), &to)? {
        Swapped::Done => Claim::Won(to),
        Swapped::Stood(now) => Claim::Lost(now),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_encoding_is_fixed() {
        let t = Term {
            number: 7,
            holder: "b".into(),
        };
        assert_eq!(t.encode(), br#"{"number":7,"holder":"b"}"#);
        assert_eq!(Term::decode("s", &t.encode()).unwrap(), t);
        assert!(matches!(
            Term::decode("s", b"{}"),
            Err(ArbiterError::Corrupt { .. })
        ));
    }

    #[test]
    fn only_one_side_succeeds_a_term() {
        let m = Memory::default();
        let (t1, before) = take(&m, "svc", "p").unwrap();
        assert_eq!((t1.number, before), (1, None));
        // Both sides lost each other; the backup asks first.
        let b = succeed(&m, "svc", &t1, "b").unwrap();
        assert_eq!(
            b,
            Claim::Won(Term {
                number: 2,
                holder: "b".into()
            })
        );
        let p = succeed(&m, "svc", &t1, "p").unwrap();
        assert_eq!(
            p,
            Claim::Lost(Some(Term {
                number: 2,
                holder: "b".into()
            }))
        );
        // A primary started later takes the term after.
        let (t3, before) = take(&m, "svc", "p").unwrap();
        assert_eq!(t3.number, 3);
        assert_eq!(before.unwrap().holder, "b");
    }

    #[test]
    fn names_become_keys_only_when_plain() {
        assert_eq!(key("redis-1").unwrap(), "/rrc/services/redis-1");
        for bad in ["", "a/b", "a b", "../x"] {
            assert!(key(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_term_at_its_limit_is_an_error_not_a_wrap() {
        let m = Memory::default();
        let top = Term {
            number: u64::MAX,
            holder: "p".into(),
        };
        m.swap("s", None, &top).unwrap();
        assert!(matches!(
            succeed(&m, "s", &top, "b"),
            Err(ArbiterError::Exhausted)
        ));
    }
}
