//! Replication's side of the arbiter ([`rrc_arbiter`]): the service, this
//! host's name, and the term it serves or watches under.
//!
//! The rule both sides follow: a side that lost the other (the backup
//! hearing nothing from its primary, the primary hearing nothing from its
//! backup) acts only after it wins the term after the one the two shared.
//! The backup wins before it takes over; the primary wins before it
//! releases anything its backup did not acknowledge, and a primary that
//! loses kills its container without releasing another frame. A side
//! that cannot reach the arbiter does neither: the service holds, and
//! says why, until the arbiter answers.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rrc_arbiter::{Arbiter, ArbiterError, Claim, Term};

/// How soon a claim the arbiter did not answer is tried again.
pub const CLAIM_RETRY: Duration = Duration::from_millis(250);

/// What a claim decided, and how long asking took.
#[derive(Debug)]
pub struct Decision {
    pub claim: Result<Claim, ArbiterError>,
    pub took: Duration,
}

#[derive(Clone)]
pub struct Arbitration {
    arbiter: Arc<dyn Arbiter>,
    service: String,
    node: String,
    /// The term this host serves under (a primary) or the one its primary
    /// announced (a backup).
    term: Term,
    /// The term's number, for the link's hello (read from its thread).
    announced: Arc<AtomicU64>,
}

impl Arbitration {
    /// A starting primary: it takes the service at the next term.
    pub fn take(
        arbiter: Arc<dyn Arbiter>,
        service: &str,
        node: &str,
    ) -> Result<(Arbitration, Option<Term>), ArbiterError> {
        let (term, before) = rrc_arbiter::take(arbiter.as_ref(), service, node)?;
        let a = Arbitration {
            announced: Arc::new(AtomicU64::new(term.number)),
            arbiter,
            service: service.into(),
            node: node.into(),
            term,
        };
        Ok((a, before))
    }

    /// A host that holds `term` already (won by a takeover, and handed to
    /// the process that protects the service again).
    pub fn holding(arbiter: Arc<dyn Arbiter>, service: &str, term: Term) -> Arbitration {
        Arbitration {
            announced: Arc::new(AtomicU64::new(term.number)),
            arbiter,
            service: service.into(),
            node: term.holder.clone(),
            term,
        }
    }

    /// A backup watching a primary that announced `term` as `primary`.
    pub fn watch(
        arbiter: Arc<dyn Arbiter>,
        service: &str,
        node: &str,
        primary: &str,
        term: u64,
    ) -> Arbitration {
        Arbitration {
            announced: Arc::new(AtomicU64::new(term)),
            arbiter,
            service: service.into(),
            node: node.into(),
            term: Term {
                number: term,
                holder: primary.into(),
            },
        }
    }

    pub fn service(&self) -> &str {
        &self.service
    }

    pub fn term(&self) -> &Term {
        &self.term
    }

    pub fn describe(&self) -> String {
        self.arbiter.describe()
    }

    /// The term's number as the link announces it: it follows the claims
    /// this side wins.
    pub fn announced(&self) -> Arc<AtomicU64> {
        self.announced.clone()
    }

    /// Claims the term after the current one; on a win this side serves
    /// under it from now on.
    pub fn claim(&mut self) -> Decision {
        let t0 = Instant::now();
        let claim =
            rrc_arbiter::succeed(self.arbiter.as_ref(), &self.service, &self.term, &self.node);
        if let Ok(Claim::Won(t)) = &claim {
            self.term = t.clone();
            self.announced.store(t.number, Ordering::Release);
        }
        Decision {
            claim,
            took: t0.elapsed(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rrc_arbiter::Memory;

    #[test]
    fn the_backup_claims_from_the_term_its_primary_announced() {
        let m: Arc<dyn Arbiter> = Arc::new(Memory::default());
        let (mut p, before) = Arbitration::take(m.clone(), "svc", "hp").unwrap();
        assert!(before.is_none());
        let mut b = Arbitration::watch(m.clone(), "svc", "hb", "hp", p.term().number);
        assert!(matches!(b.claim().claim, Ok(Claim::Won(_))));
        assert_eq!(b.term().number, 2);
        // The primary lost: its term stays, and so does what it announces.
        assert!(matches!(p.claim().claim, Ok(Claim::Lost(Some(_)))));
        assert_eq!(p.announced().load(Ordering::Acquire), 1);
    }
}
