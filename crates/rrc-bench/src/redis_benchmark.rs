//! Runs Redis's own `redis-benchmark` and reads its CSV output.

use std::collections::BTreeMap;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Requests per second by test name (e.g. "SET", "GET").
pub fn parse_csv(text: &str) -> Result<BTreeMap<String, f64>> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split(',').map(|f| f.trim_matches('"')).collect();
        if fields.len() < 2 || fields[0] == "test" {
            continue;
        }
        if let Ok(rps) = fields[1].parse::<f64>() {
            out.insert(fields[0].to_string(), rps);
        }
    }
    if out.is_empty() {
        bail!("redis-benchmark printed no results: {text:?}");
    }
    Ok(out)
}

/// Runs `redis-benchmark` through `launcher` (e.g. `rrc lab exec client --`)
/// against host:port.
pub fn run(
    launcher: &[String],
    host: &str,
    port: u16,
    requests: u64,
    clients: u32,
    tests: &str,
) -> Result<BTreeMap<String, f64>> {
    let mut cmd = Command::new(&launcher[0]);
    cmd.args(&launcher[1..]).args([
        "redis-benchmark",
        "-h",
        host,
        "-p",
        &port.to_string(),
        "-n",
        &requests.to_string(),
        "-c",
        &clients.to_string(),
        "-t",
        tests,
        "--csv",
    ]);
    let out = cmd.output().context("cannot start redis-benchmark")?;
    if !out.status.success() {
        bail!(
            "redis-benchmark failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    parse_csv(&String::from_utf8_lossy(&out.stdout))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_redis7_csv() {
        let text = "\"test\",\"rps\",\"avg_latency_ms\",\"min_latency_ms\",\"p50_latency_ms\",\"p95_latency_ms\",\"p99_latency_ms\",\"max_latency_ms\"\n\"SET\",\"41322.31\",\"0.632\",\"0.152\",\"0.599\",\"0.935\",\"1.271\",\"3.743\"\n\"GET\",\"44247.79\",\"0.590\",\"0.144\",\"0.575\",\"0.847\",\"1.135\",\"2.295\"\n";
        let m = parse_csv(text).unwrap();
        assert_eq!(m["SET"], 41322.31);
        assert_eq!(m["GET"], 44247.79);
        assert!(parse_csv("").is_err());
    }
}
