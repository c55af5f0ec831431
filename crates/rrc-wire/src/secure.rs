//! The authenticated, encrypted replication channel.
//!
//! Both hosts hold the same 32-byte pre-shared key. The channel runs the
//! Noise protocol `Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s`: fresh ephemeral
//! keys on both sides for forward secrecy, with the PSK mixed in before the
//! first message, so a peer without the key cannot produce even the first
//! handshake message and cannot read or forge anything afterwards. Without
//! host identities the key file is the whole trust configuration.
//!
//! With host identities ([`Identity`], [`Identified`]) the handshake is
//! `Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s` instead: each host proves a
//! static key of its own, the responder accepts only the initiators it
//! lists, and the initiator only the responder it was given; the shared key
//! is still required. One key holder can then no longer act as another
//! host.
//!
//! Wire format:
//!
//! * Handshake: two messages, initiator (primary) first, each preceded by its
//!   length as u16 LE. A responder that cannot authenticate the first message
//!   answers with a zero length, so the initiator can report a key mismatch
//!   instead of a bare disconnect.
//! * The first message carries, encrypted and authenticated under the key,
//!   the initiator's clock (nanoseconds since the Unix epoch, u64 LE). A
//!   recorded first message would otherwise make the responder answer and
//!   wait again: the responder accepts a first message only within
//!   [`CLOCK_WINDOW`] of its own clock, and only once (it keeps the times
//!   of those it accepted within the window, per key). A message recorded
//!   less than the window before a responder restarted could be played to
//!   it once; WireGuard's timestamps have the same limit.
//! * Transport: every frame from [`crate::frame`] is cut into pieces of at
//!   most 65519 bytes; each piece is one Noise transport message (piece plus
//!   16-byte tag) preceded by its ciphertext length as u16 LE. The receiver
//!   decrypts and feeds the plaintext to a frame [`Decoder`], so framing,
//!   sequence and CRC checks apply on the inside of the encryption exactly as
//!   on a plain stream, and reassembly is the decoder's ordinary job.
//!
//! Each direction has its own nonce, counted from 0 by the sender and by the
//! receiver, never sent. That is what lets a connection be split into a
//! [`SecureReader`] and a [`SecureWriter`] working in two threads: they share
//! only the socket and the keys. A dropped, repeated or reordered transport
//! message is decrypted with the wrong nonce and fails authentication.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::error::{Result, WireError};
use crate::frame::{DEFAULT_MAX_PAYLOAD, Decoder, Encoder};
use crate::message::Message;

pub const NOISE_PATTERN: &str = "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s";
/// With host identities: the initiator knows the responder's static key
/// and sends its own, encrypted, in the first message (as WireGuard does);
/// the shared key is mixed in at the end of the second.
pub const NOISE_PATTERN_IDENTIFIED: &str = "Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s";

/// Bound into the handshake hash: peers speaking another revision of the
/// handshake or of the transport below the frames fail the handshake instead
/// of misreading each other. Frame protocol versions are not named here:
/// every frame carries its version, and a mismatch there gets an error that
/// says so, where a handshake failure would look like a wrong key.
const PROLOGUE: &[u8] = b"rrc-wire/2";

/// How far the initiator's clock, in its first message, may be from the
/// responder's.
pub const CLOCK_WINDOW: Duration = Duration::from_secs(120);

/// Per key (a hash of it: keys are not kept), the times of the first
/// messages accepted within the clock window: a message seen once is not
/// accepted again, whatever order messages come in.
static SEEN_INITIATIONS: std::sync::Mutex<Vec<(u64, std::collections::BTreeSet<u64>)>> =
    std::sync::Mutex::new(Vec::new());

/// Times kept per key at most: beyond, a message older than every time
/// kept is refused (it might be one forgotten).
const MAX_SEEN: usize = 4096;

fn unix_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Accepts a first message sent at `sent` (the initiator's clock) for
/// `key`, or says why not.
fn fresh_initiation(key: &Key, sent: u64) -> Result<()> {
    let now = unix_nanos();
    let window = CLOCK_WINDOW.as_nanos() as u64;
    if sent.abs_diff(now) > window {
        return Err(WireError::Authentication(format!(
            "the peer's first handshake message is {} s from this host's clock (at most {} s): a recorded message, or clocks that are not in step",
            sent.abs_diff(now) / 1_000_000_000,
            CLOCK_WINDOW.as_secs()
        )));
    }
    let id = {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        key.0.hash(&mut h);
        h.finish()
    };
    let mut all = SEEN_INITIATIONS.lock().unwrap_or_else(|p| p.into_inner());
    let seen = match all.iter().position(|(k, _)| *k == id) {
        Some(i) => &mut all[i].1,
        None => {
            all.push((id, std::collections::BTreeSet::new()));
            &mut all.last_mut().expect("just pushed").1
        }
    };
    // What lies outside the window is refused by the clock check.
    let oldest = now.saturating_sub(window);
    *seen = seen.split_off(&oldest);
    let forgotten = seen.len() >= MAX_SEEN && seen.first().is_some_and(|f| sent <= *f);
    if forgotten || !seen.insert(sent) {
        return Err(WireError::Authentication(
            "the peer's first handshake message was seen before: a replayed message".into(),
        ));
    }
    if seen.len() > MAX_SEEN {
        seen.pop_first();
    }
    Ok(())
}

pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

pub const KEY_LEN: usize = 32;

const NOISE_MAX_MSG: usize = 65535;
const NOISE_TAG_LEN: usize = 16;
const MAX_PIECE: usize = NOISE_MAX_MSG - NOISE_TAG_LEN;

/// NNpsk0 handshake messages are 56 and 48 bytes, IKpsk2's 104 and 48;
/// anything much larger is not an
/// rrc peer, and refusing it early stops a stray client (a port scanner, an
/// HTTP probe) from making us wait for 64 KiB that will never come.
const MAX_HANDSHAKE_MSG: usize = 1024;

/// Longest key file we are willing to read; a key is 64 characters.
const MAX_KEY_FILE: u64 = 4096;

/// The pre-shared key of a primary/backup pair.
#[derive(Clone, PartialEq, Eq)]
pub struct Key([u8; KEY_LEN]);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Keys end up in Debug output of configs and errors; never the bytes.
        f.write_str("Key(<redacted>)")
    }
}

impl Drop for Key {
    fn drop(&mut self) {
        wipe(&mut self.0);
    }
}

/// Best-effort erasure of key material before its memory is freed.
fn wipe(buf: &mut [u8]) {
    buf.fill(0);
    // Discourages the compiler from treating the wipe as a dead store.
    std::hint::black_box(&buf);
}

impl Key {
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Key {
        Key(bytes)
    }

    /// Reads a key file: 64 hex characters, optionally surrounded by
    /// whitespace. The file must belong to the user loading it and not be
    /// accessible to group or others, because anyone who can read it can
    /// feed the backup an image to run as root.
    pub fn load(path: &Path) -> Result<Key> {
        read_secret(path).map(Key)
    }

    /// Creates a new key file with mode 0600 holding a random key, and
    /// returns the key. An existing file is never overwritten: replacing the
    /// key on one host only would silently cut replication.
    pub fn generate(path: &Path) -> Result<Key> {
        let mut bytes = random_secret()?;
        let key = Key(bytes);
        bytes.fill(0);
        write_secret(path, &key.0)?;
        Ok(key)
    }
}

fn random_secret() -> Result<[u8; KEY_LEN]> {
    let mut bytes = [0u8; KEY_LEN];
    File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes)
}

/// A secret file's 32 bytes (64 hex characters, whitespace around them
/// allowed), after checking that it is a regular file of this user that
/// no one else may read.
fn read_secret(path: &Path) -> Result<[u8; KEY_LEN]> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            return Err(WireError::KeyMissing {
                path: path.to_path_buf(),
            });
        }
        Err(e) => return Err(e.into()),
    };
    let format_err = |reason: String| WireError::KeyFormat {
        path: path.to_path_buf(),
        reason,
    };
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(format_err("not a regular file".into()));
    }
    let user = rustix::process::geteuid().as_raw();
    if std::os::unix::fs::MetadataExt::uid(&meta) != user {
        return Err(WireError::KeyOwner {
            path: path.to_path_buf(),
            owner: std::os::unix::fs::MetadataExt::uid(&meta),
            user,
        });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(WireError::KeyPermissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    let mut raw = Vec::new();
    file.take(MAX_KEY_FILE + 1).read_to_end(&mut raw)?;
    if raw.len() as u64 > MAX_KEY_FILE {
        return Err(format_err(format!(
            "file is larger than {MAX_KEY_FILE} bytes; expected 64 hex characters"
        )));
    }
    let parsed = parse_hex32(raw.trim_ascii()).map_err(format_err);
    wipe(&mut raw);
    parsed
}

/// 64 hex characters as 32 bytes, or what is wrong with them.
fn parse_hex32(text: &[u8]) -> std::result::Result<[u8; KEY_LEN], String> {
    if text.len() != 2 * KEY_LEN {
        return Err(format!(
            "expected {} hex characters, found {} characters",
            2 * KEY_LEN,
            text.len()
        ));
    }
    let mut out = [0u8; KEY_LEN];
    for (i, pair) in text.chunks_exact(2).enumerate() {
        match (hex_value(pair[0]), hex_value(pair[1])) {
            (Some(hi), Some(lo)) => out[i] = hi << 4 | lo,
            (hi, _) => {
                wipe(&mut out);
                let at = if hi.is_none() { 2 * i } else { 2 * i + 1 };
                return Err(format!("character {} is not a hex digit", at + 1));
            }
        }
    }
    Ok(out)
}

fn to_hex(bytes: &[u8]) -> String {
    let mut text = String::with_capacity(2 * bytes.len());
    for b in bytes {
        text.push(char::from(HEX[usize::from(b >> 4)]));
        text.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    text
}

/// Creates `path` (mode 0600, never over an existing file) holding
/// `secret` in hex.
fn write_secret(path: &Path, secret: &[u8; KEY_LEN]) -> Result<()> {
    let mut file = match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {
            return Err(WireError::KeyExists {
                path: path.to_path_buf(),
            });
        }
        Err(e) => return Err(e.into()),
    };
    let mut text = to_hex(secret);
    text.push('\n');
    let written = file
        .write_all(text.as_bytes())
        .and_then(|()| file.sync_all());
    // The hex text is the secret too; wipe it like Key's Drop does.
    wipe(&mut text.into_bytes());
    if let Err(e) = written {
        // A truncated file would only produce confusing format errors
        // later; better that it does not exist.
        let _ = std::fs::remove_file(path);
        return Err(e.into());
    }
    Ok(())
}

/// A host's public identity: the X25519 public key of its [`Identity`],
/// written as 64 hex characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; KEY_LEN]);

impl std::fmt::Display for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&to_hex(&self.0))
    }
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl std::str::FromStr for PublicKey {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<PublicKey, String> {
        parse_hex32(s.trim().as_bytes()).map(PublicKey)
    }
}

/// A host's own identity: an X25519 key pair whose secret half lives in a
/// file like the shared key's (`rrc keygen --identity`). With identities,
/// holding the shared key is not enough to replicate: the backup accepts
/// only primaries whose public key it lists, and the primary talks only to
/// the backup whose public key it was given.
pub struct Identity {
    secret: [u8; KEY_LEN],
    public: PublicKey,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identity({})", self.public)
    }
}

impl Drop for Identity {
    fn drop(&mut self) {
        wipe(&mut self.secret);
    }
}

impl Identity {
    fn from_secret(secret: [u8; KEY_LEN]) -> Identity {
        let public =
            curve25519_dalek::montgomery::MontgomeryPoint::mul_base_clamped(secret).to_bytes();
        Identity {
            secret,
            public: PublicKey(public),
        }
    }

    /// Reads an identity file, checked as a key file is.
    pub fn load(path: &Path) -> Result<Identity> {
        read_secret(path).map(Identity::from_secret)
    }

    /// Creates a new identity file (mode 0600, never over an existing one).
    pub fn generate(path: &Path) -> Result<Identity> {
        let id = Identity::from_secret(random_secret()?);
        write_secret(path, &id.secret)?;
        Ok(id)
    }

    pub fn public(&self) -> PublicKey {
        self.public
    }
}

/// Host identities on a connection: ours, and the peers we accept (for
/// the initiator, exactly the one it connects to).
#[derive(Debug, Clone)]
pub struct Identified {
    pub ours: Arc<Identity>,
    pub peers: Vec<PublicKey>,
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Tunables of a [`SecureStream`].
#[derive(Debug, Clone)]
pub struct SecureConfig {
    /// Longest the whole handshake may take, counted from its start. A peer
    /// that dribbles bytes cannot stretch it.
    pub handshake_timeout: Duration,
    /// Largest frame payload sent or accepted.
    pub max_payload: u32,
    /// Host identities: the handshake is then [`NOISE_PATTERN_IDENTIFIED`],
    /// which proves each side's identity as well as the shared key.
    pub identity: Option<Identified>,
}

impl Default for SecureConfig {
    fn default() -> Self {
        SecureConfig {
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_payload: DEFAULT_MAX_PAYLOAD,
            identity: None,
        }
    }
}

/// One end of an established replication connection.
///
/// Any failure other than a read timeout leaves the stream unusable: after a
/// decryption or framing error the two ends no longer agree on nonces or
/// sequence numbers, and there is no safe way to resynchronise. A write that
/// times out is a failure too: part of a frame may have left, and the peer is
/// not reading.
///
/// One thread at a time can use a `SecureStream`, so while it sends a large
/// checkpoint nothing can be received, and the other way round. For both at
/// once, [`SecureStream::split`] it into a [`SecureReader`] and a
/// [`SecureWriter`].
pub struct SecureStream {
    reader: SecureReader,
    writer: SecureWriter,
}

/// The receiving half of a connection, from [`SecureStream::split`].
///
/// It has its own frame sequence counter and Noise nonce, so it can run in
/// one thread while the [`SecureWriter`] runs in another. A read timeout
/// leaves it usable; any other error ends the whole connection. Once the
/// writer has failed, every `recv` fails with
/// [`WireError::OtherHalfFailed`], at once even if it was blocked waiting for
/// the peer: a reader that went on hearing from a peer we can no longer talk
/// to would only hide the failure.
pub struct SecureReader {
    shared: Arc<Shared>,
    decoder: Decoder,
    /// Nonce of the next incoming Noise message. Counted here rather than
    /// sent: a dropped, repeated or reordered message is then decrypted with
    /// the wrong nonce and fails authentication.
    nonce: u64,
    /// Current incoming Noise message: length prefix then ciphertext. Kept
    /// across calls so a read timeout in the middle of a message loses
    /// nothing.
    rx: Vec<u8>,
    rx_have: usize,
    plain: Vec<u8>,
    failed: bool,
}

/// The sending half of a connection, from [`SecureStream::split`].
///
/// It has its own frame sequence counter and Noise nonce, so it can send a
/// checkpoint of many megabytes while the [`SecureReader`] receives in
/// another thread. Any error while sending, a write timeout included, ends
/// the whole connection: part of a frame may have left, and a peer that does
/// not take our bytes within the timeout is hung. Once the reader has failed
/// (tampering, a bad frame, the peer gone), every `send` fails with
/// [`WireError::OtherHalfFailed`], at once even if it was blocked on a full
/// socket buffer.
pub struct SecureWriter {
    shared: Arc<Shared>,
    encoder: Encoder,
    /// Nonce of the next outgoing Noise message, counted exactly as the
    /// peer's reader counts it.
    nonce: u64,
    failed: bool,
}

/// What the two halves of a connection share. The Noise transport is the
/// stateless kind, which keeps no nonces: each half keeps its own, so
/// neither needs a lock the other could hold for the length of a checkpoint.
struct Shared {
    tcp: TcpStream,
    noise: snow::StatelessTransportState,
    /// The first failure on either half. Set before the socket is shut down,
    /// so the other half, woken by the shutdown, finds out why.
    failure: OnceLock<Failure>,
    /// The peer's identity, proven by the handshake, when identities are
    /// in use.
    peer_identity: Option<PublicKey>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Half {
    Reader,
    Writer,
}

impl Half {
    fn name(self) -> &'static str {
        match self {
            Half::Reader => "receiving",
            Half::Writer => "sending",
        }
    }
}

#[derive(Debug)]
struct Failure {
    half: Half,
    reason: String,
}

impl Shared {
    /// The error for `half` if the other half has already failed.
    fn other_failed(&self, half: Half) -> Option<WireError> {
        let f = self.failure.get()?;
        (f.half != half).then(|| WireError::OtherHalfFailed {
            half: f.half.name(),
            reason: f.reason.clone(),
        })
    }

    /// Whether `half` (which has `failed` itself, or not) can still be
    /// used: its own failure makes it spent, the other half's ends it too.
    fn usable(&self, half: Half, failed: bool) -> Result<()> {
        if failed {
            return Err(WireError::Poisoned);
        }
        match self.other_failed(half) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Ends the connection after `half` met `e`, and returns the error to
    /// report. If the other half failed first, this error is most likely its
    /// consequence (the shutdown below woke us), so the other half's failure
    /// is reported instead.
    fn fail(&self, half: Half, e: WireError) -> WireError {
        if let Some(other) = self.other_failed(half) {
            return other;
        }
        let _ = self.failure.set(Failure {
            half,
            reason: e.to_string(),
        });
        // Wakes the other half if it is blocked in the kernel: a read
        // returns end of file, a write fails. Errors only mean the socket is
        // already dead, which is the point.
        let _ = self.tcp.shutdown(Shutdown::Both);
        e
    }
}

impl std::fmt::Debug for SecureStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecureStream")
            .field("peer", &self.reader.shared.tcp.peer_addr().ok())
            .field("next_send_seq", &self.writer.encoder.next_sequence())
            .field("next_recv_seq", &self.reader.decoder.expected_sequence())
            .field("usable", &self.is_usable())
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for SecureReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecureReader")
            .field("peer", &self.shared.tcp.peer_addr().ok())
            .field("next_recv_seq", &self.decoder.expected_sequence())
            .field("usable", &self.is_usable())
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for SecureWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecureWriter")
            .field("peer", &self.shared.tcp.peer_addr().ok())
            .field("next_send_seq", &self.encoder.next_sequence())
            .field("usable", &self.is_usable())
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Initiator,
    Responder,
}

impl SecureStream {
    /// Runs the handshake as initiator (the primary's side).
    pub fn client(tcp: TcpStream, key: &Key) -> Result<SecureStream> {
        SecureStream::client_with(tcp, key, &SecureConfig::default())
    }

    /// Runs the handshake as responder (the backup's side).
    pub fn server(tcp: TcpStream, key: &Key) -> Result<SecureStream> {
        SecureStream::server_with(tcp, key, &SecureConfig::default())
    }

    pub fn client_with(tcp: TcpStream, key: &Key, cfg: &SecureConfig) -> Result<SecureStream> {
        SecureStream::establish(tcp, key, cfg, Side::Initiator)
    }

    pub fn server_with(tcp: TcpStream, key: &Key, cfg: &SecureConfig) -> Result<SecureStream> {
        SecureStream::establish(tcp, key, cfg, Side::Responder)
    }

    fn establish(
        mut tcp: TcpStream,
        key: &Key,
        cfg: &SecureConfig,
        side: Side,
    ) -> Result<SecureStream> {
        let saved_read = tcp.read_timeout()?;
        let saved_write = tcp.write_timeout()?;
        tcp.set_write_timeout(Some(cfg.handshake_timeout))?;
        let deadline = Instant::now() + cfg.handshake_timeout;

        let (pattern, psk_at) = match &cfg.identity {
            None => (NOISE_PATTERN, 0),
            Some(_) => (NOISE_PATTERN_IDENTIFIED, 2),
        };
        let params = pattern.parse().map_err(WireError::Noise)?;
        let mut builder = snow::Builder::new(params)
            .psk(psk_at, &key.0)
            .and_then(|b| b.prologue(PROLOGUE))
            .map_err(WireError::Noise)?;
        if let Some(id) = &cfg.identity {
            builder = builder
                .local_private_key(&id.ours.secret)
                .map_err(WireError::Noise)?;
            if side == Side::Initiator {
                let [peer] = id.peers.as_slice() else {
                    return Err(WireError::Handshake(format!(
                        "an initiator needs exactly one peer identity, not {}",
                        id.peers.len()
                    )));
                };
                builder = builder
                    .remote_public_key(&peer.0)
                    .map_err(WireError::Noise)?;
            }
        }
        let mut peer_identity = None;

        let mut out = [0u8; MAX_HANDSHAKE_MSG];
        let mut scratch = [0u8; MAX_HANDSHAKE_MSG];
        let hs = match side {
            Side::Initiator => {
                let mut hs = builder.build_initiator().map_err(WireError::Noise)?;
                let n = hs
                    .write_message(&unix_nanos().to_le_bytes(), &mut out)
                    .map_err(WireError::Noise)?;
                write_handshake(&mut tcp, &out[..n])?;
                let reply = read_handshake(&mut tcp, deadline)?;
                if reply.is_empty() {
                    return Err(WireError::Authentication(
                        if cfg.identity.is_some() {
                            "the peer rejected our handshake: it holds a different pre-shared key, does not accept this host's identity, or is not the host whose identity we were given"
                        } else {
                            "the peer rejected our handshake: it holds a different pre-shared key (or expects host identities)"
                        }
                        .into(),
                    ));
                }
                hs.read_message(&reply, &mut scratch)
                    .map_err(handshake_error)?;
                peer_identity = cfg.identity.as_ref().map(|id| id.peers[0]);
                hs
            }
            Side::Responder => {
                let mut hs = builder.build_responder().map_err(WireError::Noise)?;
                let first = read_handshake(&mut tcp, deadline)?;
                let sent = match hs.read_message(&first, &mut scratch) {
                    Ok(8) => u64::from_le_bytes(scratch[..8].try_into().expect("8 bytes")),
                    Ok(n) => {
                        return Err(WireError::Handshake(format!(
                            "the first handshake message carries {n} bytes, not the 8 of a time"
                        )));
                    }
                    Err(e) => {
                        let e = handshake_error(e);
                        if matches!(e, WireError::Authentication(_)) {
                            // Tell the initiator why, so it fails fast with
                            // the same diagnosis. This zero length is
                            // unauthenticated, but an attacker able to forge
                            // it could as well just cut the connection.
                            let _ = tcp.write_all(&[0, 0]);
                        }
                        return Err(e);
                    }
                };
                if let Some(id) = &cfg.identity {
                    let theirs = hs
                        .get_remote_static()
                        .and_then(|k| <[u8; KEY_LEN]>::try_from(k).ok())
                        .map(PublicKey)
                        .ok_or_else(|| WireError::Handshake("the peer sent no identity".into()))?;
                    if !id.peers.contains(&theirs) {
                        let _ = tcp.write_all(&[0, 0]);
                        return Err(WireError::Authentication(format!(
                            "the peer's identity {theirs} is not one this host accepts"
                        )));
                    }
                    peer_identity = Some(theirs);
                }
                fresh_initiation(key, sent)?;
                let n = hs.write_message(&[], &mut out).map_err(WireError::Noise)?;
                write_handshake(&mut tcp, &out[..n])?;
                hs
            }
        };
        // Nonces are counted by each half, both from 0, exactly as the
        // stateful transport would count them.
        let noise = hs
            .into_stateless_transport_mode()
            .map_err(WireError::Noise)?;

        tcp.set_read_timeout(saved_read)?;
        tcp.set_write_timeout(saved_write)?;
        // Heartbeats and acks are small and latency matters for failover;
        // each frame goes out in a single write, so this costs nothing.
        tcp.set_nodelay(true)?;
        let shared = Arc::new(Shared {
            tcp,
            noise,
            failure: OnceLock::new(),
            peer_identity,
        });
        Ok(SecureStream {
            reader: SecureReader {
                shared: Arc::clone(&shared),
                decoder: Decoder::with_max_payload(cfg.max_payload),
                nonce: 0,
                rx: vec![0; 2 + NOISE_MAX_MSG],
                rx_have: 0,
                plain: vec![0; NOISE_MAX_MSG],
                failed: false,
            },
            writer: SecureWriter {
                shared,
                encoder: Encoder::with_max_payload(cfg.max_payload),
                nonce: 0,
                failed: false,
            },
        })
    }

    /// Splits the stream into halves that two threads can use at once, one
    /// receiving while the other sends. Counters, timeouts already set and a
    /// partly received message carry over. A failure of either half ends
    /// both; see [`SecureReader`] and [`SecureWriter`].
    pub fn split(self) -> (SecureReader, SecureWriter) {
        (self.reader, self.writer)
    }

    /// Encrypts and sends one message.
    ///
    /// A message that cannot be encoded (over-long name, too large) is
    /// refused before anything is sent and the stream stays usable; a failure
    /// while sending, a write timeout included, leaves it unusable.
    pub fn send(&mut self, msg: &Message) -> Result<()> {
        self.writer.send(msg).map_err(one_stream)
    }

    /// Receives, decrypts and decodes the next message.
    ///
    /// With a read timeout set, `Err(WireError::Timeout)` means nothing
    /// complete arrived in time; the stream stays usable and a later call
    /// continues where this one stopped. A clean close by the peer between
    /// messages is `Err(WireError::Closed)`.
    pub fn recv(&mut self) -> Result<Message> {
        self.reader.recv().map_err(one_stream)
    }

    /// Passes through to [`TcpStream::set_read_timeout`]; see [`Self::recv`]
    /// for what a timeout means.
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> Result<()> {
        self.reader.set_read_timeout(timeout)
    }

    /// Passes through to [`TcpStream::set_write_timeout`]; a send that times
    /// out leaves the stream unusable.
    pub fn set_write_timeout(&self, timeout: Option<Duration>) -> Result<()> {
        self.writer.set_write_timeout(timeout)
    }

    pub fn peer_addr(&self) -> Result<SocketAddr> {
        Ok(self.reader.shared.tcp.peer_addr()?)
    }

    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.reader.shared.tcp.local_addr()?)
    }

    /// The peer's identity, proven by the handshake (with identities).
    pub fn peer_identity(&self) -> Option<PublicKey> {
        self.reader.shared.peer_identity
    }

    pub fn shutdown(&self, how: Shutdown) -> Result<()> {
        self.reader.shared.tcp.shutdown(how)?;
        Ok(())
    }

    /// False once any error other than a read timeout has occurred.
    pub fn is_usable(&self) -> bool {
        self.reader.is_usable() && self.writer.is_usable()
    }
}

/// A whole stream is used by one thread, which has already seen the first
/// failure whichever half it came from; later calls just say the stream is
/// spent, as they always have.
fn one_stream(e: WireError) -> WireError {
    match e {
        WireError::OtherHalfFailed { .. } => WireError::Poisoned,
        e => e,
    }
}

impl SecureWriter {
    /// Encrypts and sends one message.
    ///
    /// A message that cannot be encoded (over-long name, too large) is
    /// refused before anything is sent and the writer stays usable. Any
    /// failure while sending, a write timeout included, ends the connection:
    /// this half then returns [`WireError::Poisoned`], the reader
    /// [`WireError::OtherHalfFailed`].
    pub fn send(&mut self, msg: &Message) -> Result<()> {
        self.send_all(std::slice::from_ref(msg))
    }

    /// Sends `msgs` in one write: one system call and, small enough, one
    /// packet for the peer to wake up to. A message that cannot be encoded
    /// is refused with those after it, the ones before it are sent.
    pub fn send_all(&mut self, msgs: &[Message]) -> Result<()> {
        self.check()?;
        let mut frames = Vec::new();
        let mut refused = None;
        for m in msgs {
            if let Err(e) = self.encoder.encode_into(m, &mut frames) {
                refused = Some(e);
                break;
            }
        }
        if !frames.is_empty() {
            self.send_frame(&frames).map_err(|e| {
                self.failed = true;
                self.shared.fail(Half::Writer, e)
            })?;
        }
        refused.map_or(Ok(()), Err)
    }

    fn check(&self) -> Result<()> {
        self.shared.usable(Half::Writer, self.failed)
    }

    fn send_frame(&mut self, frame: &[u8]) -> Result<()> {
        let pieces = frame.len().div_ceil(MAX_PIECE);
        let mut out = Vec::with_capacity(frame.len() + pieces * (2 + NOISE_TAG_LEN));
        for piece in frame.chunks(MAX_PIECE) {
            let start = out.len();
            out.resize(start + 2 + piece.len() + NOISE_TAG_LEN, 0);
            let n = self
                .shared
                .noise
                .write_message(self.nonce, piece, &mut out[start + 2..])
                .map_err(WireError::Noise)?;
            // snow refuses the last nonce, u64::MAX, so this cannot wrap.
            self.nonce += 1;
            out.truncate(start + 2 + n);
            // n <= NOISE_MAX_MSG, which is u16::MAX.
            out[start..start + 2].copy_from_slice(&(n as u16).to_le_bytes());
        }
        (&self.shared.tcp).write_all(&out).map_err(|e| {
            if is_timeout(&e) {
                WireError::Timeout
            } else {
                e.into()
            }
        })
    }

    /// Ends the connection for `why` (the peer sent something this end
    /// cannot take, found outside the link): both halves fail from now on,
    /// the reader with [`WireError::OtherHalfFailed`] at once, even if it is
    /// waiting for the peer.
    pub fn abort(&mut self, why: &str) {
        self.failed = true;
        let _ = self.shared.fail(
            Half::Writer,
            WireError::Io(std::io::Error::other(why.to_string())),
        );
    }

    /// Passes through to [`TcpStream::set_write_timeout`]. A send that
    /// times out ends the connection: the peer is not reading.
    pub fn set_write_timeout(&self, timeout: Option<Duration>) -> Result<()> {
        self.shared.tcp.set_write_timeout(timeout)?;
        Ok(())
    }

    /// Tells the peer nothing more will come: its reader gets
    /// [`WireError::Closed`] after the last message, which ends the
    /// connection on its side. Our reader still receives what the peer sent
    /// before that, then `Closed` in turn.
    pub fn shutdown(self) -> Result<()> {
        self.check()?;
        self.shared.tcp.shutdown(Shutdown::Write)?;
        Ok(())
    }

    pub fn peer_addr(&self) -> Result<SocketAddr> {
        Ok(self.shared.tcp.peer_addr()?)
    }

    /// False once this half or the other has failed.
    pub fn is_usable(&self) -> bool {
        self.check().is_ok()
    }
}

impl SecureReader {
    /// Receives, decrypts and decodes the next message.
    ///
    /// With a read timeout set, `Err(WireError::Timeout)` means nothing
    /// complete arrived in time; the reader stays usable and a later call
    /// continues where this one stopped. A clean close by the peer between
    /// messages is `Err(WireError::Closed)`. Any other error ends the
    /// connection: this half then returns [`WireError::Poisoned`], the writer
    /// [`WireError::OtherHalfFailed`].
    pub fn recv(&mut self) -> Result<Message> {
        self.check()?;
        self.recv_inner().map_err(|e| match e {
            WireError::Timeout => e,
            e => {
                self.failed = true;
                self.shared.fail(Half::Reader, e)
            }
        })
    }

    fn check(&self) -> Result<()> {
        self.shared.usable(Half::Reader, self.failed)
    }

    /// The next message: looked for without sleeping for up to `spin`
    /// (the CPU yielded between looks, so that whoever is to send it can
    /// run), then waited for as [`SecureReader::recv`] does. While messages
    /// come close together the reader is never put to sleep and woken,
    /// which costs tens of microseconds on a virtual machine.
    pub fn recv_polling(&mut self, spin: Duration) -> Result<Message> {
        if !spin.is_zero() {
            let until = Instant::now() + spin;
            loop {
                if let Some(m) = self.try_recv()? {
                    return Ok(m);
                }
                if Instant::now() >= until {
                    break;
                }
                std::thread::yield_now();
            }
        }
        self.recv()
    }

    /// The next message if it has arrived whole, without waiting for it:
    /// `Ok(None)` when it has not (what did arrive is kept for the next
    /// call). For a reader that polls for a while before it sleeps, when
    /// waking it would cost more than looking.
    pub fn try_recv(&mut self) -> Result<Option<Message>> {
        self.check()?;
        let r = loop {
            match self.decoder.next() {
                Ok(Some(m)) => break Ok(Some(m)),
                Ok(None) => {}
                Err(e) => break Err(e),
            }
            match self.read_piece(false) {
                Ok(()) => {}
                Err(WireError::Timeout) => break Ok(None),
                Err(e) => break Err(e),
            }
        };
        r.map_err(|e| {
            self.failed = true;
            self.shared.fail(Half::Reader, e)
        })
    }

    fn recv_inner(&mut self) -> Result<Message> {
        loop {
            if let Some(m) = self.decoder.next()? {
                return Ok(m);
            }
            self.read_piece(true)?;
        }
    }

    /// Reads one Noise transport message and feeds its plaintext to the
    /// decoder; without `wait`, [`WireError::Timeout`] as soon as nothing
    /// more has arrived.
    fn read_piece(&mut self, wait: bool) -> Result<()> {
        loop {
            let need = if self.rx_have < 2 {
                2
            } else {
                2 + usize::from(u16::from_le_bytes([self.rx[0], self.rx[1]]))
            };
            if self.rx_have >= 2 && self.rx_have == need {
                break;
            }
            let buf = &mut self.rx[self.rx_have..need];
            let got = if wait {
                (&self.shared.tcp).read(buf)
            } else {
                // The socket itself stays blocking: the writer shares it.
                rustix::net::recv(&self.shared.tcp, buf, rustix::net::RecvFlags::DONTWAIT)
                    .map(|(n, _)| n)
                    .map_err(std::io::Error::from)
            };
            match got {
                Ok(0) => {
                    return Err(if self.rx_have == 0 && self.decoder.buffered() == 0 {
                        WireError::Closed
                    } else {
                        WireError::Io(std::io::Error::new(
                            ErrorKind::UnexpectedEof,
                            "the peer closed the connection in the middle of a message",
                        ))
                    });
                }
                Ok(n) => self.rx_have += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) => return Err(WireError::Timeout),
                Err(e) => return Err(e.into()),
            }
        }
        let len = self.rx_have - 2;
        self.rx_have = 0;
        if len < NOISE_TAG_LEN {
            return Err(WireError::Decrypt);
        }
        let n = self
            .shared
            .noise
            .read_message(self.nonce, &self.rx[2..2 + len], &mut self.plain)
            .map_err(|e| match e {
                snow::Error::Decrypt => WireError::Decrypt,
                other => WireError::Noise(other),
            })?;
        // Only an authentic message uses up its nonce; anything else has
        // already ended the connection. snow refuses the last nonce,
        // u64::MAX, so this cannot wrap.
        self.nonce += 1;
        self.decoder.feed(&self.plain[..n]);
        Ok(())
    }

    /// Passes through to [`TcpStream::set_read_timeout`]; see [`Self::recv`]
    /// for what a timeout means.
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> Result<()> {
        self.shared.tcp.set_read_timeout(timeout)?;
        Ok(())
    }

    pub fn peer_addr(&self) -> Result<SocketAddr> {
        Ok(self.shared.tcp.peer_addr()?)
    }

    /// False once this half or the other has failed; a read timeout is not a
    /// failure.
    pub fn is_usable(&self) -> bool {
        self.check().is_ok()
    }
}

fn is_timeout(e: &std::io::Error) -> bool {
    // SO_RCVTIMEO expiry surfaces as EAGAIN on Linux, TimedOut elsewhere.
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

fn handshake_error(e: snow::Error) -> WireError {
    match e {
        snow::Error::Decrypt => WireError::Authentication(
            "the peer's handshake does not verify: it holds a different pre-shared key \
             (or speaks another protocol version)"
                .into(),
        ),
        other => WireError::Handshake(format!("noise: {other}")),
    }
}

fn write_handshake(tcp: &mut TcpStream, msg: &[u8]) -> Result<()> {
    let mut buf = Vec::with_capacity(2 + msg.len());
    // Handshake messages are far below u16::MAX (MAX_HANDSHAKE_MSG).
    buf.extend_from_slice(&(msg.len() as u16).to_le_bytes());
    buf.extend_from_slice(msg);
    tcp.write_all(&buf).map_err(|e| {
        if is_timeout(&e) {
            WireError::Timeout
        } else {
            e.into()
        }
    })
}

fn read_handshake(tcp: &mut TcpStream, deadline: Instant) -> Result<Vec<u8>> {
    let mut len = [0u8; 2];
    read_exact_until(tcp, &mut len, deadline)?;
    let len = usize::from(u16::from_le_bytes(len));
    if len > MAX_HANDSHAKE_MSG {
        return Err(WireError::Handshake(format!(
            "handshake message of {len} bytes: the peer does not speak this protocol"
        )));
    }
    let mut msg = vec![0u8; len];
    read_exact_until(tcp, &mut msg, deadline)?;
    Ok(msg)
}

fn read_exact_until(tcp: &mut TcpStream, mut buf: &mut [u8], deadline: Instant) -> Result<()> {
    while !buf.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(WireError::Timeout);
        }
        tcp.set_read_timeout(Some(left))?;
        match tcp.read(buf) {
            Ok(0) => {
                return Err(WireError::Handshake(
                    "the peer closed the connection during the handshake".into(),
                ));
            }
            Ok(n) => buf = &mut buf[n..],
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => return Err(WireError::Timeout),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_dir::TempDir;
    use std::fs;

    /// A scratch directory for key files.
    fn key_dir(tag: &str) -> TempDir {
        TempDir::new("key", tag)
    }

    const HEX64: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191A1B1C1D1E1F";

    #[test]
    fn loads_hex_key_with_whitespace() {
        let t = key_dir("ok");
        let p = t.file("k", format!("  \n{HEX64}\r\n\t").as_bytes(), 0o600);
        let k = Key::load(&p).unwrap();
        let expected: [u8; 32] = std::array::from_fn(|i| i as u8);
        assert_eq!(k, Key::from_bytes(expected));
        assert_eq!(format!("{k:?}"), "Key(<redacted>)");
        // Owner-only variants are fine too.
        let p = t.file("k2", HEX64.as_bytes(), 0o400);
        Key::load(&p).unwrap();
    }

    #[test]
    fn missing_key_file() {
        let t = key_dir("missing");
        let e = Key::load(&t.0.join("nope")).unwrap_err();
        assert!(matches!(e, WireError::KeyMissing { .. }), "{e:?}");
        assert!(e.to_string().contains("does not exist"));
    }

    #[test]
    fn key_file_readable_by_others_is_refused() {
        let t = key_dir("perm");
        for mode in [0o644, 0o640, 0o604, 0o660, 0o601, 0o610] {
            let p = t.file(&format!("k{mode:o}"), HEX64.as_bytes(), mode);
            let e = Key::load(&p).unwrap_err();
            match &e {
                WireError::KeyPermissions { mode: m, .. } => assert_eq!(*m, mode),
                other => panic!("{other:?}"),
            }
            assert!(e.to_string().contains("chmod 600"), "{e}");
        }
    }

    #[test]
    fn key_file_of_another_user_is_refused() {
        let t = key_dir("owner");
        let p = t.file("k", HEX64.as_bytes(), 0o600);
        let me = rustix::process::geteuid().as_raw();
        let other = if me == 65534 { 65533 } else { 65534 };
        if std::os::unix::fs::chown(&p, Some(other), None).is_err() {
            // Not root: a file cannot be given away here.
            return;
        }
        let e = Key::load(&p).unwrap_err();
        assert!(
            matches!(e, WireError::KeyOwner { owner, .. } if owner == other),
            "{e:?}"
        );
    }

    #[test]
    fn key_file_wrong_length() {
        let t = key_dir("len");
        for content in [
            "",
            "abcd",
            &HEX64[..63],
            &format!("{HEX64}0"),
            &format!("{HEX64} {HEX64}"),
        ] {
            let p = t.file("k", content.as_bytes(), 0o600);
            let e = Key::load(&p).unwrap_err();
            match &e {
                WireError::KeyFormat { reason, .. } => {
                    assert!(reason.contains("expected 64 hex characters"), "{reason}")
                }
                other => panic!("{content:?}: {other:?}"),
            }
        }
        let p = t.file("big", &vec![b'a'; 10_000], 0o600);
        assert!(matches!(Key::load(&p), Err(WireError::KeyFormat { .. })));
    }

    #[test]
    fn key_file_not_hex() {
        let t = key_dir("hex");
        let mut bad = HEX64.to_string();
        bad.replace_range(9..10, "g");
        let p = t.file("k", bad.as_bytes(), 0o600);
        match Key::load(&p).unwrap_err() {
            WireError::KeyFormat { reason, .. } => {
                assert!(
                    reason.contains("character 10 is not a hex digit"),
                    "{reason}"
                )
            }
            other => panic!("{other:?}"),
        }
        let mut bad = HEX64.as_bytes().to_vec();
        bad[0] = 0xff;
        let p = t.file("k2", &bad, 0o600);
        assert!(matches!(Key::load(&p), Err(WireError::KeyFormat { .. })));
    }

    #[test]
    fn key_path_that_is_a_directory() {
        let t = key_dir("dir");
        let d = t.0.join("d");
        fs::create_dir(&d).unwrap();
        fs::set_permissions(&d, fs::Permissions::from_mode(0o700)).unwrap();
        assert!(matches!(Key::load(&d), Err(WireError::KeyFormat { .. })));
    }

    #[test]
    fn generate_writes_private_file_and_never_overwrites() {
        let t = key_dir("gen");
        let p = t.0.join("key");
        let k = Key::generate(&p).unwrap();
        let meta = fs::metadata(&p).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let text = fs::read_to_string(&p).unwrap();
        assert_eq!(text.trim().len(), 64);
        assert_eq!(Key::load(&p).unwrap(), k);

        let e = Key::generate(&p).unwrap_err();
        assert!(matches!(e, WireError::KeyExists { .. }), "{e:?}");
        assert_eq!(Key::load(&p).unwrap(), k);

        let k2 = Key::generate(&t.0.join("other")).unwrap();
        assert_ne!(k, k2);
    }
}
