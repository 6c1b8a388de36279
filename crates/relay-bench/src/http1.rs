//! Plain HTTP/1.1 for the bench's own traffic: keep-alive POSTs for tool calls and the
//! chunked bodies that replies and event streams come in.
//!
//! The bench shares its cores with the server it measures, so every microsecond its client
//! spends is taken from the server. A general client (reqwest) spent about as much CPU per
//! tool call as the server did; this one writes a request and reads its reply on the
//! caller's task, with nothing between.

use std::fmt::Write as _;
use std::io::ErrorKind;
use std::sync::Mutex;

use anyhow::{Context, Result, bail, ensure};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The longest response head accepted.
const MAX_HEAD: usize = 16 * 1024;

/// `host:port` of an `http://host:port[/path]` URL.
pub fn authority(url: &str) -> Result<&str> {
    let rest = url.strip_prefix("http://").with_context(|| format!("{url}: the bench speaks plain http:// only"))?;
    Ok(rest.split('/').next().unwrap_or(rest))
}

pub async fn connect(authority: &str) -> Result<TcpStream> {
    let tcp = TcpStream::connect(authority).await.with_context(|| format!("connect to {authority}"))?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

/// A response head, as far as the bench cares.
pub struct Head {
    pub status: u16,
    /// Bytes the head took.
    pub len: usize,
    pub headers: Vec<(String, Vec<u8>)>,
    /// Whether the connection can carry another request afterwards.
    pub keep_alive: bool,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_slice())
    }

    pub fn chunked(&self) -> bool {
        self.header("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().ends_with(b"chunked"))
    }

    pub fn content_length(&self) -> Result<Option<usize>> {
        let Some(v) = self.header("content-length") else { return Ok(None) };
        Ok(Some(std::str::from_utf8(v)?.trim().parse().context("bad content-length")?))
    }
}

/// Reads from `tcp` into `raw` until it holds a whole response head; `None` if the
/// connection closed before sending anything.
pub async fn read_head(tcp: &mut TcpStream, raw: &mut Vec<u8>) -> Result<Option<Head>> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        if let httparse::Status::Complete(len) = response.parse(raw)? {
            let headers: Vec<_> = response.headers.iter().map(|h| (h.name.to_owned(), h.value.to_vec())).collect();
            let close = headers.iter().any(|(n, v)| n.eq_ignore_ascii_case("connection") && v.eq_ignore_ascii_case(b"close"));
            let keep_alive = response.version == Some(1) && !close;
            return Ok(Some(Head { status: response.code.unwrap_or(0), len, headers, keep_alive }));
        }
        ensure!(raw.len() < MAX_HEAD, "response head too long");
        raw.reserve(4096);
        if tcp.read_buf(raw).await? == 0 {
            if raw.is_empty() {
                return Ok(None);
            }
            bail!("the connection closed inside a response head");
        }
    }
}

/// Decodes a chunked body as its bytes come.
#[derive(Default)]
pub struct Chunked {
    /// Bytes left in the current chunk, or `None` before a chunk's size line.
    left: Option<usize>,
    /// A chunk's data was read; its CRLF is next.
    after_chunk: bool,
}

impl Chunked {
    /// Moves what `raw` holds of the body into `body`; false once the last chunk is read.
    pub fn decode(&mut self, raw: &mut Vec<u8>, body: &mut Vec<u8>) -> Result<bool> {
        loop {
            if self.after_chunk {
                if raw.len() < 2 {
                    return Ok(true);
                }
                ensure!(raw.starts_with(b"\r\n"), "a chunk does not end with CRLF");
                raw.drain(..2);
                self.after_chunk = false;
            }
            match &mut self.left {
                Some(n) => {
                    let take = (*n).min(raw.len());
                    body.extend(raw.drain(..take));
                    *n -= take;
                    if *n > 0 {
                        return Ok(true);
                    }
                    self.left = None;
                    self.after_chunk = true;
                }
                None => {
                    let Some(end) = raw.windows(2).position(|w| w == b"\r\n") else {
                        ensure!(raw.len() < 1024, "a chunk size line is too long");
                        return Ok(true);
                    };
                    let line = std::str::from_utf8(&raw[..end])?;
                    let size = line.split(';').next().unwrap_or_default().trim();
                    let size = usize::from_str_radix(size, 16).with_context(|| format!("bad chunk size {size:?}"))?;
                    raw.drain(..end + 2);
                    if size == 0 {
                        // the trailer section: nothing, or fields the bench ignores, then CRLF
                        return Ok(false);
                    }
                    self.left = Some(size);
                }
            }
        }
    }
}

/// A whole reply.
pub struct Reply {
    pub head: Head,
    pub body: Vec<u8>,
}

/// Connections to one server, kept open between requests; one per concurrent caller.
pub struct Pool {
    authority: String,
    idle: Mutex<Vec<TcpStream>>,
}

impl Pool {
    pub fn new(url: &str) -> Result<Self> {
        Ok(Self { authority: authority(url)?.to_owned(), idle: Mutex::new(Vec::new()) })
    }

    /// `POST path` with `headers` (whole lines, each ending in CRLF) and `body`.
    pub async fn post(&self, path: &str, headers: &str, body: &[u8]) -> Result<Reply> {
        let mut request = String::with_capacity(256 + headers.len());
        write!(request, "POST {path} HTTP/1.1\r\nhost: {}\r\ncontent-length: {}\r\n{headers}\r\n", self.authority, body.len())?;
        let mut request = request.into_bytes();
        request.extend_from_slice(body);

        let pooled = self.idle.lock().expect("pool lock").pop();
        if let Some(mut tcp) = pooled {
            // A kept-alive connection the server has since closed says so before any reply
            // byte; then, and only then, the request is sent again. (A server that crashed
            // after taking the request whole would see it twice: a bench can live with that.)
            if let Some(reply) = exchange(&mut tcp, &request).await? {
                return Ok(self.keep(reply, tcp));
            }
        }
        let mut tcp = connect(&self.authority).await?;
        let reply = exchange(&mut tcp, &request).await?.context("the server closed the connection without a reply")?;
        Ok(self.keep(reply, tcp))
    }

    fn keep(&self, reply: Reply, tcp: TcpStream) -> Reply {
        if reply.head.keep_alive {
            self.idle.lock().expect("pool lock").push(tcp);
        }
        reply
    }
}

/// Sends `request` and reads its reply; `None` if the connection closed before replying.
async fn exchange(tcp: &mut TcpStream, request: &[u8]) -> Result<Option<Reply>> {
    let closed = |e: &std::io::Error| matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset);
    match tcp.write_all(request).await {
        Err(e) if closed(&e) => return Ok(None),
        written => written?,
    }
    let mut raw = Vec::with_capacity(4096);
    let mut interim = false;
    let mut head = loop {
        let head = match read_head(tcp, &mut raw).await {
            Err(e) if raw.is_empty() && !interim && e.downcast_ref().is_some_and(closed) => return Ok(None),
            head => head?,
        };
        let Some(head) = head else {
            ensure!(!interim, "the connection closed after an interim response");
            return Ok(None);
        };
        raw.drain(..head.len);
        // 100 Continue, 103 Early Hints: the reply is still to come
        if !(100..200).contains(&head.status) {
            break head;
        }
        interim = true;
    };
    // the body: decoded into a buffer of its own when chunked, else what follows the head
    let body = if matches!(head.status, 204 | 304) {
        head.keep_alive &= raw.is_empty();
        Vec::new()
    } else if head.chunked() {
        let (mut chunked, mut body) = (Chunked::default(), Vec::with_capacity(raw.len()));
        while chunked.decode(&mut raw, &mut body)? {
            raw.reserve(4096);
            ensure!(tcp.read_buf(&mut raw).await? > 0, "the connection closed inside a chunked body");
        }
        // anything after the last chunk (trailers) would confuse the next reply
        head.keep_alive &= raw == b"\r\n";
        body
    } else if let Some(n) = head.content_length()? {
        while raw.len() < n {
            raw.reserve(n - raw.len());
            ensure!(tcp.read_buf(&mut raw).await? > 0, "the connection closed inside a body");
        }
        head.keep_alive &= raw.len() == n;
        raw.truncate(n);
        raw
    } else {
        while tcp.read_buf(&mut raw).await? > 0 {}
        head.keep_alive = false;
        raw
    };
    Ok(Some(Reply { head, body }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// Answers each request on each connection with the next of `replies`; closes a
    /// connection after `per_connection` replies.
    async fn server(replies: Vec<&'static [u8]>, per_connection: usize) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/mcp", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let mut replies = replies.into_iter();
            loop {
                let (mut tcp, _) = listener.accept().await.unwrap();
                for _ in 0..per_connection {
                    let mut request = vec![0u8; 4096];
                    if tcp.read(&mut request).await.unwrap() == 0 {
                        break;
                    }
                    let Some(reply) = replies.next() else { return };
                    tcp.write_all(reply).await.unwrap();
                }
            }
        });
        url
    }

    #[tokio::test]
    async fn reads_sized_chunked_and_closing_replies_and_reuses_connections() {
        let url = server(
            vec![
                b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello",
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
                b"HTTP/1.1 201 Created\r\nx-id: 7\r\nconnection: close\r\n\r\nlast",
            ],
            4,
        )
        .await;
        let pool = Pool::new(&url).unwrap();
        let first = pool.post("/mcp", "", b"{}").await.unwrap();
        assert_eq!((first.head.status, first.body.as_slice()), (200, b"hello".as_slice()));
        let second = pool.post("/mcp", "", b"{}").await.unwrap();
        assert_eq!(second.body, b"abcde");
        assert_eq!(pool.idle.lock().unwrap().len(), 1, "a framed reply keeps the connection");
        let empty = pool.post("/mcp", "", b"{}").await.unwrap();
        assert_eq!((empty.head.status, empty.body.len()), (204, 0), "past the interim reply, a 204 has no body");
        let third = pool.post("/mcp", "", b"{}").await.unwrap();
        assert_eq!((third.head.status, third.head.header("X-Id"), third.body.as_slice()), (201, Some(&b"7"[..]), &b"last"[..]));
        assert!(pool.idle.lock().unwrap().is_empty(), "connection: close is honoured");
    }

    #[tokio::test]
    async fn a_kept_connection_the_server_closed_is_replaced() {
        let url = server(vec![b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\na", b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nb"], 1).await;
        let pool = Pool::new(&url).unwrap();
        assert_eq!(pool.post("/mcp", "", b"").await.unwrap().body, b"a");
        assert_eq!(pool.post("/mcp", "", b"").await.unwrap().body, b"b");
    }

    #[tokio::test]
    async fn a_cut_reply_is_an_error() {
        let url = server(vec![b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort"], 1).await;
        let Err(e) = Pool::new(&url).unwrap().post("/mcp", "", b"").await else { panic!("a cut body was taken whole") };
        assert!(e.to_string().contains("inside a body"), "{e}");
        assert!(Pool::new("https://example.com/mcp").is_err());
    }
}
