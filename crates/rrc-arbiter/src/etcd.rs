//! The arbiter on etcd: a service's record is one key, swapped in a
//! transaction that compares its value.
//!
//! etcd's client is asynchronous; rrc's replication is not. Each call runs
//! on a runtime of its own, on the calling thread, and connects anew: no
//! thread outlives the call. That matters because a backup forks the
//! restored container's supervisor right after its claim, and a fork
//! must not leave another thread's lock held in the child. A call costs
//! a connection (about a millisecond on a LAN) besides its round trip.

use std::future::Future;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, Txn, TxnOp, TxnOpResponse};

use crate::{Arbiter, ArbiterError, Swapped, Term};

/// The client port etcd listens on unless told otherwise.
pub const DEFAULT_PORT: u16 = 2379;

pub struct Etcd {
    endpoints: Vec<String>,
    /// For the whole of one call: connecting and its round trip.
    timeout: Duration,
}

impl Etcd {
    /// An arbiter at `endpoints`: a comma-separated list of HOST[:PORT]
    /// or http://HOST[:PORT], the members of one etcd cluster.
    pub fn new(endpoints: &str, timeout: Duration) -> Result<Etcd, ArbiterError> {
        let endpoints = endpoints
            .split(',')
            .map(|e| normalize(e.trim()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Etcd { endpoints, timeout })
    }

    /// Runs `op` against the cluster, within the timeout.
    fn call<T, F>(&self, op: impl FnOnce(Client) -> F) -> Result<T, ArbiterError>
    where
        F: Future<Output = Result<T, etcd_client::Error>>,
    {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ArbiterError::Unreachable(format!("cannot start its client: {e}")))?;
        let opts = ConnectOptions::new()
            .with_connect_timeout(self.timeout)
            .with_timeout(self.timeout);
        let endpoints = self.endpoints.clone();
        let work = async move {
            let client = Client::connect(endpoints, Some(opts)).await?;
            op(client).await
        };
        match rt.block_on(async { tokio::time::timeout(self.timeout, work).await }) {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(ArbiterError::Unreachable(format!(
                "{} ({e})",
                self.describe()
            ))),
            Err(_) => Err(ArbiterError::Unreachable(format!(
                "{} did not answer within {} ms",
                self.describe(),
                self.timeout.as_millis()
            ))),
        }
    }
}

/// `HOST[:PORT]` or `http://HOST[:PORT]` as the client wants it.
fn normalize(e: &str) -> Result<String, ArbiterError> {
    if e.starts_with("https://") {
        return Err(ArbiterError::BadEndpoint(format!(
            "{e} (TLS to etcd is not supported yet)"
        )));
    }
    let hostport = e.strip_prefix("http://").unwrap_or(e);
    let bad = || ArbiterError::BadEndpoint(e.into());
    if hostport.is_empty() || hostport.contains(['/', '@', ' ']) {
        return Err(bad());
    }
    // An IPv6 address is written in brackets; a port follows them.
    let port = match hostport.strip_prefix('[') {
        Some(v6) => v6.split_once(']').ok_or_else(bad)?.1.strip_prefix(':'),
        None => hostport.split_once(':').map(|(_, p)| p),
    };
    if let Some(p) = port {
        p.parse::<u16>().map_err(|_| bad())?;
    }
    let has_port = port.is_some();
    Ok(if has_port {
        format!("http://{hostport}")
    } else {
        format!("http://{hostport}:{DEFAULT_PORT}")
    })
}

impl Arbiter for Etcd {
    fn describe(&self) -> String {
        format!("etcd at {}", self.endpoints.join(","))
    }

    fn read(&self, service: &str) -> Result<Option<Term>, ArbiterError> {
        let key = crate::key(service)?;
        let value = self.call(|mut c| async move {
            let r = c.get(key, None).await?;
            Ok(r.kvs().first().map(|kv| kv.value().to_vec()))
        })?;
        value.map(|v| Term::decode(service, &v)).transpose()
    }

    fn swap(&self, service: &str, from: Option<&Term>, to: &Term) -> Result<Swapped, ArbiterError> {
        let key = crate::key(service)?;
        let when = match from {
            Some(t) => Compare::value(key.clone(), CompareOp::Equal, t.encode()),
            // No record: it was never created (or was deleted).
            None => Compare::create_revision(key.clone(), CompareOp::Equal, 0),
        };
        let txn = Txn::new()
            .when([when])
            .and_then([TxnOp::put(key.clone(), to.encode(), None)])
            .or_else([TxnOp::get(key, None)]);
        let stood = self.call(|mut c| async move {
            let r = c.txn(txn).await?;
            if r.succeeded() {
                return Ok(None);
            }
            let now = r.op_responses().into_iter().find_map(|op| match op {
                TxnOpResponse::Get(g) => Some(g.kvs().first().map(|kv| kv.value().to_vec())),
                _ => None,
            });
            Ok(Some(now.flatten()))
        })?;
        match stood {
            None => Ok(Swapped::Done),
            Some(now) => Ok(Swapped::Stood(
                now.map(|v| Term::decode(service, &v)).transpose()?,
            )),
        }
    }
}

/// One member of an etcd cluster as rrc runs it (for its lab and tests;
/// operators run their own): its name, the address it serves clients
/// and peers on, and where it keeps its data.
#[derive(Debug, Clone)]
pub struct Member {
    pub name: String,
    pub client: std::net::SocketAddr,
    pub peer: std::net::SocketAddr,
}

/// The command that runs `me` as a member of a new cluster of `all`
/// (the same list on every member), keeping its data in `data_dir`.
/// Election timing is etcd's default: a member lost is replaced in about
/// a second, and a quorum keeps answering meanwhile.
pub fn member_command(
    me: &Member,
    all: &[Member],
    token: &str,
    data_dir: &std::path::Path,
) -> std::process::Command {
    let cluster = all
        .iter()
        .map(|m| format!("{}=http://{}", m.name, m.peer))
        .collect::<Vec<_>>()
        .join(",");
    let mut c = std::process::Command::new("etcd");
    c.arg("--name")
        .arg(&me.name)
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--listen-client-urls")
        .arg(format!("http://{}", me.client))
        .arg("--advertise-client-urls")
        .arg(format!("http://{}", me.client))
        .arg("--listen-peer-urls")
        .arg(format!("http://{}", me.peer))
        .arg("--initial-advertise-peer-urls")
        .arg(format!("http://{}", me.peer))
        .arg("--initial-cluster")
        .arg(cluster)
        .arg("--initial-cluster-token")
        .arg(token)
        .arg("--initial-cluster-state")
        .arg("new")
        .arg("--logger")
        .arg("zap")
        .arg("--log-level")
        .arg("warn");
    c
}

/// The endpoints of `members`, as [`Etcd::new`] takes them.
pub fn endpoints(members: &[Member]) -> String {
    members
        .iter()
        .map(|m| m.client.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_normalized_or_refused() {
        let n = |e| normalize(e).map_err(|e| e.to_string());
        assert_eq!(n("10.0.0.1").unwrap(), "http://10.0.0.1:2379");
        assert_eq!(n("10.0.0.1:2400").unwrap(), "http://10.0.0.1:2400");
        assert_eq!(n("http://h:1").unwrap(), "http://h:1");
        assert_eq!(n("[::1]:5").unwrap(), "http://[::1]:5");
        assert_eq!(n("[::1]").unwrap(), "http://[::1]:2379");
        for bad in ["", "h:x", "h:99999", "https://h", "h/p", "u@h"] {
            assert!(n(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn an_arbiter_that_is_not_there_is_unreachable_in_time() {
        // Nothing listens on port 1 of loopback: refused at once.
        let e = Etcd::new("127.0.0.1:1", Duration::from_millis(500)).unwrap();
        let t0 = std::time::Instant::now();
        assert!(matches!(e.read("s"), Err(ArbiterError::Unreachable(_))));
        assert!(t0.elapsed() < Duration::from_secs(5));
    }
}
