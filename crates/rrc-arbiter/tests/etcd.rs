//! The arbiter on a real etcd cluster of three members on loopback: one
//! claim wins a term, a member lost changes nothing, a cluster without a
//! quorum is unreachable rather than wrong.

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use rrc_arbiter::etcd::{self, Etcd, Member};
use rrc_arbiter::{Arbiter, ArbiterError, Claim, succeed, take};

struct Cluster {
    members: Vec<Member>,
    children: Vec<Option<Child>>,
    _dir: Dir,
}

struct Dir(std::path::PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in self.children.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `n` distinct free ports: each is held until all are chosen, or the
/// kernel may give the same one twice (two members on one port make a
/// cluster that has lost a member from the start).
fn free_addrs(n: usize) -> Vec<SocketAddr> {
    let held: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("a free port"))
        .collect();
    held.iter()
        .map(|l| l.local_addr().expect("a bound address"))
        .collect()
}

impl Cluster {
    fn start(tag: &str, n: usize) -> Cluster {
        let dir = std::env::temp_dir().join(format!("rrc-arbiter-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let ports = free_addrs(2 * n);
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client: ports[2 * i],
                peer: ports[2 * i + 1],
            })
            .collect();
        let children = members
            .iter()
            .map(|m| {
                let c = etcd::member_command(m, &members, tag, &dir.join(&m.name))
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("etcd runs (scripts/setup installs etcd-server)");
                Some(c)
            })
            .collect();
        let c = Cluster {
            members,
            children,
            _dir: Dir(dir),
        };
        // Ready once it answers a read.
        let arb = c.arbiter();
        let t0 = Instant::now();
        while arb.read("ready").is_err() {
            assert!(t0.elapsed() < Duration::from_secs(60), "etcd did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        c
    }

    fn arbiter(&self) -> Etcd {
        Etcd::new(&etcd::endpoints(&self.members), Duration::from_secs(2)).unwrap()
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Retries while the cluster elects a leader (a second or so after a
/// member is lost).
fn patiently<T>(f: impl Fn() -> Result<T, ArbiterError>) -> T {
    let t0 = Instant::now();
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) if e.is_transient() && t0.elapsed() < Duration::from_secs(30) => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("{e}"),
        }
    }
}

#[test]
fn one_side_wins_each_term_and_a_lost_member_changes_nothing() {
    let mut cl = Cluster::start("quorum", 3);
    let arb = cl.arbiter();
    let (t1, before) = take(&arb, "redis", "primary").unwrap();
    assert_eq!((t1.number, before), (1, None));

    // The backup and the primary lost each other; the backup asks first.
    let t0 = Instant::now();
    let b = succeed(&arb, "redis", &t1, "backup").unwrap();
    let took = t0.elapsed();
    let Claim::Won(t2) = b else {
        panic!("the backup lost: {b:?}")
    };
    assert_eq!(t2.number, 2);
    assert!(
        matches!(succeed(&arb, "redis", &t1, "primary").unwrap(), Claim::Lost(Some(t)) if t == t2)
    );
    eprintln!("a claim took {:.1} ms", took.as_secs_f64() * 1e3);

    // One member gone: the two others are a quorum.
    cl.kill(0);
    let t3 = patiently(|| match succeed(&arb, "redis", &t2, "primary")? {
        Claim::Won(t) => Ok(t),
        Claim::Lost(now) => panic!("lost to {now:?}"),
    });
    assert_eq!(t3.number, 3);
    assert_eq!(patiently(|| arb.read("redis")), Some(t3.clone()));

    // Two gone: no quorum, so no answer at all rather than a wrong one.
    cl.kill(1);
    let e = succeed(&arb, "redis", &t3, "backup").unwrap_err();
    assert!(matches!(e, ArbiterError::Unreachable(_)), "{e}");
}

#[test]
fn a_record_that_is_not_rrcs_is_refused() {
    let cl = Cluster::start("foreign", 1);
    let arb = cl.arbiter();
    let status = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args([
            "--endpoints",
            &etcd::endpoints(&cl.members),
            "put",
            "/rrc/services/web",
            "not json",
        ])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    assert!(matches!(arb.read("web"), Err(ArbiterError::Corrupt { .. })));
    assert!(matches!(
        take(&arb, "web", "p"),
        Err(ArbiterError::Corrupt { .. })
    ));
}
