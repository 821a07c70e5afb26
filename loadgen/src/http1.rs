//! A lean HTTP/1.1 client for the runs: keep-alive connections to the server under test, each
//! request written with one `write`, each answer read by its `Content-Length`. The generator shares
//! the machine's two cores with the server, so what it spends the server does not get: through
//! reqwest (URL parsing, header maps, the pool, a task hop per request) it took about half its CPU in
//! its own user space.

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An answer: status and body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
}

/// A keep-alive connection and what it has read past the last answer.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

/// Connections to one server (`http://host:port`), reused and opened as needed.
pub struct Http1 {
    addr: SocketAddr,
    host: String,
    idle: Mutex<Vec<Conn>>,
}

/// Longest wait for one exchange.
const TIMEOUT: Duration = Duration::from_secs(120);
const MAX_HEAD: usize = 64 * 1024;

impl Http1 {
    pub fn new(base_url: &str) -> Result<Self> {
        let host = base_url
            .strip_prefix("http://")
            .with_context(|| format!("{base_url} is not an http:// URL"))?
            .trim_end_matches('/');
        Ok(Self {
            addr: host
                .parse()
                .with_context(|| format!("{host} is not ip:port"))?,
            host: host.to_owned(),
            idle: Mutex::new(Vec::new()),
        })
    }

    /// Opens `n` connections now, so the run starts warm.
    pub async fn warm_up(&self, n: usize) -> Result<()> {
        for _ in 0..n {
            let conn = self.open().await?;
            self.idle.lock().expect("not poisoned").push(conn);
        }
        Ok(())
    }

    /// `POST path` with these headers and body.
    pub async fn post(&self, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Result<Answer> {
        self.send("POST", path, headers, body).await
    }

    /// `GET path` (with its query) with these headers.
    pub async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Result<Answer> {
        self.send("GET", path, headers, b"").await
    }

    async fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<Answer> {
        let mut request = Vec::with_capacity(160 + body.len());
        let _ = write!(
            request,
            "{method} {path} HTTP/1.1\r\nhost: {}\r\ncontent-length: {}\r\n",
            self.host,
            body.len()
        );
        for (name, value) in headers {
            let _ = write!(request, "{name}: {value}\r\n");
        }
        request.extend_from_slice(b"\r\n");
        request.extend_from_slice(body);
        let idle = self.idle.lock().expect("not poisoned").pop();
        let exchange = async {
            // A kept connection the server closed while it sat idle (its header or idle timeout)
            // fails before any byte of an answer: the request was never read, so it is sent again on
            // a new connection, as HTTP clients do.
            if let Some(mut conn) = idle {
                match conn.exchange(&request).await {
                    Ok((answer, keep)) => return anyhow::Ok((answer, keep, conn)),
                    Err(_) if conn.buf.is_empty() => {}
                    Err(e) => return Err(e),
                }
            }
            let mut conn = self.open().await?;
            let (answer, keep) = conn.exchange(&request).await?;
            anyhow::Ok((answer, keep, conn))
        };
        let (answer, keep, conn) = tokio::time::timeout(TIMEOUT, exchange)
            .await
            .context("no answer within 120 s")??;
        if keep {
            self.idle.lock().expect("not poisoned").push(conn);
        }
        Ok(answer)
    }

    async fn open(&self) -> Result<Conn> {
        let stream = TcpStream::connect(self.addr).await?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            buf: Vec::with_capacity(4096),
        })
    }
}

impl Conn {
    /// Writes the request and reads one answer; also says whether the connection may be reused.
    async fn exchange(&mut self, request: &[u8]) -> Result<(Answer, bool)> {
        self.stream.write_all(request).await?;
        let head = loop {
            if let Some(head) = parse_head(&self.buf)? {
                break head;
            }
            if self.buf.len() > MAX_HEAD {
                bail!("an answer head over {MAX_HEAD} bytes");
            }
            self.fill().await?;
        };
        let end = head.len + head.body_len;
        while self.buf.len() < end {
            self.fill().await?;
        }
        let body = self.buf[head.len..end].to_vec();
        self.buf.drain(..end);
        // Requests are never pipelined: bytes beyond the answer mean the stream is out of step.
        let keep = !head.close && self.buf.is_empty();
        Ok((
            Answer {
                status: head.status,
                body,
            },
            keep,
        ))
    }

    async fn fill(&mut self) -> Result<()> {
        self.buf.reserve(4096);
        if self.stream.read_buf(&mut self.buf).await? == 0 {
            bail!("the server closed the connection");
        }
        Ok(())
    }
}

/// What an answer's head says.
#[derive(Debug, PartialEq, Eq)]
struct Head {
    status: u16,
    /// Bytes of the head itself.
    len: usize,
    /// `Content-Length` (0 for 1xx, 204 and 304 without one).
    body_len: usize,
    /// `Connection: close`.
    close: bool,
}

/// The head, once `buf` holds all of it.
fn parse_head(buf: &[u8]) -> Result<Option<Head>> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    let len = match response.parse(buf)? {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => return Ok(None),
    };
    let (mut length, mut close) = (None, false);
    for h in response.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            length = Some(std::str::from_utf8(h.value)?.trim().parse::<usize>()?);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            bail!("a chunked answer (only Content-Length is read)");
        } else if h.name.eq_ignore_ascii_case("connection") {
            close |= std::str::from_utf8(h.value)
                .unwrap_or("")
                .split(',')
                .any(|token| token.trim().eq_ignore_ascii_case("close"));
        }
    }
    // HTTP/1.0 closes unless asked otherwise.
    close |= response.version == Some(0);
    let status = response.code.context("an answer without a status")?;
    let body_len = match length {
        Some(n) => n,
        None if status == 204 || status == 304 || status < 200 => 0,
        None => bail!("an answer without Content-Length (only Content-Length is read)"),
    };
    Ok(Some(Head {
        status,
        len,
        body_len,
        close,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_is_read_with_its_length_and_connection() {
        let full = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";
        let head = |status, len, body_len, close| {
            Some(Head {
                status,
                len,
                body_len,
                close,
            })
        };
        assert_eq!(parse_head(full).unwrap(), head(200, 38, 2, false));
        assert_eq!(parse_head(&full[..20]).unwrap(), None);
        let closing =
            b"HTTP/1.1 413 Payload Too Large\r\nConnection: close\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(
            parse_head(closing).unwrap(),
            head(413, closing.len(), 0, true)
        );
        assert!(parse_head(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n").is_err());
        assert!(parse_head(b"HTTP/1.1 200 OK\r\n\r\n").is_err(), "no length");
        let listed = b"HTTP/1.1 204 No Content\r\nConnection: keep-alive, Close\r\n\r\n";
        assert_eq!(
            parse_head(listed).unwrap(),
            head(204, listed.len(), 0, true)
        );
        let old = b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(parse_head(old).unwrap(), head(200, old.len(), 0, true));
    }
}
