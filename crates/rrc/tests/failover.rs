//! Replication end to end: a primary and a backup in the lab, verifying
//! clients through the service address, the primary host killed at random
//! moments under load. The backup must take over with every client
//! connection intact, no acknowledged write lost or applied twice, and the
//! service answering again within a second.

mod common;

use std::time::Duration;

use common::*;
use rrc_bench::failover::{App, Moments, Pair, PairOptions, trial};

/// `kills` primary failures of `app`, each at a random moment of the load.
fn kills(tag: &str, app: App, kills: usize) {
    let lab = lab_session(tag);
    let mut pair = Pair::new(&lab, app, PairOptions::default()).unwrap();
    let seed = Moments::seed_from_clock();
    eprintln!("{app:?}: kill moments from seed {seed}");
    let mut moments = Moments::new(seed);
    let mut failures = Vec::new();
    for i in 0..kills {
        pair.start_backup().unwrap();
        pair.start_primary().unwrap();
        let at = moments.between(Duration::from_millis(200), Duration::from_millis(2000));
        let t = trial(&mut pair, 6, at, Duration::from_millis(1500)).unwrap();
        eprintln!(
            "{app:?} kill {i}: after {:.0} ms of load, {} requests, first answer {:?} ms, all connections answered {:?} ms, takeover {:?}, errors {:?}",
            t.kill_after_ms, t.requests, t.first_answer_ms, t.all_answered_ms, t.takeover, t.errors
        );
        let answered_in_time = t.all_answered_ms.is_some_and(|ms| ms < 1000.0);
        if !t.ok() || !answered_in_time {
            failures.push((i, t, pair.backup_output()));
        }
        pair.reset().unwrap();
    }
    assert!(failures.is_empty(), "failed kills: {failures:#?}");
}

#[test]
fn redis_survives_primary_kills_at_random_moments() {
    kills("fored", App::Redis, 10);
}

#[test]
fn memcached_survives_primary_kills_at_random_moments() {
    kills("fomem", App::Memcached, 10);
}

#[test]
fn a_new_backup_reprotects_the_service_after_the_backup_fails() {
    let lab = lab_session("fobak");
    let mut pair = Pair::new(&lab, App::Redis, PairOptions::default()).unwrap();
    pair.start_backup().unwrap();
    pair.start_primary().unwrap();
    let first = pair.backup_output();
    // The backup host dies: the service goes on, unprotected.
    pair.kill_backup().unwrap();
    let target = pair.target();
    let r = lab
        .in_host(rrc_lab::Host::Client, || {
            rrc_bench::verify::run(
                rrc_bench::verify::Service::Redis,
                target,
                4,
                || {},
                Duration::from_secs(2),
            )
        })
        .unwrap();
    assert!(r.errors.is_empty(), "{r:#?}");
    assert!(r.requests > 100, "{r:#?}");
    // A new backup gets a full checkpoint, and then protects the service.
    pair.start_backup().unwrap();
    pair.wait_protected(Duration::from_secs(30)).unwrap();
    let t = trial(
        &mut pair,
        4,
        Duration::from_millis(700),
        Duration::from_millis(1500),
    )
    .unwrap();
    assert!(
        t.ok() && t.all_answered_ms.is_some_and(|ms| ms < 1000.0),
        "{t:#?}\nfirst backup:\n{first}\nsecond backup:\n{}",
        pair.backup_output()
    );
}
