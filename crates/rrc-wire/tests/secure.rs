//! The secure channel over real TCP on the loopback interface.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use rrc_wire::{Key, Message, Role, SecureConfig, SecureStream, WireError};

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
        start.elapsed() < Duration::from_secs(2),
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
    assert!(start.elapsed() < Duration::from_secs(2));

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
    assert!(start.elapsed() < Duration::from_secs(2));
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

/// Forwards client<->server, flipping one byte inside the body of the first
/// transport message the client sends.
fn tampering_proxy(server: std::net::SocketAddr) -> std::net::SocketAddr {
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
        let mut forward_message = |flip: Option<usize>| -> std::io::Result<()> {
            let mut len = [0u8; 2];
            from_client.read_exact(&mut len)?;
            let mut body = vec![0u8; usize::from(u16::from_le_bytes(len))];
            from_client.read_exact(&mut body)?;
            if let Some(i) = flip {
                body[i] ^= 0x01;
            }
            to_server.write_all(&len)?;
            to_server.write_all(&body)
        };
        // Handshake message untouched, first transport message damaged.
        forward_message(None).unwrap();
        forward_message(Some(5)).unwrap();
        let _ = std::io::copy(&mut from_client, &mut to_server);
        let _ = to_server.shutdown(Shutdown::Write);
    });
    addr
}

#[test]
fn flipped_byte_in_transit_is_detected() {
    let l = listener();
    let server_addr = l.local_addr().unwrap();
    let proxy = tampering_proxy(server_addr);
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
