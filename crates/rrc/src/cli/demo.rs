//! `rrc demo`: the main job, end to end in a local lab.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use clap::Args;
use rrc_bench::failover::{App, Mode, Pair, PairOptions, TakeoverLine};
use rrc_bench::resp::RespConn;
use rrc_bench::session::LabSession;
use rrc_bench::verify::{self, Live, LiveReading};
use rrc_lab::Host;

use super::ModeArg;

/// Demonstrate a replicated service surviving the loss of its host, twice.
///
/// In a local lab with an arbiter (etcd on three hosts of its own): `rrc
/// backup` waits on the `backup` host; Redis runs as a replicated
/// container on `primary` (`rrc primary`), checkpointed every 100 ms to
/// the backup and, in responsive mode (the default), recorded with its log
/// streamed to the backup, each reply held only until the backup has the
/// log that produced it; verifying clients on `client` load it through the
/// service address, with a live view of replies per second and latency.
/// Mid-load the primary host is killed (every process, links down); the
/// backup wins the service's next term from the arbiter, restores the last
/// checkpoint, replays the log and carries every connection over, and the
/// same client connections go on. The dead host is then revived and a
/// backup started there: the new primary sends it a full checkpoint and
/// the service is protected again. Then the new primary's host is killed,
/// and the service comes back to the first host. Every reply is checked
/// against what the clients wrote, the data is verified, the first
/// takeover's log is replayed offline against what the clients received,
/// and the lab is removed at the end.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Lab name to use (it is created and removed).
    #[arg(long, default_value = "demo")]
    lab: String,
    /// Verifying client connections.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Load before the primary host is killed.
    #[arg(long, default_value = "4s", value_parser = super::parse_duration)]
    before: Duration,
    /// Load after re-protection (half before the second kill, half after
    /// the takeover back).
    #[arg(long, default_value = "4s", value_parser = super::parse_duration)]
    after: Duration,
    /// The primary's mode (see `rrc primary --help`). responsive: the
    /// primary also streams Redis's log to the backup and replies wait
    /// only for it; the takeover replays it; afterwards the backup's
    /// checkpoint and log are replayed once more offline and compared with
    /// what the clients received. checkpoint: replies wait for
    /// checkpoints.
    #[arg(long, value_enum, default_value_t = ModeArg::Responsive)]
    mode: ModeArg,
}

const STEPS: u32 = 7;

fn step(n: u32, m: &str) {
    println!("[{n}/{STEPS}] {m}");
}

pub fn demo(a: DemoArgs) -> Result<i32> {
    rrc_container::probe::require_root("rrc demo")?;
    ensure!(a.connections > 0, "--connections must be at least 1");
    let exe = std::env::current_exe().context("cannot locate the rrc binary")?;

    step(
        1,
        &format!("bringing up lab `{}` with its arbiter (etcd)", a.lab),
    );
    let lab = LabSession::start_with_arbiter(&exe, &a.lab, None)?;
    let plan = lab.plan().clone();
    println!(
        "      LAN {}: client {}, primary {}, backup {}; service address {}",
        plan.subnet,
        plan.lan_addr(Host::Client).addr(),
        plan.lan_addr(Host::Primary).addr(),
        plan.lan_addr(Host::Backup).addr(),
        plan.vip().addr()
    );
    println!(
        "      arbiter: etcd on arb1, arb2, arb3 ({}); the backup must win the service's next term there before it takes over",
        lab.arbiter().unwrap_or("none")
    );

    step(
        2,
        &format!(
            "starting the backup, then Redis replicated from primary ({} mode)",
            Mode::from(a.mode).name()
        ),
    );
    // Failure detection as `rrc primary` and `rrc backup` have it.
    let opts = PairOptions {
        mode: a.mode.into(),
        arbiter: lab.arbiter().map(str::to_string),
        then_protect: true,
        timeout: rrc_replica::DEFAULT_TIMEOUT,
        heartbeat: rrc_replica::DEFAULT_HEARTBEAT,
        ..PairOptions::default()
    };
    let mut pair = Pair::new(&lab, App::Redis, opts)?;
    pair.start_backup()?;
    pair.start_primary()?;
    if a.mode == ModeArg::Responsive {
        println!(
            "      the backup holds Redis's first checkpoint; one every 100 ms follows. Redis runs recorded: its log and its inbound frames reach the backup as they come, and each reply waits only until the backup has the log that produced it"
        );
    } else {
        println!(
            "      the backup holds Redis's first checkpoint; one every 100 ms follows, each released reply waits for it"
        );
    }

    step(
        3,
        &format!(
            "{} verifying clients load Redis through {}; the primary host dies in {:.0} s",
            a.connections,
            pair.target(),
            a.before.as_secs_f64()
        ),
    );
    let live = Arc::new(Live::default());
    let target = pair.target();
    let first_dir = pair.backup_dir().to_path_buf();
    let second_dir = first_dir.with_extension("second");
    let mut killed_at = None;
    let mut at_kill = Vec::new();
    let mut would_be = None;
    let mut takeovers: Vec<TakeoverLine> = Vec::new();
    let mut trouble: Option<anyhow::Error> = None;
    let report = {
        let p = &mut pair;
        let live_view = live.clone();
        lab.in_host(Host::Client, || {
            verify::run_observed(
                verify::Service::Redis,
                target,
                a.connections,
                &live,
                || {
                    let mut view = LiveView::new(live_view.clone());
                    view.run_for(a.before, &mut || None);
                    would_be = p.primary_status().ok();
                    println!(
                        "      >>> killing the primary host (power cut: every process, links down)"
                    );
                    match p.kill_primary() {
                        Ok(t) => killed_at = Some(t),
                        Err(e) => println!("      cannot kill the primary: {e:#}"),
                    }
                    at_kill = live_view.received_now();
                    let r = second_failure(p, &mut view, &second_dir, a.after, &mut takeovers);
                    trouble = r.err();
                },
                Duration::ZERO,
            )
        })?
    };
    if let Some(e) = trouble {
        return Err(e.context("the demo's takeovers"));
    }

    step(4, "what the clients saw");
    let killed_at = killed_at.context("the primary was never killed")?;
    println!(
        "      {} replies on {} connections through two takeovers, {} errors, {} connections reset, longest wait for a reply {:.0} ms",
        report.requests,
        report.connections,
        report.errors.len(),
        report
            .errors
            .iter()
            .filter(|e| e.contains("reset") || e.contains("refused"))
            .count(),
        report.max_gap_ms
    );
    // Replies from the new primary: after the backup decided (just after
    // the kill, replies the old primary released may still arrive).
    let decided = Duration::from_secs_f64(takeovers.first().map_or(0.0, |t| t.silent_ms) / 1e3);
    match report.first_answer_after(killed_at + decided) {
        Some(d) => println!(
            "      after the first kill, the new primary's first reply came {:.0} ms after it; every connection answered by it within {:.0} ms",
            (d + decided).as_secs_f64() * 1e3,
            (report
                .all_answered_after(killed_at + decided)
                .unwrap_or_default()
                + decided)
                .as_secs_f64()
                * 1e3
        ),
        None => println!("      no reply from the new primary"),
    }
    for e in report.errors.iter().take(5) {
        println!("      error: {e}");
    }
    let t = takeovers
        .first()
        .cloned()
        .context("the backup did not take over")?;
    ensure!(report.errors.is_empty(), "clients saw errors");

    step(
        5,
        "verifying data on the backup through the service address",
    );
    let checked = lab.in_host(Host::Client, || -> Result<u32> {
        let mut c = RespConn::connect(target, Duration::from_secs(5))?;
        for i in 0..1000u32 {
            c.set(
                format!("demo:{i}").as_bytes(),
                format!("value-{i}").as_bytes(),
            )?;
        }
        for i in 0..1000u32 {
            let v = c.get(format!("demo:{i}").as_bytes())?;
            ensure!(
                v.as_deref() == Some(format!("value-{i}").as_bytes()),
                "demo:{i} read back wrong"
            );
        }
        Ok(1000)
    })??;
    println!(
        "      every acknowledged write survived (checked on every reply); {checked} more keys written and read back on the new primary (checkpoint {})",
        t.epoch
    );

    if a.mode == ModeArg::Responsive {
        step(
            6,
            "replaying the backup's checkpoint and log offline (the new primary stops)",
        );
        if let Some(w) = would_be.as_ref().map(|s| s.would_be_data) {
            println!(
                "      before the kill, replies waited {:.0} µs on average (p99 {:.0} µs) for the backup to hold their log",
                w.avg_us, w.p99_us
            );
        }
        // The first takeover's checkpoint and log, on the host that
        // serves now (its container stops for it).
        pair.set_backup_dir(first_dir.clone());
        let c = pair.replay_check_against(&report.received, &at_kill)?;
        let connections = match (c.matched, c.unmatched.len()) {
            (0, 0) => "the log holds no reply to a client (none was made after the checkpoint)"
                .to_string(),
            (n, _) => format!("{n} connection(s) wrote what their clients received, byte for byte"),
        };
        println!(
            "      {} events replayed from checkpoint {}, {} divergences, {}; {connections}",
            c.events,
            t.epoch,
            c.divergences,
            if c.end_reached {
                "end of the log reached"
            } else {
                "the end of the log NOT reached"
            },
        );
        ensure!(
            c.ok(),
            "the backup's log did not replay what the clients saw: {c:#?}"
        );
    } else {
        step(6, "(checkpoint mode: no log to replay)");
    }

    step(7, "removing the lab");
    drop(pair);
    drop(lab);
    let _ = std::fs::remove_dir_all(&first_dir);
    let _ = std::fs::remove_dir_all(&second_dir);
    println!("done");
    Ok(0)
}

/// After the first kill, under the same load: waits for the takeover,
/// revives the old primary's host, starts a backup there (protection comes
/// back with its first commit), then kills the new primary's host and
/// waits for the takeover back, showing each step as it happens.
fn second_failure(
    p: &mut Pair<'_>,
    view: &mut LiveView,
    second_dir: &std::path::Path,
    after: Duration,
    takeovers: &mut Vec<TakeoverLine>,
) -> Result<()> {
    view.run_until(Duration::from_secs(20), &mut || {
        let t = TakeoverLine::parse(&p.backup_output())?;
        Some(format!("      >>> {}", t.describe()))
    });
    let first = p.wait_takeover(Duration::from_secs(10))?;
    takeovers.push(first);
    println!(
        "      >>> the new primary replicates to the old primary's host, which is down: unprotected for now; reviving that host"
    );
    let old = p.primary_host();
    p.lab().revive(old)?;
    p.swap_roles();
    p.set_backup_dir(second_dir.to_path_buf());
    p.start_backup()?;
    view.run_until(Duration::from_secs(30), &mut || {
        p.backup_output()
            .contains("committed checkpoint 0 ")
            .then(|| format!("      >>> a backup on {old} holds a full checkpoint: protected again, with no restart"))
    });
    view.run_for(after / 2, &mut || None);
    println!("      >>> killing the new primary's host");
    p.kill_primary()?;
    view.run_until(Duration::from_secs(20), &mut || {
        let t = TakeoverLine::parse(&p.backup_output())?;
        Some(format!("      >>> {}", t.describe()))
    });
    let second = p.wait_takeover(Duration::from_secs(10))?;
    takeovers.push(second);
    println!("      (the service is back on {old}, unprotected until a backup joins it)");
    view.run_for(after / 2, &mut || None);
    Ok(())
}

/// Prints replies per second and latency every half second.
struct LiveView {
    live: Arc<Live>,
    last: LiveReading,
    last_at: Instant,
    start: Instant,
}

impl LiveView {
    fn new(live: Arc<Live>) -> LiveView {
        LiveView {
            last: live.read(),
            live,
            last_at: Instant::now(),
            start: Instant::now(),
        }
    }

    /// Shows a line every half second until `event` has something to
    /// say (shown too), or for `limit` at most.
    fn run_until(&mut self, limit: Duration, event: &mut dyn FnMut() -> Option<String>) {
        let said = std::cell::Cell::new(false);
        self.run_while(limit, &mut || !said.get(), &mut || {
            let line = event();
            said.set(said.get() || line.is_some());
            line
        });
    }

    /// Shows a line every half second for `d`, and whatever `event` has to
    /// say as it happens.
    fn run_for(&mut self, d: Duration, event: &mut dyn FnMut() -> Option<String>) {
        self.run_while(d, &mut || true, event);
    }

    fn run_while(
        &mut self,
        d: Duration,
        go_on: &mut dyn FnMut() -> bool,
        event: &mut dyn FnMut() -> Option<String>,
    ) {
        let until = Instant::now() + d;
        while Instant::now() < until && go_on() {
            std::thread::sleep(Duration::from_millis(100));
            if let Some(line) = event() {
                println!("{line}");
            }
            if self.last_at.elapsed() < Duration::from_millis(500) {
                continue;
            }
            let now = self.live.read();
            let dt = self.last_at.elapsed().as_secs_f64();
            let n = now.replies - self.last.replies;
            let lat = if n > 0 {
                format!(
                    "{:6.1} ms",
                    (now.latency - self.last.latency).as_secs_f64() * 1e3 / n as f64
                )
            } else {
                "     - ms".into()
            };
            println!(
                "      t={:4.1}s  {:6.0} replies/s  avg latency {lat}  longest wait {:6.1} ms  errors {}",
                self.start.elapsed().as_secs_f64(),
                n as f64 / dt,
                self.live.take_longest().as_secs_f64() * 1e3,
                now.errors
            );
            self.last = now;
            self.last_at = Instant::now();
        }
    }
}
