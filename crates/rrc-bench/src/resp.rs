//! A small Redis (RESP2) client: enough to drive and verify a server,
//! with no connection pool or async runtime between the request and the
//! clock; and the command for a Redis on the host for the benchmarks to
//! checkpoint.

use std::io::{self, BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// `redis-server` on 127.0.0.1:`port`, without persistence, `DEBUG`
/// allowed from the host, running in `work` and logging to
/// `work/redis.log`.
pub fn local_redis(port: u16, work: &std::path::Path) -> io::Result<std::process::Command> {
    let mut cmd = std::process::Command::new("redis-server");
    cmd.args([
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--enable-debug-command",
        "local",
    ])
    .current_dir(work)
    .stdin(std::process::Stdio::null())
    .stdout(std::fs::File::create(work.join("redis.log"))?)
    .stderr(std::process::Stdio::null());
    Ok(cmd)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Status(String),
    Error(String),
    Integer(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

pub struct RespConn {
    reader: BufReader<Box<dyn io::Read + Send>>,
    writer: TcpStream,
    out: Vec<u8>,
}

fn protocol_error(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

impl RespConn {
    pub fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<RespConn> {
        Self::connect_with(addr, timeout, |s| Box::new(s))
    }

    /// Connects, reading replies through what `reader` makes of the
    /// connection (a tap that keeps every byte received, say).
    pub fn connect_with(
        addr: SocketAddr,
        timeout: Duration,
        reader: impl FnOnce(TcpStream) -> Box<dyn io::Read + Send>,
    ) -> io::Result<RespConn> {
        let s = TcpStream::connect_timeout(&addr, timeout)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        Ok(RespConn {
            reader: BufReader::new(reader(s.try_clone()?)),
            writer: s,
            out: Vec::with_capacity(256),
        })
    }

    /// Sends one command and waits for its reply.
    pub fn command(&mut self, args: &[&[u8]]) -> io::Result<Reply> {
        self.send(args)?;
        self.read_reply()
    }

    /// Queues one command without waiting (for pipelining).
    pub fn send(&mut self, args: &[&[u8]]) -> io::Result<()> {
        self.out.clear();
        write!(self.out, "*{}\r\n", args.len())?;
        for a in args {
            write!(self.out, "${}\r\n", a.len())?;
            self.out.extend_from_slice(a);
            self.out.extend_from_slice(b"\r\n");
        }
        self.writer.write_all(&self.out)
    }

    pub fn read_reply(&mut self) -> io::Result<Reply> {
        let mut line = Vec::new();
        self.reader.read_until(b'\n', &mut line)?;
        if line.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "server closed the connection",
            ));
        }
        if !line.ends_with(b"\r\n") {
            return Err(protocol_error("reply line without CRLF"));
        }
        let body = &line[1..line.len() - 2];
        let text = || String::from_utf8_lossy(body).into_owned();
        let int = || -> io::Result<i64> {
            text()
                .parse()
                .map_err(|_| protocol_error(format!("bad integer {:?}", text())))
        };
        match line[0] {
            b'+' => Ok(Reply::Status(text())),
            b'-' => Ok(Reply::Error(text())),
            b':' => Ok(Reply::Integer(int()?)),
            b'$' => {
                let n = int()?;
                if n < 0 {
                    return Ok(Reply::Bulk(None));
                }
                let mut data = vec![0u8; n as usize + 2];
                io::Read::read_exact(&mut self.reader, &mut data)?;
                data.truncate(n as usize);
                Ok(Reply::Bulk(Some(data)))
            }
            b'*' => {
                let n = int()?;
                if n < 0 {
                    return Ok(Reply::Array(None));
                }
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.read_reply()?);
                }
                Ok(Reply::Array(Some(items)))
            }
            other => Err(protocol_error(format!(
                "unknown reply type {:?}",
                other as char
            ))),
        }
    }

    pub fn set(&mut self, key: &[u8], value: &[u8]) -> io::Result<()> {
        match self.command(&[b"SET", key, value])? {
            Reply::Status(s) if s == "OK" => Ok(()),
            other => Err(protocol_error(format!("SET answered {other:?}"))),
        }
    }

    pub fn get(&mut self, key: &[u8]) -> io::Result<Option<Vec<u8>>> {
        match self.command(&[b"GET", key])? {
            Reply::Bulk(v) => Ok(v),
            other => Err(protocol_error(format!("GET answered {other:?}"))),
        }
    }
}
