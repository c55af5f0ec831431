//! The backup: accepts a primary on the replication link (only one that
//! holds the shared key), stages each checkpoint it sends, commits it into
//! its image once complete, and acknowledges. When the primary falls silent
//! (no message for the timeout) or its connection breaks, the backup fences
//! it (if told how) and takes over from the last committed checkpoint.

use std::fs;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rrc_ckpt::image::ImageDir;
use rrc_wire::{Key, Message, Role, SecureStream, Stage, WireError};

use crate::Error;

pub struct BackupOptions {
    pub listen: SocketAddr,
    pub key: Arc<Key>,
    /// Holds `image/` (the last committed checkpoint) and the staging area.
    pub dir: PathBuf,
    /// Silence after which the primary counts as failed.
    pub timeout: Duration,
    /// A command that makes sure the primary is down before taking over
    /// (run with `sh -c`; it must succeed).
    pub fence: Option<String>,
    pub node: String,
}

/// How a takeover went.
#[derive(Debug, Clone)]
pub struct Takeover {
    /// The checkpoint restored.
    pub epoch: u64,
    /// From the primary's last message to the decision.
    pub silent_for: Duration,
    pub fence: Duration,
    pub restore: Duration,
    /// What the restore said.
    pub restored: String,
}

/// Why a session with a primary ended.
enum SessionEnd {
    /// It said goodbye: no failover.
    Clean,
    /// It fell silent or its connection broke.
    Failed { reason: String, last_heard: Instant },
}

struct Committed {
    series: String,
    epoch: u64,
}

/// Serves primaries one after the other until one fails with a committed
/// checkpoint here; then fences it and takes over with `restore` (given
/// the image directory), and returns.
pub fn serve(
    opts: &BackupOptions,
    mut restore: impl FnMut(&Path) -> Result<String, String>,
) -> Result<Takeover, Error> {
    fs::create_dir_all(&opts.dir).map_err(Error::io(&opts.dir))?;
    let image = opts.dir.join("image");
    // A checkpoint committed by an earlier run would be of another primary.
    let _ = fs::remove_dir_all(&image);
    let listener = TcpListener::bind(opts.listen).map_err(|e| Error::Io {
        what: format!("listen on {}", opts.listen),
        source: e,
    })?;
    tracing::info!(listen = %opts.listen, "backup waiting for a primary");
    eprintln!("rrc backup: waiting for a primary on {}", opts.listen);
    let mut committed: Option<Committed> = None;
    loop {
        let (tcp, peer) = listener.accept().map_err(|e| Error::Io {
            what: "accept a primary".into(),
            source: e,
        })?;
        let _ = tcp.set_nodelay(true);
        let sc = crate::link_security();
        let mut s = match SecureStream::server_with(tcp, &opts.key, &sc) {
            Ok(s) => s,
            Err(WireError::Authentication(_)) => {
                tracing::warn!(%peer, "refused a peer without the key");
                eprintln!("rrc backup: refused {peer}: it does not hold the key");
                continue;
            }
            Err(e) => {
                tracing::warn!(%peer, error = %e, "handshake failed");
                continue;
            }
        };
        let node = match hello(&mut s, opts) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "not a primary");
                continue;
            }
        };
        eprintln!("rrc backup: primary {node} ({peer}) connected");
        match session(&mut s, opts, &image, &mut committed) {
            SessionEnd::Clean => {
                eprintln!("rrc backup: primary {node} stopped cleanly; waiting for a primary");
                committed = None;
                let _ = fs::remove_dir_all(&image);
            }
            SessionEnd::Failed { reason, last_heard } => {
                let Some(c) = &committed else {
                    eprintln!(
                        "rrc backup: primary {node} failed ({reason}) before a checkpoint was committed; waiting for a primary"
                    );
                    continue;
                };
                let silent_for = last_heard.elapsed();
                eprintln!(
                    "rrc backup: primary {node} failed ({reason}); taking over from checkpoint {} of series {}",
                    c.epoch, c.series
                );
                let t0 = Instant::now();
                if let Some(cmd) = &opts.fence {
                    fence(cmd)?;
                }
                let fenced = t0.elapsed();
                let t1 = Instant::now();
                let restored = restore(&image).map_err(Error::Takeover)?;
                return Ok(Takeover {
                    epoch: c.epoch,
                    silent_for,
                    fence: fenced,
                    restore: t1.elapsed(),
                    restored,
                });
            }
        }
    }
}

fn fence(cmd: &str) -> Result<(), Error> {
    let out = Command::new("sh")
        .args(["-c", cmd])
        .output()
        .map_err(|e| Error::Io {
            what: format!("run the fence command {cmd:?}"),
            source: e,
        })?;
    if !out.status.success() {
        return Err(Error::Fence(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

fn hello(s: &mut SecureStream, opts: &BackupOptions) -> Result<String, String> {
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    let node = match s.recv().map_err(|e| e.to_string())? {
        Message::Hello {
            role: Role::Primary,
            node,
            ..
        } => node,
        other => return Err(format!("expected a primary's hello, got {other:?}")),
    };
    s.send(&Message::Welcome {
        node: opts.node.clone(),
    })
    .map_err(|e| e.to_string())?;
    Ok(node)
}

/// Receives checkpoints until the primary leaves or fails.
fn session(
    s: &mut SecureStream,
    opts: &BackupOptions,
    image: &Path,
    committed: &mut Option<Committed>,
) -> SessionEnd {
    let incoming = opts.dir.join("incoming");
    let _ = fs::remove_dir_all(&incoming);
    if let Err(e) = fs::create_dir_all(&incoming) {
        return SessionEnd::Failed {
            reason: format!("cannot stage: {e}"),
            last_heard: Instant::now(),
        };
    }
    let mut last_heard = Instant::now();
    let mut stage: Option<Stage> = None;
    let mut progress = Progress::default();
    let failed = |reason: String, last_heard: Instant| SessionEnd::Failed { reason, last_heard };
    if let Err(e) = s.set_read_timeout(Some(opts.timeout)) {
        return failed(e.to_string(), last_heard);
    }
    loop {
        let msg = match s.recv() {
            Ok(m) => m,
            Err(WireError::Timeout) => {
                return failed(
                    format!("silent for {} ms", opts.timeout.as_millis()),
                    last_heard,
                );
            }
            Err(e) => return failed(format!("link broken: {e}"), last_heard),
        };
        last_heard = Instant::now();
        let reply = match msg {
            Message::Heartbeat { sent_unix_ns } => Some(Message::HeartbeatAck {
                echo_unix_ns: sent_unix_ns,
            }),
            Message::Bye { .. } => return SessionEnd::Clean,
            m @ Message::DeltaBegin { .. } => {
                // A delta left half-way (it cannot be: one connection, in
                // order) is dropped with its staging.
                let mut st = Stage::new(&incoming);
                match st.receive(&m) {
                    Ok(()) => {
                        stage = Some(st);
                        None
                    }
                    Err(e) => Some(Message::NeedFull {
                        reason: e.to_string(),
                    }),
                }
            }
            m @ Message::FileChunk { .. } => match stage.as_mut().map(|st| st.receive(&m)) {
                Some(Ok(())) => None,
                Some(Err(e)) => {
                    return failed(format!("bad checkpoint data: {e}"), last_heard);
                }
                None => return failed("a file chunk outside a checkpoint".into(), last_heard),
            },
            m @ Message::DeltaEnd { .. } => {
                let Some(mut st) = stage.take() else {
                    return failed("a checkpoint end without its beginning".into(), last_heard);
                };
                let series = st.series().unwrap_or_default().to_string();
                if let Err(e) = st.receive(&m) {
                    return failed(format!("bad checkpoint: {e}"), last_heard);
                }
                let t0 = Instant::now();
                let reply = match st.finish() {
                    Ok(layer) => match commit(&layer, image, committed.as_ref()) {
                        Ok(epoch) => {
                            *committed = Some(Committed { series, epoch });
                            progress.add(epoch, t0.elapsed());
                            Message::Committed { epoch }
                        }
                        Err(e) => {
                            eprintln!("rrc backup: a checkpoint was refused: {e}");
                            Message::NeedFull {
                                reason: e.to_string(),
                            }
                        }
                    },
                    Err(e) => Message::NeedFull {
                        reason: e.to_string(),
                    },
                };
                Some(reply)
            }
            other => return failed(format!("unexpected {other:?}"), last_heard),
        };
        if let Some(r) = reply
            && let Err(e) = s.send(&r)
        {
            return failed(format!("link broken: {e}"), last_heard);
        }
    }
}

/// Makes the staged checkpoint at `layer` the image: the first of a series
/// replaces it (once checked), a delta is applied onto it.
fn commit(layer: &Path, image: &Path, previous: Option<&Committed>) -> Result<u64, Error> {
    let l = ImageDir::new(layer);
    let m = l.read_manifest()?;
    let lineage = m
        .lineage
        .clone()
        .ok_or_else(|| Error::Protocol("a checkpoint without lineage".into()))?;
    if m.parent.is_none() {
        rrc_ckpt::store::verify(&l, &m)?;
        let old = image.with_extension("old");
        let _ = fs::remove_dir_all(&old);
        if image.exists() {
            fs::rename(image, &old).map_err(Error::io(image))?;
        }
        fs::rename(layer, image).map_err(Error::io(image))?;
        let _ = fs::remove_dir_all(&old);
        Ok(lineage.epoch)
    } else {
        if previous.is_none() {
            return Err(Error::Protocol(
                "a delta with no full checkpoint before it".into(),
            ));
        }
        let r = rrc_ckpt::store::apply(image, layer).map(|_| lineage.epoch);
        let _ = fs::remove_dir_all(layer);
        r.map_err(Error::from)
    }
}

/// Progress lines, one every few seconds.
#[derive(Default)]
struct Progress {
    since: Option<Instant>,
    count: u64,
    apply: Duration,
}

impl Progress {
    fn add(&mut self, epoch: u64, took: Duration) {
        self.count += 1;
        self.apply += took;
        let since = *self.since.get_or_insert_with(Instant::now);
        if epoch == 0 || since.elapsed() >= Duration::from_secs(5) {
            eprintln!(
                "rrc backup: committed checkpoint {epoch} ({} since the last report, {:.1} ms each to commit)",
                self.count,
                self.apply.as_secs_f64() * 1e3 / self.count as f64
            );
            *self = Progress {
                since: Some(Instant::now()),
                ..Default::default()
            };
        }
    }
}
