//! `rrc demo`: the main job, end to end in a local lab.

use std::net::{IpAddr, SocketAddr};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use clap::Args;
use rrc_bench::resp::RespConn;
use rrc_bench::session::LabSession;
use rrc_lab::Host;

/// Demonstrate rrc in a local lab: Redis runs as a container on the
/// `primary` host behind the service address; `client` drives it with
/// redis-benchmark through that address; the data is verified; the lab is
/// removed at the end.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Lab name to use (it is created and removed).
    #[arg(long, default_value = "demo")]
    lab: String,
    /// Requests per redis-benchmark test.
    #[arg(long, default_value_t = 100_000)]
    requests: u64,
}

pub fn demo(a: DemoArgs) -> Result<i32> {
    rrc_container::probe::require_root("rrc demo")?;
    let exe = std::env::current_exe().context("cannot locate the rrc binary")?;
    let step = |n: u32, m: &str| println!("[{n}/5] {m}");

    step(1, &format!("bringing up lab `{}`", a.lab));
    let lab = LabSession::start(&exe, &a.lab, None)?;
    let plan = lab.plan().clone();
    let vip = plan.vip();
    println!(
        "      LAN {}: client {}, primary {}, backup {}; service address {}",
        plan.subnet,
        plan.lan_addr(Host::Client).addr(),
        plan.lan_addr(Host::Primary).addr(),
        plan.lan_addr(Host::Backup).addr(),
        vip.addr()
    );

    step(2, "starting Redis as an rrc container on primary");
    lab.run_container(
        Host::Primary,
        "redis",
        vip,
        &[
            "redis-server",
            "--port",
            "6379",
            "--protected-mode",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
        ],
    )?;
    let target = SocketAddr::new(IpAddr::V4(vip.addr()), 6379);
    lab.wait_tcp(Host::Client, target, Duration::from_secs(10))?;
    print!(
        "{}",
        lab.run_on(Host::Primary, &[&exe.display().to_string(), "ps"])?
    );

    step(
        3,
        &format!("redis-benchmark from client through {}", vip.addr()),
    );
    let status = lab
        .command_on(
            Host::Client,
            &[
                "redis-benchmark",
                "-h",
                &vip.addr().to_string(),
                "-q",
                "-n",
                &a.requests.to_string(),
                "-c",
                "50",
                "-t",
                "set,get,incr,lpush",
            ],
        )
        .stdout(Stdio::inherit())
        .status()
        .context("cannot run redis-benchmark")?;
    ensure!(status.success(), "redis-benchmark failed");

    step(4, "verifying data through the service address");
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
    println!("      {checked} keys written and read back intact");

    step(5, "removing the lab");
    drop(lab);
    println!("done");
    Ok(0)
}
