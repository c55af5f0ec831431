//! The secure channel over real TCP on the loopback interface.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use rrc_wire::{
    Key, Message, Role, SecureConfig, SecureReader, SecureStream, SecureWriter, WireError,
};

fn key(b: u8) -> Key {
    Key::from_bytes([b; 32])
}

fn quick() -> SecureConfig {
    SecureConfig {
        handshake_timeout: Duration::from_secs(2),
        ..SecureConfig::default()
    }
}

fn listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").unwrap()
}

/// Runs `server` on an accepted connection in a thread and `client` on a
/// connection to it, returning both results.
fn pair<S, C, RS, RC>(server: S, client: C) -> (RS, RC)
where
    S: FnOnce(TcpStream) -> RS + Send + 'static,
    C: FnOnce(TcpStream) -> RC,
    RS: Send + 'static,
{
    let l = listener();
    let addr = l.local_addr().unwrap();
    let h = thread::spawn(move || server(l.accept().unwrap().0));
    let rc = client(TcpStream::connect(addr).unwrap());
    (h.join().unwrap(), rc)
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn same_key_talks_both_ways_with_large_chunks() {
    let big = 5 * 1024 * 1024;
    let (server, client) = pair(
        move |tcp| -> Result<(), WireError> {
            let mut s = SecureStream::server(tcp, &key(7))?;
            let hello = s.recv()?;
            assert_eq!(
                hello,
                Message::Hello {
                    role: Role::Primary,
                    node: "p1".into(),
                    service: "svc".into(),
                    term: None,
                }
            );
            s.send(&Message::Welcome { node: "b1".into() })?;
            match s.recv()? {
                Message::FileChunk {
                    epoch,
                    name,
                    offset,
                    data,
                } => {
                    assert_eq!((epoch, name.as_str(), offset), (42, "pages-1.img", 0));
                    assert_eq!(data, pattern(big, 1));
                }
                other => panic!("{other:?}"),
            }
            s.send(&Message::FileChunk {
                epoch: 43,
                name: "back".into(),
                offset: 7,
                data: pattern(big, 2),
            })?;
            assert_eq!(
                s.recv()?,
                Message::Bye {
                    reason: "done".into()
                }
            );
            assert!(matches!(s.recv(), Err(WireError::Closed)));
            Ok(())
        },
        move |tcp| -> Result<(), WireError> {
            let mut c = SecureStream::client(tcp, &key(7))?;
            c.send(&Message::Hello {
                role: Role::Primary,
                node: "p1".into(),
                service: "svc".into(),
                term: None,
            })?;
            assert_eq!(c.recv()?, Message::Welcome { node: "b1".into() });
            c.send(&Message::FileChunk {
                epoch: 42,
                name: "pages-1.img".into(),
                offset: 0,
                data: pattern(big, 1),
            })?;
            match c.recv()? {
                Message::FileChunk { data, offset, .. } => {
                    assert_eq!(offset, 7);
                    assert_eq!(data, pattern(big, 2));
                }
                other => panic!("{other:?}"),
            }
            c.send(&Message::Bye {
                reason: "done".into(),
            })?;
            c.shutdown(Shutdown::Write)?;
            Ok(())
        },
    );
    server.unwrap();
    client.unwrap();
}

#[test]
fn different_keys_fail_authentication_on_both_sides() {
    let start = Instant::now();
    let (server, client) = pair(
        |tcp| SecureStream::server_with(tcp, &key(1), &quick()).map(|_| ()),
        |tcp| SecureStream::client_with(tcp, &key(2), &quick()).map(|_| ()),
    );
    assert!(
        matches!(server, Err(WireError::Authentication(_))),
        "server: {server:?}"
    );
    assert!(
        matches!(client, Err(WireError::Authentication(_))),
        "client: {client:?}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn silent_peer_times_out_instead_of_hanging() {
    let cfg = SecureConfig {
        handshake_timeout: Duration::from_millis(300),
        ..SecureConfig::default()
    };
    let start = Instant::now();
    let (server, client) = pair(
        |tcp| {
            // Accept and say nothing until the client gives up.
            let mut buf = [0u8; 256];
            let mut tcp = tcp;
            while matches!(tcp.read(&mut buf), Ok(n) if n > 0) {}
        },
        move |tcp| SecureStream::client_with(tcp, &key(1), &cfg).map(|_| ()),
    );
    let () = server;
    assert!(matches!(client, Err(WireError::Timeout)), "{client:?}");
    assert!(start.elapsed() < Duration::from_secs(10));

    let start = Instant::now();
    let (server, ()) = pair(
        |tcp| {
            let cfg = SecureConfig {
                handshake_timeout: Duration::from_millis(300),
                ..SecureConfig::default()
            };
            SecureStream::server_with(tcp, &key(1), &cfg).map(|_| ())
        },
        |tcp| {
            // Dribble a partial length prefix, then stall.
            let mut tcp = tcp;
            tcp.write_all(&[48]).unwrap();
            thread::sleep(Duration::from_millis(800));
        },
    );
    assert!(matches!(server, Err(WireError::Timeout)), "{server:?}");
    assert!(start.elapsed() < Duration::from_secs(10));
}

#[test]
fn non_rrc_client_is_refused_quickly() {
    let (server, ()) = pair(
        |tcp| SecureStream::server_with(tcp, &key(1), &quick()).map(|_| ()),
        |tcp| {
            let mut tcp = tcp;
            let _ = tcp.write_all(b"GET / HTTP/1.0\r\n\r\n");
            let mut sink = Vec::new();
            let _ = tcp.read_to_end(&mut sink);
        },
    );
    assert!(matches!(server, Err(WireError::Handshake(_))), "{server:?}");
}

/// Forwards client<->server. The client's handshake message passes
/// untouched; each later message (a u16 length and a Noise transport
/// message) goes through `tamper`, given its index and bytes, and what it
/// returns is forwarded instead.
fn tampering_proxy<F>(server: std::net::SocketAddr, mut tamper: F) -> std::net::SocketAddr
where
    F: FnMut(usize, Vec<u8>) -> Vec<Vec<u8>> + Send + 'static,
{
    let l = listener();
    let addr = l.local_addr().unwrap();
    thread::spawn(move || {
        let (mut from_client, _) = l.accept().unwrap();
        let mut to_server = TcpStream::connect(server).unwrap();
        let mut back_from = to_server.try_clone().unwrap();
        let mut back_to = from_client.try_clone().unwrap();
        thread::spawn(move || {
            let _ = std::io::copy(&mut back_from, &mut back_to);
            let _ = back_to.shutdown(Shutdown::Write);
        });
        let mut read_message = || -> std::io::Result<Vec<u8>> {
            let mut len = [0u8; 2];
            from_client.read_exact(&mut len)?;
            let mut body = vec![0u8; usize::from(u16::from_le_bytes(len))];
            from_client.read_exact(&mut body)?;
            Ok(body)
        };
        let mut forward = |body: &[u8]| -> std::io::Result<()> {
            to_server.write_all(&(body.len() as u16).to_le_bytes())?;
            to_server.write_all(body)
        };
        let Ok(handshake) = read_message() else {
            return;
        };
        forward(&handshake).unwrap();
        let mut i = 0;
        while let Ok(body) = read_message() {
            for out in tamper(i, body) {
                if forward(&out).is_err() {
                    return;
                }
            }
            i += 1;
        }
        let _ = to_server.shutdown(Shutdown::Write);
    });
    addr
}

/// Flips a bit in the body of the first transport message.
fn flip_first(i: usize, mut body: Vec<u8>) -> Vec<Vec<u8>> {
    if i == 0 {
        body[5] ^= 0x01;
    }
    vec![body]
}

#[test]
fn flipped_byte_in_transit_is_detected() {
    let l = listener();
    let server_addr = l.local_addr().unwrap();
    let proxy = tampering_proxy(server_addr, flip_first);
    let h = thread::spawn(move || {
        let mut s = SecureStream::server_with(l.accept().unwrap().0, &key(9), &quick()).unwrap();
        let first = s.recv();
        let second = s.recv();
        let send = s.send(&Message::Committed { epoch: 1 });
        (first, second, send, s.is_usable())
    });
    let mut c =
        SecureStream::client_with(TcpStream::connect(proxy).unwrap(), &key(9), &quick()).unwrap();
    c.send(&Message::Heartbeat { sent_unix_ns: 123 }).unwrap();
    let (first, second, send, usable) = h.join().unwrap();
    assert!(matches!(first, Err(WireError::Decrypt)), "{first:?}");
    assert!(matches!(second, Err(WireError::Poisoned)), "{second:?}");
    assert!(matches!(send, Err(WireError::Poisoned)), "{send:?}");
    assert!(!usable);
}

/// Sends heartbeats 0..n from a client through `proxy` and returns what the
/// server's reader half made of them, the first error included, and what
/// the server's writer half said afterwards.
fn heartbeats_through<F>(tamper: F, n: u64) -> (Vec<Message>, WireError, WireError)
where
    F: FnMut(usize, Vec<u8>) -> Vec<Vec<u8>> + Send + 'static,
{
    let l = listener();
    let proxy = tampering_proxy(l.local_addr().unwrap(), tamper);
    let h = thread::spawn(move || {
        let s = SecureStream::server_with(l.accept().unwrap().0, &key(9), &quick()).unwrap();
        let (mut r, mut w) = s.split();
        r.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut got = Vec::new();
        let err = loop {
            match r.recv() {
                Ok(m) => got.push(m),
                Err(e) => break e,
            }
        };
        assert!(!r.is_usable() && !w.is_usable());
        assert!(matches!(r.recv(), Err(WireError::Poisoned)));
        let send = w.send(&Message::Committed { epoch: 1 }).unwrap_err();
        (got, err, send)
    });
    let c =
        SecureStream::client_with(TcpStream::connect(proxy).unwrap(), &key(9), &quick()).unwrap();
    let (_r, mut w) = c.split();
    for i in 0..n {
        w.send(&Message::Heartbeat { sent_unix_ns: i }).unwrap();
    }
    // The server may have shut the connection already.
    let _ = w.shutdown();
    h.join().unwrap()
}

fn hb(n: u64) -> Message {
    Message::Heartbeat { sent_unix_ns: n }
}

fn assert_other_half_failed(e: &WireError, half: &str) {
    match e {
        WireError::OtherHalfFailed { half: h, .. } => assert_eq!(*h, half, "{e}"),
        other => panic!("expected the {half} half to have failed, got {other:?}"),
    }
}

#[test]
fn split_reader_detects_flipped_dropped_replayed_and_reordered_messages() {
    // Each heartbeat is one transport message.
    let (got, err, send) = heartbeats_through(flip_first, 3);
    assert!(got.is_empty(), "{got:?}");
    assert!(matches!(err, WireError::Decrypt), "{err:?}");
    assert_other_half_failed(&send, "receiving");

    let drop_second = |i: usize, body: Vec<u8>| if i == 1 { vec![] } else { vec![body] };
    let (got, err, send) = heartbeats_through(drop_second, 3);
    assert_eq!(got, [hb(0)]);
    assert!(matches!(err, WireError::Decrypt), "{err:?}");
    assert_other_half_failed(&send, "receiving");

    let replay_first = |i: usize, body: Vec<u8>| {
        if i == 0 {
            vec![body.clone(), body]
        } else {
            vec![body]
        }
    };
    let (got, err, _) = heartbeats_through(replay_first, 3);
    assert_eq!(got, [hb(0)]);
    assert!(matches!(err, WireError::Decrypt), "{err:?}");

    let mut held = None;
    let swap_first_two = move |i: usize, body: Vec<u8>| match i {
        0 => {
            held = Some(body);
            vec![]
        }
        1 => vec![body, held.take().unwrap()],
        _ => vec![body],
    };
    let (got, err, _) = heartbeats_through(swap_first_two, 3);
    assert!(got.is_empty(), "{got:?}");
    assert!(matches!(err, WireError::Decrypt), "{err:?}");

    // Untouched, all arrive; the client's clean close ends the stream.
    let (got, err, send) = heartbeats_through(|_, body| vec![body], 3);
    assert_eq!(got, [hb(0), hb(1), hb(2)]);
    assert!(matches!(err, WireError::Closed), "{err:?}");
    assert_other_half_failed(&send, "receiving");
}

#[test]
fn read_timeout_keeps_the_stream_usable() {
    let (server, client) = pair(
        |tcp| -> Result<(), WireError> {
            let mut s = SecureStream::server_with(tcp, &key(3), &quick())?;
            s.set_read_timeout(Some(Duration::from_millis(100)))?;
            assert!(matches!(s.recv(), Err(WireError::Timeout)));
            assert!(s.is_usable());
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            assert_eq!(s.recv()?, Message::Heartbeat { sent_unix_ns: 5 });
            s.send(&Message::HeartbeatAck { echo_unix_ns: 5 })?;
            Ok(())
        },
        |tcp| -> Result<(), WireError> {
            let mut c = SecureStream::client_with(tcp, &key(3), &quick())?;
            thread::sleep(Duration::from_millis(300));
            c.send(&Message::Heartbeat { sent_unix_ns: 5 })?;
            assert_eq!(c.recv()?, Message::HeartbeatAck { echo_unix_ns: 5 });
            Ok(())
        },
    );
    server.unwrap();
    client.unwrap();
}

#[test]
fn unencodable_message_is_refused_without_breaking_the_stream() {
    let (server, client) = pair(
        |tcp| -> Result<Message, WireError> {
            let mut s = SecureStream::server_with(tcp, &key(4), &quick())?;
            s.recv()
        },
        |tcp| -> Result<(), WireError> {
            let mut c = SecureStream::client_with(tcp, &key(4), &quick())?;
            let bad = c.send(&Message::FileChunk {
                epoch: 1,
                name: "../../etc/shadow".into(),
                offset: 0,
                data: vec![],
            });
            assert!(matches!(bad, Err(WireError::Invalid { .. })), "{bad:?}");
            assert!(c.is_usable());
            // The refused message used no sequence number, so this one is 0.
            c.send(&Message::Committed { epoch: 1 })
        },
    );
    client.unwrap();
    assert_eq!(server.unwrap(), Message::Committed { epoch: 1 });
}

#[test]
fn peer_vanishing_mid_message_is_not_a_clean_close() {
    let (server, ()) = pair(
        |tcp| -> Result<Message, WireError> {
            let mut s = SecureStream::server_with(tcp, &key(5), &quick())?;
            s.recv()
        },
        |tcp| {
            let raw = tcp.try_clone().unwrap();
            let _c = SecureStream::client_with(tcp, &key(5), &quick()).unwrap();
            // Start a transport message, then close before its end.
            let mut raw = raw;
            raw.write_all(&[100, 0, 1, 2, 3]).unwrap();
            raw.shutdown(Shutdown::Both).unwrap();
        },
    );
    match server {
        Err(WireError::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof),
        other => panic!("{other:?}"),
    }
}

#[test]
fn halves_can_move_to_other_threads() {
    fn send<T: Send>() {}
    send::<SecureReader>();
    send::<SecureWriter>();
}

/// Polls `done` until it holds or `limit` passes.
fn wait_for(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + limit;
    while !done() {
        if Instant::now() > until {
            return false;
        }
        thread::sleep(Duration::from_millis(5));
    }
    true
}

#[test]
fn small_messages_get_through_while_a_large_send_is_stuck() {
    // Together far more than the socket buffers on both ends can hold (the
    // receive buffer may grow to 32 MiB on Linux), so the sender is stuck
    // in the kernel until the server reads.
    const BIG: usize = 8 << 20;
    const LARGE: u64 = 5;
    const SMALL: u64 = 50;
    let small_received = Arc::new(AtomicU64::new(0));
    let large_sent = Arc::new(AtomicU64::new(0));
    let (received, sent) = (Arc::clone(&small_received), Arc::clone(&large_sent));
    let (server, client) = pair(
        move |tcp| -> Result<u64, WireError> {
            let (mut r, mut w) = SecureStream::server_with(tcp, &key(6), &quick())?.split();
            for i in 0..SMALL {
                w.send(&hb(i))?;
            }
            // Read nothing until the client has every small message: all
            // that time its writer is stuck in the middle of large ones.
            assert!(
                wait_for(Duration::from_secs(30), || received.load(Ordering::SeqCst)
                    == SMALL),
                "the small messages did not get through while a large send was stuck"
            );
            let stuck_at = sent.load(Ordering::SeqCst);
            for i in 0..LARGE {
                match r.recv()? {
                    Message::Log { data } => assert!(data == pattern(BIG, i as u8), "{i}"),
                    other => panic!("{other:?}"),
                }
            }
            w.send(&Message::LogAck {
                records: LARGE,
                net: 0,
            })?;
            Ok(stuck_at)
        },
        move |tcp| -> Result<(), WireError> {
            let (mut r, mut w) = SecureStream::client_with(tcp, &key(6), &quick())?.split();
            let writer = thread::spawn(move || -> Result<(), WireError> {
                for i in 0..LARGE {
                    w.send(&Message::Log {
                        data: pattern(BIG, i as u8),
                    })?;
                    large_sent.fetch_add(1, Ordering::SeqCst);
                }
                Ok(())
            });
            r.set_read_timeout(Some(Duration::from_secs(30)))?;
            for i in 0..SMALL {
                assert_eq!(r.recv()?, hb(i));
                small_received.fetch_add(1, Ordering::SeqCst);
            }
            assert_eq!(
                r.recv()?,
                Message::LogAck {
                    records: LARGE,
                    net: 0
                }
            );
            writer.join().unwrap()
        },
    );
    client.unwrap();
    let stuck_at = server.unwrap();
    assert!(stuck_at < LARGE, "the large sends were never stuck");
}

#[test]
fn both_directions_stream_large_messages_at_once() {
    // With one stream per end, both would block in send, each waiting for
    // the other to read.
    const BIG: usize = 6 << 20;
    const ROUNDS: u64 = 3;
    fn talk(s: SecureStream, seed: u8) -> Result<(), WireError> {
        let (mut r, mut w) = s.split();
        let writer = thread::spawn(move || -> Result<(), WireError> {
            for i in 0..ROUNDS {
                w.send(&Message::Log {
                    data: pattern(BIG, seed.wrapping_add(i as u8)),
                })?;
                w.send(&hb(i))?;
            }
            Ok(())
        });
        let other = if seed == 0 { 100 } else { 0 };
        r.set_read_timeout(Some(Duration::from_secs(30)))?;
        for i in 0..ROUNDS {
            match r.recv()? {
                Message::Log { data } => {
                    assert!(data == pattern(BIG, other + i as u8), "round {i}")
                }
                m => panic!("{m:?}"),
            }
            assert_eq!(r.recv()?, hb(i));
        }
        writer.join().unwrap()
    }
    let (server, client) = pair(
        |tcp| talk(SecureStream::server_with(tcp, &key(8), &quick())?, 100),
        |tcp| talk(SecureStream::client_with(tcp, &key(8), &quick())?, 0),
    );
    server.unwrap();
    client.unwrap();
}

#[test]
fn a_write_timeout_poisons_the_writer_and_stops_the_reader() {
    let (done, wait_done) = std::sync::mpsc::channel::<()>();
    let (server, client) = pair(
        move |tcp| {
            // Completes the handshake, then reads nothing: a hung peer.
            let s = SecureStream::server_with(tcp, &key(2), &quick()).unwrap();
            let _ = wait_done.recv_timeout(Duration::from_secs(10));
            drop(s);
        },
        move |tcp| {
            let (mut r, mut w) = SecureStream::client_with(tcp, &key(2), &quick())
                .unwrap()
                .split();
            // No read timeout: only the writer's failure can end this.
            let reader = thread::spawn(move || {
                let e = r.recv().unwrap_err();
                (e, Instant::now(), r.is_usable())
            });
            w.set_write_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            let big = Message::Log {
                data: vec![0; 8 << 20],
            };
            let err = loop {
                if let Err(e) = w.send(&big) {
                    break e;
                }
            };
            let failed_at = Instant::now();
            assert!(matches!(err, WireError::Timeout), "{err:?}");
            assert!(!w.is_usable());
            assert!(matches!(w.send(&hb(1)), Err(WireError::Poisoned)));
            let (e, woke_at, usable) = reader.join().unwrap();
            assert_other_half_failed(&e, "sending");
            assert!(e.to_string().contains("timed out"), "{e}");
            assert!(!usable);
            // Woken by the writer's failure, not by the peer giving up
            // (after 10 s); the margin is for a loaded machine.
            assert!(
                woke_at.duration_since(failed_at) < Duration::from_secs(5),
                "{:?}",
                woke_at.duration_since(failed_at)
            );
            drop(done);
        },
    );
    let () = server;
    let () = client;
}

#[test]
fn a_reader_failure_wakes_a_writer_stuck_on_a_hung_peer() {
    let (done, wait_done) = std::sync::mpsc::channel::<()>();
    let (server, client) = pair(
        move |tcp| {
            let mut raw = tcp.try_clone().unwrap();
            let _s = SecureStream::server_with(tcp, &key(3), &quick()).unwrap();
            // Read nothing, so the client's writer gets stuck; then send
            // garbage in place of a transport message.
            thread::sleep(Duration::from_millis(500));
            raw.write_all(&[32, 0]).unwrap();
            raw.write_all(&[0xee; 32]).unwrap();
            let _ = wait_done.recv_timeout(Duration::from_secs(10));
        },
        move |tcp| {
            let (mut r, mut w) = SecureStream::client_with(tcp, &key(3), &quick())
                .unwrap()
                .split();
            // No write timeout: only the reader's failure can end this.
            let writer = thread::spawn(move || {
                let big = Message::Log {
                    data: vec![0; 8 << 20],
                };
                loop {
                    if let Err(e) = w.send(&big) {
                        return (e, Instant::now(), w.is_usable());
                    }
                }
            });
            let err = r.recv().unwrap_err();
            let failed_at = Instant::now();
            assert!(matches!(err, WireError::Decrypt), "{err:?}");
            let (e, woke_at, usable) = writer.join().unwrap();
            assert_other_half_failed(&e, "receiving");
            assert!(!usable);
            // Woken by the reader's failure, not by the peer giving up
            // (after 10 s).
            assert!(
                woke_at.duration_since(failed_at) < Duration::from_secs(5),
                "{:?}",
                woke_at.duration_since(failed_at)
            );
            drop(done);
        },
    );
    let () = server;
    let () = client;
}

#[test]
fn a_read_timeout_leaves_both_halves_usable() {
    let (server, client) = pair(
        |tcp| -> Result<(), WireError> {
            let (mut r, mut w) = SecureStream::server_with(tcp, &key(4), &quick())?.split();
            r.set_read_timeout(Some(Duration::from_millis(100)))?;
            assert!(matches!(r.recv(), Err(WireError::Timeout)));
            assert!(r.is_usable() && w.is_usable());
            w.send(&hb(1))?;
            r.set_read_timeout(Some(Duration::from_secs(5)))?;
            assert_eq!(r.recv()?, Message::HeartbeatAck { echo_unix_ns: 1 });
            w.shutdown()?;
            assert!(matches!(r.recv(), Err(WireError::Closed)));
            Ok(())
        },
        |tcp| -> Result<(), WireError> {
            let (mut r, mut w) = SecureStream::client_with(tcp, &key(4), &quick())?.split();
            thread::sleep(Duration::from_millis(300));
            assert_eq!(r.recv()?, hb(1));
            w.send(&Message::HeartbeatAck { echo_unix_ns: 1 })?;
            // The server's shutdown ends the connection here.
            assert!(matches!(r.recv(), Err(WireError::Closed)));
            assert_other_half_failed(&w.send(&hb(2)).unwrap_err(), "receiving");
            Ok(())
        },
    );
    server.unwrap();
    client.unwrap();
}

/// Relays one connection, keeping a copy of what the client sent first
/// (its handshake message, with its length).
fn recording_relay(
    server: std::net::SocketAddr,
) -> (std::net::SocketAddr, thread::JoinHandle<Vec<u8>>) {
    let l = listener();
    let addr = l.local_addr().unwrap();
    let h = thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        let mut s = TcpStream::connect(server).unwrap();
        let mut first = vec![0u8; 2];
        c.read_exact(&mut first).unwrap();
        let len = usize::from(u16::from_le_bytes([first[0], first[1]]));
        first.resize(2 + len, 0);
        c.read_exact(&mut first[2..]).unwrap();
        s.write_all(&first).unwrap();
        let mut s2 = s.try_clone().unwrap();
        let mut c2 = c.try_clone().unwrap();
        let back = thread::spawn(move || {
            let _ = std::io::copy(&mut s2, &mut c2);
        });
        let _ = std::io::copy(&mut c, &mut s);
        let _ = s.shutdown(Shutdown::Write);
        let _ = back.join();
        first
    });
    (addr, h)
}

#[test]
fn a_recorded_first_handshake_message_is_refused_when_played_again() {
    let k = key(41);
    let l = listener();
    let server = l.local_addr().unwrap();
    let serve = {
        let k = k.clone();
        thread::spawn(move || {
            (0..2)
                .map(|_| {
                    let (tcp, _) = l.accept().unwrap();
                    SecureStream::server_with(tcp, &k, &quick()).map(|_| ())
                })
                .collect::<Vec<_>>()
        })
    };
    // A genuine handshake, recorded on its way.
    let (relay, recorded) = recording_relay(server);
    let s = SecureStream::client_with(TcpStream::connect(relay).unwrap(), &k, &quick()).unwrap();
    drop(s);
    let first = recorded.join().unwrap();
    // The same first message, played again by someone without the key.
    let mut again = TcpStream::connect(server).unwrap();
    again.write_all(&first).unwrap();
    let results = serve.join().unwrap();
    assert!(results[0].is_ok(), "{:?}", results[0]);
    match &results[1] {
        Err(WireError::Authentication(why)) => assert!(why.contains("replayed"), "{why}"),
        other => panic!("a replayed first message was accepted: {other:?}"),
    }
}

/// An identity from a fresh file in a directory of its own.
fn identity(tag: &str) -> Arc<rrc_wire::Identity> {
    let dir = std::env::temp_dir().join(format!("rrc-wire-id-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("identity");
    let made = rrc_wire::Identity::generate(&path).unwrap();
    let loaded = rrc_wire::Identity::load(&path).unwrap();
    assert_eq!(
        made.public(),
        loaded.public(),
        "the file gives back the identity"
    );
    std::fs::remove_dir_all(&dir).unwrap();
    Arc::new(loaded)
}

fn with_identity(ours: &Arc<rrc_wire::Identity>, peers: &[rrc_wire::PublicKey]) -> SecureConfig {
    SecureConfig {
        identity: Some(rrc_wire::Identified {
            ours: ours.clone(),
            peers: peers.to_vec(),
        }),
        ..quick()
    }
}

#[test]
fn identified_hosts_talk_and_learn_who_the_other_is() {
    let (primary, backup) = (identity("p1"), identity("b1"));
    let (pp, bp) = (primary.public(), backup.public());
    let scfg = with_identity(&backup, &[pp]);
    let ccfg = with_identity(&primary, &[bp]);
    let (s, c) = pair(
        move |tcp| -> rrc_wire::Result<_> {
            let mut s = SecureStream::server_with(tcp, &key(3), &scfg)?;
            let got = s.recv()?;
            s.send(&hb(2))?;
            Ok((s.peer_identity(), got))
        },
        move |tcp| -> rrc_wire::Result<_> {
            let mut c = SecureStream::client_with(tcp, &key(3), &ccfg)?;
            c.send(&hb(1))?;
            Ok((c.peer_identity(), c.recv()?))
        },
    );
    let (s_peer, s_got) = s.unwrap();
    let (c_peer, c_got) = c.unwrap();
    assert_eq!(s_peer, Some(pp));
    assert_eq!(c_peer, Some(bp));
    assert_eq!(s_got, hb(1));
    assert_eq!(c_got, hb(2));
}

#[test]
fn a_key_holder_with_another_identity_is_refused() {
    // The intruder holds the shared key and an identity of its own, and
    // knows the backup's public key: the backup lists only the primary.
    let (primary, backup, intruder) = (identity("p2"), identity("b2"), identity("i2"));
    let scfg = with_identity(&backup, &[primary.public()]);
    let ccfg = with_identity(&intruder, &[backup.public()]);
    let (s, c) = pair(
        move |tcp| SecureStream::server_with(tcp, &key(4), &scfg).map(|_| ()),
        move |tcp| SecureStream::client_with(tcp, &key(4), &ccfg).map(|_| ()),
    );
    match s {
        Err(WireError::Authentication(why)) => {
            assert!(why.contains("not one this host accepts"), "{why}")
        }
        other => panic!("the backup let the intruder in: {other:?}"),
    }
    assert!(matches!(c, Err(WireError::Authentication(_))), "{c:?}");
}

#[test]
fn a_primary_talks_only_to_the_backup_it_was_given() {
    // An impostor backup with the key and its own identity, listing the
    // primary: the primary, expecting another backup, cannot finish.
    let (primary, backup, impostor) = (identity("p3"), identity("b3"), identity("i3"));
    let scfg = with_identity(&impostor, &[primary.public()]);
    let ccfg = with_identity(&primary, &[backup.public()]);
    let (s, c) = pair(
        move |tcp| SecureStream::server_with(tcp, &key(5), &scfg).map(|_| ()),
        move |tcp| SecureStream::client_with(tcp, &key(5), &ccfg).map(|_| ()),
    );
    assert!(s.is_err(), "the impostor completed a handshake");
    assert!(c.is_err(), "the primary accepted an impostor backup");
}

#[test]
fn identities_on_one_side_only_fail_both_sides() {
    let (primary, backup) = (identity("p4"), identity("b4"));
    let scfg = with_identity(&backup, &[primary.public()]);
    let (s, c) = pair(
        move |tcp| SecureStream::server_with(tcp, &key(6), &scfg).map(|_| ()),
        |tcp| SecureStream::client_with(tcp, &key(6), &quick()).map(|_| ()),
    );
    assert!(s.is_err() && c.is_err(), "{s:?} {c:?}");
    // And a wrong shared key with the right identities: the shared key
    // enters the second message, so the responder learns of it at the
    // first message it cannot read.
    let (primary, backup) = (identity("p5"), identity("b5"));
    let scfg = with_identity(&backup, &[primary.public()]);
    let ccfg = with_identity(&primary, &[backup.public()]);
    let (s, c) = pair(
        move |tcp| SecureStream::server_with(tcp, &key(7), &scfg).and_then(|mut s| s.recv()),
        move |tcp| SecureStream::client_with(tcp, &key(8), &ccfg).map(|_| ()),
    );
    assert!(s.is_err() && c.is_err(), "{s:?} {c:?}");
}

#[test]
fn public_keys_read_back_as_written() {
    let id = identity("p6");
    let text = id.public().to_string();
    assert_eq!(text.len(), 64);
    assert_eq!(text.parse::<rrc_wire::PublicKey>().unwrap(), id.public());
    assert!("zz".parse::<rrc_wire::PublicKey>().is_err());
}
