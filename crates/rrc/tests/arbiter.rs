//! The arbiter in the lab: a three-member etcd cluster on hosts of its
//! own decides which side serves when primary and backup lose each other
//! while both still reach the clients. Verifying Redis clients run
//! through every fault; whatever happens, exactly one side serves
//! afterwards and no client sees an error or a wrong value.

mod common;

use std::time::{Duration, Instant};

use common::*;
use rrc_bench::failover::{App, Mode, Moments, Pair, PairOptions, TakeoverLine, fault_trial};
use rrc_bench::session::LabSession;
use rrc_lab::Host;

/// A wide margin over the few hundred milliseconds a takeover takes.
const ANSWERED_WITHIN_MS: f64 = 5000.0;

fn arbiter_lab(tag: &str) -> LabSession {
    require_root();
    let name = format!("{tag}{}", std::process::id());
    LabSession::start_with_arbiter(std::path::Path::new(RRC), &name, None).expect("lab up")
}

fn responsive_with_arbiter(lab: &LabSession) -> PairOptions {
    PairOptions {
        mode: Mode::Responsive,
        arbiter: Some(lab.arbiter().expect("the lab runs an arbiter").to_string()),
        ..PairOptions::default()
    }
}

/// The backup took over, the old primary's container is gone (it said
/// why), and the backup host serves.
#[track_caller]
fn assert_backup_alone_serves(lab: &LabSession, pair: &Pair<'_>, takeover: &TakeoverLine) {
    pair.wait_primary_gone(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e:#}\nbackup:\n{}", pair.backup_output()));
    assert!(
        pair.primary_output().contains("STOPPING"),
        "{}",
        pair.primary_output()
    );
    let ps = lab
        .run_on(Host::Backup, &[RRC, "ps"])
        .expect("rrc ps on the backup host");
    assert!(ps.contains("redis"), "{ps}");
    assert!(takeover.arbiter_ms > 0.0, "{takeover:?}");
}

/// The replication link cut under load, and healed at a random moment:
/// the backup wins the next term and takes over, the primary loses its
/// claim and kills its container without releasing another reply; or, if
/// the link came back before the backup decided, nothing happens at all.
#[test]
fn a_cut_replication_link_leaves_exactly_one_side_serving() {
    let lab = arbiter_lab("cut");
    let mut pair = Pair::new(&lab, App::Redis, responsive_with_arbiter(&lab)).unwrap();
    let seed = Moments::seed_from_clock();
    eprintln!("heal moments from seed {seed}");
    let mut moments = Moments::new(seed);
    for round in 0..3 {
        pair.start_backup().unwrap();
        pair.start_primary().unwrap();
        let heal_after = moments.between(Duration::from_millis(50), Duration::from_millis(1500));
        let t = fault_trial(
            &mut pair,
            4,
            Duration::from_millis(700),
            Duration::from_millis(2500),
            |p| {
                let t = p.cut_link()?;
                std::thread::sleep(heal_after);
                p.lab().heal(Host::Primary, &[Host::Backup])?;
                Ok(t)
            },
            Duration::from_secs(10),
        )
        .unwrap();
        eprintln!(
            "round {round}: healed after {heal_after:?}; {} requests, errors {:?}, all answered {:?} ms, takeover {:?}",
            t.requests, t.errors, t.all_answered_ms, t.takeover
        );
        assert!(t.errors.is_empty(), "{t:#?}\n{}", pair.backup_output());
        match &t.takeover {
            Some(k) => {
                assert!(
                    t.all_answered_ms.is_some_and(|ms| ms < ANSWERED_WITHIN_MS),
                    "{t:#?}"
                );
                assert_backup_alone_serves(&lab, &pair, k);
            }
            None => {
                // Healed before the backup decided: the primary serves on.
                assert!(
                    pair.primary_serves().unwrap(),
                    "no takeover, and no primary:\n{}\n{}",
                    pair.primary_output(),
                    pair.backup_output()
                );
            }
        }
        pair.reset().unwrap();
    }
}

/// The value of metric `name` (a line `name value`) in a scrape.
#[track_caller]
fn metric(body: &str, name: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in:\n{body}"))
}

/// Cut from the arbiter alone, the primary goes on (nothing needs
/// deciding). Cut from the backup too, the backup takes over and the old
/// primary holds every reply, unable to ask; once it can, it learns it
/// lost and stops. `rrc status` and the metrics endpoints show each
/// transition.
#[test]
fn a_primary_cut_from_the_arbiter_goes_on_and_cut_from_both_sides_stops() {
    let lab = arbiter_lab("arbcut");
    let opts = PairOptions {
        metrics: true,
        ..responsive_with_arbiter(&lab)
    };
    let mut pair = Pair::new(&lab, App::Redis, opts).unwrap();
    pair.start_backup().unwrap();
    pair.start_primary().unwrap();
    let p = pair.scrape(Host::Primary).unwrap();
    assert_eq!(
        metric(&p, "rrc_role{service=\"redis\",role=\"primary\"}"),
        1.0
    );
    assert_eq!(metric(&p, "rrc_term{service=\"redis\"}"), 1.0);
    assert_eq!(metric(&p, "rrc_protected{service=\"redis\"}"), 1.0);
    assert!(
        metric(&p, "rrc_checkpoint_pause_seconds_count{service=\"redis\"}") > 0.0,
        "{p}"
    );
    assert!(
        metric(&p, "rrc_log_bytes_total{service=\"redis\"}") > 0.0,
        "{p}"
    );
    assert!(
        (0.0..10.0).contains(&metric(
            &p,
            "rrc_last_commit_age_seconds{service=\"redis\"}"
        )),
        "{p}"
    );
    let b = pair.scrape(Host::Backup).unwrap();
    assert_eq!(
        metric(&b, "rrc_role{service=\"redis\",role=\"backup\"}"),
        1.0
    );
    assert_eq!(metric(&b, "rrc_term{service=\"redis\"}"), 1.0);
    assert_eq!(metric(&b, "rrc_protected{service=\"redis\"}"), 1.0);
    assert!(
        metric(&b, "rrc_checkpoints_committed_total{service=\"redis\"}") > 0.0,
        "{b}"
    );
    assert_eq!(metric(&b, "rrc_takeovers_total{service=\"redis\"}"), 0.0);
    // Heartbeats at least: the primary was silent for some time, and it
    // was heard again well before anything like a takeover.
    let silence = metric(&b, "rrc_primary_longest_silence_seconds{service=\"redis\"}");
    assert!(silence > 0.0 && silence < 10.0, "{b}");
    let st = pair.status_on(Host::Primary).unwrap();
    assert!(
        st.contains("redis: primary (responsive mode), term 1, protected"),
        "{st}"
    );
    let st = pair.status_on(Host::Backup).unwrap();
    assert!(
        st.contains("protecting redis of")
            && st.contains("term 1, holds a committed checkpoint")
            && st.contains("the primary's longest silence"),
        "{st}"
    );

    lab.cut(Host::Primary, &Host::ARBITERS).unwrap();
    let target = pair.target();
    let r = lab
        .in_host(Host::Client, || {
            rrc_bench::verify::run(
                rrc_bench::verify::Service::Redis,
                target,
                4,
                || {},
                Duration::from_millis(1500),
            )
        })
        .unwrap();
    assert!(r.errors.is_empty() && r.requests > 0, "{r:?}");
    let st = pair.primary_status().unwrap();
    assert!(st.protected && !st.awaiting_arbiter, "{st:?}");
    assert!(pair.backup_running(), "{}", pair.backup_output());

    let t = fault_trial(
        &mut pair,
        4,
        Duration::from_millis(500),
        Duration::from_millis(2500),
        |p| p.cut_link(),
        Duration::from_secs(20),
    )
    .unwrap();
    assert!(
        t.errors.is_empty() && t.all_answered_ms.is_some_and(|ms| ms < ANSWERED_WITHIN_MS),
        "{t:#?}\n{}",
        pair.backup_output()
    );
    // The old primary cannot reach the arbiter: it holds, and says why.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !pair.primary_output().contains("still holding replies") {
        assert!(Instant::now() < deadline, "{}", pair.primary_output());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(pair.primary_serves().unwrap());
    let st = pair.primary_status().unwrap();
    assert!(st.awaiting_arbiter && !st.protected, "{st:?}");
    let p = pair.scrape(Host::Primary).unwrap();
    assert_eq!(metric(&p, "rrc_protected{service=\"redis\"}"), 0.0);
    assert!(
        metric(&p, "rrc_output_hold_seconds_count{service=\"redis\"}") > 0.0,
        "{p}"
    );
    let st = pair.status_on(Host::Primary).unwrap();
    assert!(
        st.contains("holding replies until the arbiter answers"),
        "{st}"
    );
    let st = pair.status_on(Host::Backup).unwrap();
    assert!(
        st.contains("took over from checkpoint") && st.contains("resumed by replaying the log"),
        "{st}"
    );
    // Reaching the arbiter again, it learns that it lost.
    lab.heal(Host::Primary, &Host::ARBITERS).unwrap();
    assert_backup_alone_serves(&lab, &pair, t.takeover.as_ref().unwrap());
}

/// One arbiter host killed: the two members left are a quorum, and a
/// takeover goes as usual. The whole arbiter unreachable: when the link
/// breaks neither side acts (both say why) and the service holds; when
/// the link is back, the pair carries on as before, with no client error.
#[test]
fn the_arbiter_short_a_member_still_decides_and_unreachable_decides_nothing() {
    let lab = arbiter_lab("quorum");
    let mut pair = Pair::new(&lab, App::Redis, responsive_with_arbiter(&lab)).unwrap();
    lab.kill(Host::Arb1).unwrap();
    pair.start_backup().unwrap();
    pair.start_primary().unwrap();
    let t = rrc_bench::failover::trial(
        &mut pair,
        4,
        Duration::from_millis(700),
        Duration::from_millis(1500),
    )
    .unwrap();
    assert!(
        t.ok() && t.all_answered_ms.is_some_and(|ms| ms < ANSWERED_WITHIN_MS),
        "{t:#?}\n{}",
        pair.backup_output()
    );
    eprintln!(
        "with one member down: {}",
        t.takeover.as_ref().unwrap().describe()
    );
    pair.reset().unwrap();

    // No arbiter at all: the two other members killed too.
    pair.start_backup().unwrap();
    pair.start_primary().unwrap();
    lab.kill(Host::Arb2).unwrap();
    lab.kill(Host::Arb3).unwrap();
    let t = fault_trial(
        &mut pair,
        4,
        Duration::from_millis(500),
        Duration::from_millis(3000),
        |p| {
            let t = p.cut_link()?;
            let deadline = Instant::now() + Duration::from_secs(20);
            while !(p.backup_output().contains("cannot take over yet")
                && p.primary_output().contains("still holding replies"))
            {
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "the sides did not both say they wait for the arbiter:\n{}\n{}",
                    p.backup_output(),
                    p.primary_output()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
            p.lab().heal(Host::Primary, &[Host::Backup])?;
            Ok(t)
        },
        Duration::from_secs(5),
    )
    .unwrap();
    assert!(t.takeover.is_none(), "{t:#?}");
    assert!(t.errors.is_empty(), "{t:#?}");
    let out = pair.backup_output();
    assert!(
        out.contains("connected again before the arbiter answered"),
        "{out}"
    );
    assert!(pair.primary_serves().unwrap());
}

/// Two services, each primary on the other's backup host, both under
/// verifying load; the host of one primary (and of the other's backup)
/// killed: the first service's backup wins its term and takes over, the
/// second service's primary wins its own and goes on unprotected. No
/// client of either sees an error.
#[test]
fn two_services_each_primary_on_the_others_backup_host_survive_a_host_kill() {
    let lab = arbiter_lab("two");
    let mut redis = Pair::new(&lab, App::Redis, responsive_with_arbiter(&lab)).unwrap();
    let mut mc = Pair::new(&lab, App::Memcached, responsive_with_arbiter(&lab))
        .unwrap()
        .swapped(1);
    redis.start_backup().unwrap();
    redis.start_primary().unwrap();
    mc.start_backup().unwrap();
    mc.start_primary().unwrap();
    let mc_target = mc.target();
    let (t, mc_load) = std::thread::scope(|s| {
        let load = s.spawn(|| {
            lab.in_host(Host::Client, || {
                rrc_bench::verify::run(
                    rrc_bench::verify::Service::Memcached,
                    mc_target,
                    4,
                    || {},
                    Duration::from_secs(5),
                )
            })
            .unwrap()
        });
        let t = rrc_bench::failover::trial(
            &mut redis,
            4,
            Duration::from_millis(700),
            Duration::from_millis(1500),
        )
        .unwrap();
        (t, load.join().unwrap())
    });
    assert!(
        t.ok() && t.all_answered_ms.is_some_and(|ms| ms < ANSWERED_WITHIN_MS),
        "{t:#?}\n{}",
        redis.backup_output()
    );
    assert!(
        mc_load.errors.is_empty() && mc_load.requests > 0,
        "{mc_load:?}\n{}",
        mc.primary_output()
    );
    // Memcached's primary lost its backup with the host, won term 2 and
    // serves on.
    assert!(mc.primary_serves().unwrap());
    let out = mc.primary_output();
    assert!(
        out.contains("the arbiter gave memcached to this host at term 2"),
        "{out}"
    );
}

/// Protection comes back after a takeover: in one continuous run of
/// verifying clients, the primary host is killed, the backup takes over
/// (and replicates the restored service to the old primary's host), that
/// host is revived and a backup started there, which receives a full
/// checkpoint; then the new primary's host is killed and the service
/// comes back to the first host. No client sees an error or a reset.
/// The program records again once the first takeover goes live: the
/// service is protected again in responsive mode, and the takeover back
/// is by replay as well.
/// Both hosts prove identities of their own on the link, each accepting
/// only the other, in both directions.
#[test]
fn kill_takeover_reprotect_kill_again_and_take_over_back() {
    let lab = arbiter_lab("reprot");
    let opts = PairOptions {
        then_protect: true,
        metrics: true,
        identities: true,
        ..responsive_with_arbiter(&lab)
    };
    let mut pair = Pair::new(&lab, App::Redis, opts).unwrap();
    pair.start_backup().unwrap();
    pair.start_primary().unwrap();
    let target = pair.target();
    let mut steps: Vec<String> = Vec::new();
    let mut first_dir = std::path::PathBuf::new();
    let report = std::thread::scope(|s| {
        let p = &mut pair;
        let steps = &mut steps;
        let first_dir = &mut first_dir;
        let run = s.spawn(move || -> anyhow::Result<()> {
            std::thread::sleep(Duration::from_millis(700));
            p.kill_primary()?;
            let first = p.wait_takeover(Duration::from_secs(20))?;
            steps.push(first.describe());
            anyhow::ensure!(first.replay.is_some(), "not by replay: {first:?}");
            p.lab().revive(p.primary_host())?;
            p.swap_roles();
            // The backup's metrics endpoint now speaks for the primary the
            // takeover made, under the term it won.
            let m = p.scrape(p.primary_host())?;
            anyhow::ensure!(
                metric(&m, "rrc_role{service=\"redis\",role=\"primary\"}") == 1.0
                    && metric(&m, "rrc_term{service=\"redis\"}") == 2.0
                    && metric(&m, "rrc_takeovers_total{service=\"redis\"}") == 1.0
                    && metric(&m, "rrc_protected{service=\"redis\"}") == 0.0,
                "after the takeover:\n{m}"
            );
            // The new backup keeps its files in a directory of its own, as
            // on another machine: the service must not depend on what the
            // first takeover left in the first backup's.
            *first_dir = p.backup_dir().to_path_buf();
            p.set_backup_dir(first_dir.with_extension("again"));
            p.start_backup()?;
            p.wait_protected(Duration::from_secs(30))?;
            steps.push("protected again".into());
            let st = p.status_on(p.primary_host())?;
            anyhow::ensure!(st.contains("primary (responsive mode)"), "{st}");
            let deadline = Instant::now() + Duration::from_secs(10);
            while metric(
                &p.scrape(p.primary_host())?,
                "rrc_protected{service=\"redis\"}",
            ) != 1.0
            {
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "the metrics never said protected"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
            std::thread::sleep(Duration::from_millis(700));
            p.kill_primary()?;
            let second = p.wait_takeover(Duration::from_secs(20))?;
            steps.push(second.describe());
            anyhow::ensure!(
                second.replay.is_some(),
                "the takeover back was not by replay: {second:?}"
            );
            Ok(())
        });
        let report = lab
            .in_host(Host::Client, || {
                rrc_bench::verify::run(
                    rrc_bench::verify::Service::Redis,
                    target,
                    4,
                    || {
                        // The faults run beside the load; it goes on until
                        // they are over, and a second more.
                        while !run.is_finished() {
                            std::thread::sleep(Duration::from_millis(50));
                        }
                    },
                    Duration::from_secs(1),
                )
            })
            .unwrap();
        (report, run.join().unwrap())
    });
    let (report, faults) = report;
    for s in &steps {
        eprintln!("{s}");
    }
    if !first_dir.as_os_str().is_empty() {
        let _ = std::fs::remove_dir_all(&first_dir);
    }
    faults.unwrap_or_else(|e| panic!("{e:#}\n{}", pair.backup_output()));
    assert!(
        report.errors.is_empty() && report.requests > 0,
        "{report:?}\n{}",
        pair.backup_output()
    );
    // The service is back on the first host, under the third term.
    let ps = lab.run_on(Host::Primary, &[RRC, "ps"]).unwrap();
    assert!(ps.contains("redis"), "{ps}");
    assert!(
        pair.backup_output().contains("at term 3"),
        "{}",
        pair.backup_output()
    );
}

/// Waits until `rrc status` on `host` shows a backup holding a committed
/// checkpoint of each of `services`.
fn wait_all_protected(pair: &Pair<'_>, host: Host, services: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = pair.status_on(host).unwrap();
        let all = services.iter().all(|s| {
            st.lines().any(|l| {
                l.contains(&format!("protecting {s} of"))
                    && l.contains("holds a committed checkpoint")
            })
        });
        if all {
            return;
        }
        assert!(Instant::now() < deadline, "{st}\n{}", pair.backup_output());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One `rrc backup --keep-serving` protects two primaries (Redis and
/// Memcached, each with its own state); their host killed under load on
/// both, it takes both services over, each in a process of its own, and
/// goes on running. No client of either sees an error. Both restored
/// services then replicate to the revived host, where one backup protects
/// them again.
#[test]
fn one_backup_protects_two_primaries_and_takes_both_over() {
    let lab = arbiter_lab("many");
    let opts = PairOptions {
        keep_serving: true,
        then_protect: true,
        ..responsive_with_arbiter(&lab)
    };
    // The backup (started by the Redis pair) serves metrics for both.
    let with_metrics = PairOptions {
        metrics: true,
        ..opts.clone()
    };
    let mut redis = Pair::new(&lab, App::Redis, with_metrics).unwrap();
    let mc = Pair::new(&lab, App::Memcached, opts)
        .unwrap()
        .sharing_backup_of(&redis, 1);
    redis.start_backup().unwrap();
    redis.launch_primary().unwrap();
    mc.launch_primary().unwrap();
    wait_all_protected(&redis, Host::Backup, &["redis", "memcached"]);
    let b = redis.scrape(Host::Backup).unwrap();
    for svc in ["redis", "memcached"] {
        assert_eq!(
            metric(&b, &format!("rrc_protected{{service=\"{svc}\"}}")),
            1.0,
            "{b}"
        );
        assert_eq!(
            metric(
                &b,
                &format!("rrc_role{{service=\"{svc}\",role=\"backup\"}}")
            ),
            1.0
        );
    }
    let load = |service, target| {
        lab.in_host(Host::Client, || {
            rrc_bench::verify::run(service, target, 4, || {}, Duration::from_secs(5))
        })
        .unwrap()
    };
    let (r, m) = std::thread::scope(|s| {
        let r = s.spawn(|| load(rrc_bench::verify::Service::Redis, redis.target()));
        let m = s.spawn(|| load(rrc_bench::verify::Service::Memcached, mc.target()));
        std::thread::sleep(Duration::from_millis(700));
        redis.kill_primary().unwrap();
        (r.join().unwrap(), m.join().unwrap())
    });
    let out = redis.backup_output();
    eprintln!("{out}");
    eprintln!(
        "redis primary:\n{}\nmemcached primary:\n{}",
        redis.primary_output(),
        mc.primary_output()
    );
    assert!(r.errors.is_empty() && r.requests > 0, "{r:?}\n{out}");
    assert!(m.errors.is_empty() && m.requests > 0, "{m:?}\n{out}");
    assert!(out.contains("redis: took over from checkpoint"), "{out}");
    assert!(
        out.contains("memcached: took over from checkpoint"),
        "{out}"
    );
    assert!(redis.backup_running(), "the backup stopped:\n{out}");
    let b = redis.scrape(Host::Backup).unwrap();
    for svc in ["redis", "memcached"] {
        assert_eq!(
            metric(&b, &format!("rrc_takeovers_total{{service=\"{svc}\"}}")),
            1.0,
            "{b}"
        );
    }
    let ps = lab.run_on(Host::Backup, &[RRC, "ps"]).unwrap();
    assert!(ps.contains("redis") && ps.contains("memcached"), "{ps}");

    // Protected again, both, by one backup on the revived host.
    lab.revive(Host::Primary).unwrap();
    let first_dir = redis.backup_dir().to_path_buf();
    redis.stop_backup_process();
    redis.swap_roles();
    redis.set_backup_dir(first_dir.with_extension("again"));
    redis.start_backup().unwrap();
    wait_all_protected(&redis, Host::Primary, &["redis", "memcached"]);
    let _ = std::fs::remove_dir_all(&first_dir);
}
