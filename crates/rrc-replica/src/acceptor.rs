//! The backup's door. Every connection to the replication port gets a
//! thread of its own for its handshake (Noise with the shared key, then
//! the primary's hello), each with a deadline, and at most
//! [`MAX_HANDSHAKES`] run at once: peers that say nothing, or stop half
//! way, cost their own thread its deadline and never hold up the primary
//! behind them. Primaries that complete the handshake are handed to the
//! session one at a time.
//!
//! The backup takes over as a single-threaded process (it forks the
//! restored container's supervisor), so [`Acceptor::stop`] ends every
//! thread here at once: the listener and the connections in handshake are
//! shut down, which wakes whatever waits on them.

use std::collections::HashMap;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use rrc_wire::{Identified, Identity, Key, Message, PublicKey, Role, SecureStream, WireError};

/// Handshakes in progress at most; a connection beyond them is closed at
/// once.
pub const MAX_HANDSHAKES: usize = 16;
/// How long a peer may take to say it is a primary once the Noise
/// handshake is done.
const HELLO_LIMIT: Duration = Duration::from_secs(2);

/// Which primaries a backup with a host identity accepts.
#[derive(Debug, Clone)]
pub struct Trust {
    /// This backup's identity.
    pub ours: Arc<Identity>,
    pub primaries: Vec<TrustedPrimary>,
}

/// A primary's public key, and the service it may replicate (any, if
/// `None`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedPrimary {
    pub key: PublicKey,
    pub service: Option<String>,
}

impl std::str::FromStr for TrustedPrimary {
    type Err = String;
    /// `KEY` or `SERVICE=KEY`.
    fn from_str(s: &str) -> Result<TrustedPrimary, String> {
        let (service, key) = match s.split_once('=') {
            Some((svc, key)) if !svc.is_empty() => (Some(svc.to_string()), key),
            Some(_) => return Err(format!("{s:?}: the service before '=' is empty")),
            None => (None, s),
        };
        let key = key
            .parse()
            .map_err(|e| format!("{s:?}: not a public key (64 hex characters): {e}"))?;
        Ok(TrustedPrimary { key, service })
    }
}

impl Trust {
    fn security(&self) -> rrc_wire::SecureConfig {
        let mut peers: Vec<PublicKey> = self.primaries.iter().map(|p| p.key).collect();
        peers.sort();
        peers.dedup();
        rrc_wire::SecureConfig {
            identity: Some(Identified {
                ours: self.ours.clone(),
                peers,
            }),
            ..crate::link_security()
        }
    }

    /// Whether the primary proven to be `key` may replicate `service`.
    pub fn allows(&self, key: PublicKey, service: &str) -> bool {
        self.primaries
            .iter()
            .any(|p| p.key == key && p.service.as_deref().is_none_or(|s| s == service))
    }
}

/// A primary that holds the key and said hello.
pub struct Greeted {
    pub stream: SecureStream,
    /// The name it gave.
    pub node: String,
    pub peer: SocketAddr,
    /// The service it replicates.
    pub service: String,
    /// The arbiter's term it serves under, if it has an arbiter.
    pub term: Option<u64>,
    /// Its host identity, proven by the handshake (with identities).
    pub identity: Option<PublicKey>,
}

/// What handshake threads share with the acceptor.
struct Shared {
    stop: AtomicBool,
    /// Connections in handshake, by number: shut down to stop.
    pending: Mutex<HashMap<u64, TcpStream>>,
    next: AtomicU64,
}

pub struct Acceptor {
    shared: Arc<Shared>,
    /// A handle on the listening socket, to shut it down.
    listener: TcpListener,
    thread: Option<JoinHandle<()>>,
    greeted: Receiver<Greeted>,
}

impl Acceptor {
    /// Starts accepting on `listener`; this backup answers hellos as
    /// `node`.
    /// With `trust`, only the primaries it lists get in, each for its
    /// services.
    pub fn start(
        listener: TcpListener,
        key: Arc<Key>,
        node: String,
        trust: Option<Trust>,
    ) -> std::io::Result<Acceptor> {
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            pending: Mutex::new(HashMap::new()),
            next: AtomicU64::new(0),
        });
        let handle = listener.try_clone()?;
        let (tx, rx) = std::sync::mpsc::sync_channel(0);
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("rrc-accept".into())
            .spawn(move || accept_loop(&listener, &key, &node, trust.as_ref(), &s, &tx))?;
        Ok(Acceptor {
            shared,
            listener: handle,
            thread: Some(thread),
            greeted: rx,
        })
    }

    /// The next primary that completed its handshake (waits for one);
    /// `None` once the acceptor has stopped.
    pub fn next(&self) -> Option<Greeted> {
        self.greeted.recv().ok()
    }

    /// The next primary that completes its handshake within `d`, if any.
    pub fn next_within(&self, d: Duration) -> Option<Greeted> {
        self.greeted.recv_timeout(d).ok()
    }

    /// Ends every thread of the acceptor, at once.
    pub fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        // Shutting a listening socket down wakes the accept() waiting on it.
        let _ = nix::sys::socket::shutdown(
            std::os::fd::AsRawFd::as_raw_fd(&self.listener),
            nix::sys::socket::Shutdown::Both,
        );
        for s in crate::lock(&self.shared.pending).values() {
            let _ = s.shutdown(Shutdown::Both);
        }
        // A handshake thread waiting to hand its primary over sees the
        // channel closed.
        while self.greeted.try_recv().is_ok() {}
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept_loop(
    listener: &TcpListener,
    key: &Arc<Key>,
    node: &str,
    trust: Option<&Trust>,
    shared: &Arc<Shared>,
    greeted: &SyncSender<Greeted>,
) {
    let mut threads: Vec<JoinHandle<()>> = Vec::new();
    let mut turned_away = 0u64;
    while !shared.stop.load(Ordering::Acquire) {
        let (tcp, peer) = match listener.accept() {
            Ok(c) => c,
            Err(e) => {
                if !shared.stop.load(Ordering::Acquire) {
                    tracing::warn!(error = %e, "accepting a connection");
                    std::thread::sleep(Duration::from_millis(10));
                }
                continue;
            }
        };
        threads.retain(|t| !t.is_finished());
        if threads.len() >= MAX_HANDSHAKES {
            turned_away += 1;
            if turned_away.is_power_of_two() {
                tracing::warn!(
                    %peer,
                    turned_away,
                    "too many handshakes at once: connection closed"
                );
            }
            continue;
        }
        let Ok(clone) = tcp.try_clone() else {
            continue;
        };
        let id = shared.next.fetch_add(1, Ordering::Relaxed);
        {
            let mut pending = crate::lock(&shared.pending);
            // Stopped since the accept: `stop` has shut the others down
            // already (it sets the flag before it takes this lock).
            if shared.stop.load(Ordering::Acquire) {
                let _ = clone.shutdown(Shutdown::Both);
            }
            pending.insert(id, clone);
        }
        let (key, node, trust, s, tx) = (
            key.clone(),
            node.to_string(),
            trust.cloned(),
            shared.clone(),
            greeted.clone(),
        );
        let spawned = std::thread::Builder::new()
            .name("rrc-handshake".into())
            .spawn(move || {
                let r = handshake(tcp, peer, &key, &node, trust.as_ref());
                crate::lock(&s.pending).remove(&id);
                if let Some(g) = r {
                    hand_over(g, &s, &tx);
                }
            });
        match spawned {
            Ok(t) => threads.push(t),
            Err(e) => {
                crate::lock(&shared.pending).remove(&id);
                tracing::warn!(error = %e, "cannot start a handshake thread");
            }
        }
    }
    for t in threads {
        let _ = t.join();
    }
}

/// Waits until the session takes `g`, or the acceptor stops.
fn hand_over(mut g: Greeted, shared: &Shared, tx: &SyncSender<Greeted>) {
    loop {
        match tx.try_send(g) {
            Ok(()) => return,
            Err(TrySendError::Disconnected(_)) => return,
            Err(TrySendError::Full(back)) => {
                if shared.stop.load(Ordering::Acquire) {
                    return;
                }
                g = back;
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

/// Noise with the key, then the primary's hello; `None` (and why, said)
/// for a peer that is not a primary holding the key.
fn handshake(
    tcp: TcpStream,
    peer: SocketAddr,
    key: &Key,
    node: &str,
    trust: Option<&Trust>,
) -> Option<Greeted> {
    let _ = tcp.set_nodelay(true);
    let security = trust.map_or_else(crate::link_security, Trust::security);
    let mut s = match SecureStream::server_with(tcp, key, &security) {
        Ok(s) => s,
        Err(WireError::Authentication(why)) => {
            tracing::warn!(%peer, %why, "refused a peer");
            eprintln!("rrc backup: refused {peer}: {why}");
            return None;
        }
        Err(e) => {
            tracing::warn!(%peer, error = %e, "handshake failed");
            return None;
        }
    };
    match hello(&mut s, node, trust) {
        Ok((node, service, term)) => Some(Greeted {
            identity: s.peer_identity(),
            stream: s,
            node,
            peer,
            service,
            term,
        }),
        Err(e) => {
            tracing::warn!(%peer, error = %e, "not a primary");
            None
        }
    }
}

/// The primary's hello, answered: its node, service and term.
/// With `trust`, a primary naming a service its identity is not listed
/// for is refused: the connection closes without a welcome.
fn hello(
    s: &mut SecureStream,
    node: &str,
    trust: Option<&Trust>,
) -> Result<(String, String, Option<u64>), String> {
    s.set_read_timeout(Some(HELLO_LIMIT))
        .map_err(|e| e.to_string())?;
    let theirs = match s.recv().map_err(|e| e.to_string())? {
        Message::Hello {
            role: Role::Primary,
            node,
            service,
            term,
        } => (node, service, term),
        other => return Err(format!("expected a primary's hello, got {other:?}")),
    };
    if let (Some(trust), Some(id)) = (trust, s.peer_identity())
        && !trust.allows(id, &theirs.1)
    {
        let why = format!(
            "the primary {} ({id}) may not replicate service {:?}",
            theirs.0, theirs.1
        );
        eprintln!("rrc backup: refused: {why}");
        return Err(why);
    }
    s.send(&Message::Welcome { node: node.into() })
        .map_err(|e| e.to_string())?;
    Ok(theirs)
}
