//! The front door: accepts connections, serves event streams itself and everything else
//! through hyper.
//!
//! An event stream is a long, mostly idle response, and a server holds thousands. hyper
//! keeps an 8 KiB read buffer and an 8 KiB write buffer for every connection as long as it
//! lives: most of what an idle stream would cost. So a connection whose first bytes are a
//! GET of an event stream (`/notifications/…`, `/v1/groups/…`) is read here, its request
//! goes through the same router (routes, Host check, auth), and the response is written
//! chunked on a connection that closes after it. Peeking consumes nothing, so hyper sees
//! every other connection whole.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, HttpBody as _};
use bytes::Buf;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

/// Headers about the connection and the body's length, which this module writes itself.
const FRAMING_HEADERS: [http::HeaderName; 5] = [
    http::header::CONTENT_LENGTH,
    http::header::TRANSFER_ENCODING,
    http::header::CONNECTION,
    http::HeaderName::from_static("keep-alive"),
    http::header::UPGRADE,
];

/// How requests for event streams begin.
const STREAM_REQUESTS: [&[u8]; 2] = [b"GET /notifications/", b"GET /v1/groups/"];
/// The longest request head read here (a bearer token and the usual headers fit many times).
const MAX_HEAD: usize = 16 * 1024;
const MAX_HEADERS: usize = 64;
/// The address a request came from, among its extensions (see `app::client_behind_proxy`
/// for a server behind a reverse proxy).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub std::net::IpAddr);

/// A client gets this long to send its request head (the next one too, on a kept-alive
/// connection), and to take each write; a connection with no traffic either way for twice
/// as long is closed.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub client: Duration,
}

impl Timeouts {
    fn idle(self) -> Duration {
        self.client * 2
    }
}

/// Serves `app` on `listener` until `shutdown`, then waits for open connections to finish
/// (event streams end on `shutdown` by themselves).
pub async fn serve(listener: TcpListener, app: Router, shutdown: CancellationToken, timeouts: Timeouts) -> io::Result<()> {
    let connections = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let tcp = match accepted {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                // out of descriptors, say: wait for some to close instead of spinning
                tracing::warn!(error = %e, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // small SSE frames must not wait for the client's delayed ACK
        let _ = tcp.set_nodelay(true);
        connections.spawn(connection(tcp, app.clone(), shutdown.clone(), timeouts));
    }
    drop(listener);
    connections.close();
    connections.wait().await;
    Ok(())
}

async fn connection(tcp: TcpStream, app: Router, shutdown: CancellationToken, timeouts: Timeouts) {
    let mut start = [0u8; 20];
    let peeked = tokio::select! {
        _ = shutdown.cancelled() => return,
        peeked = tokio::time::timeout(timeouts.client, tcp.peek(&mut start)) => peeked,
    };
    let n = match peeked {
        Ok(Ok(n)) if n > 0 => n,
        _ => return, // closed, failed, or silent
    };
    if STREAM_REQUESTS.iter().any(|r| start[..n].starts_with(r)) {
        if let Err(e) = serve_stream(tcp, app, &shutdown, timeouts).await {
            tracing::debug!(error = %e, "event stream connection ended");
        }
    } else {
        serve_with_hyper(tcp, app, shutdown, timeouts).await;
    }
}

async fn serve_with_hyper(tcp: TcpStream, app: Router, shutdown: CancellationToken, timeouts: Timeouts) {
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // without a timer hyper silently drops its header timeout: a client sending half a
    // request head (or nothing after a response) would hold the connection forever
    builder.http1().timer(TokioTimer::new()).header_read_timeout(timeouts.client);
    builder.http2().timer(TokioTimer::new()).keep_alive_interval(timeouts.client).keep_alive_timeout(timeouts.client);
    let client = tcp.peer_addr().ok().map(|a| ClientAddr(a.ip()));
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Watched { io: tcp, activity: activity.clone() });
    let app = app.map_request(move |mut request: http::Request<_>| {
        if let Some(client) = client {
            request.extensions_mut().insert(client);
        }
        request
    });
    let conn = builder.serve_connection_with_upgrades(io, TowerToHyperService::new(app));
    tokio::pin!(conn);
    // what hyper's timers do not cover (a stalled body, HTTP/2, the protocol sniff): no
    // bytes either way for this long ends the connection; streamed responses heartbeat
    let idle = timeouts.idle();
    let served = loop {
        tokio::select! {
            served = conn.as_mut() => break served,
            _ = shutdown.cancelled() => {
                conn.as_mut().graceful_shutdown();
                break conn.await;
            }
            () = tokio::time::sleep_until(activity.last() + idle) => {
                if activity.last().elapsed() >= idle {
                    tracing::debug!("closing a connection silent for {idle:?}");
                    return;
                }
            }
        }
    };
    if let Err(e) = served {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// When a connection last moved bytes.
struct Activity {
    start: tokio::time::Instant,
    /// Milliseconds after `start`.
    last: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self { start: tokio::time::Instant::now(), last: AtomicU64::new(0) }
    }

    fn touch(&self) {
        self.last.store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn last(&self) -> tokio::time::Instant {
        self.start + Duration::from_millis(self.last.load(Ordering::Relaxed))
    }
}

/// A connection that notes in [`Activity`] whenever bytes move.
struct Watched {
    io: TcpStream,
    activity: Arc<Activity>,
}

impl tokio::io::AsyncRead for Watched {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut tokio::io::ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl tokio::io::AsyncWrite for Watched {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// One event-stream request and its response, then the connection closes.
async fn serve_stream(tcp: TcpStream, app: Router, shutdown: &CancellationToken, timeouts: Timeouts) -> io::Result<()> {
    let client = tcp.peer_addr().ok().map(|a| ClientAddr(a.ip()));
    let (mut reader, mut writer) = tcp.into_split();
    // boxed, so the head's parsing state is not part of the long-lived stream future
    let head = tokio::select! {
        _ = shutdown.cancelled() => return Ok(()),
        head = Box::pin(read_request(&mut reader, timeouts.client)) => head?,
    };
    let (response, chunked) = match head {
        Ok(mut request) => {
            if let Some(client) = client {
                request.extensions_mut().insert(client);
            }
            let chunked = request.version() != http::Version::HTTP_10;
            (app.oneshot(request).await.unwrap_or_else(|never| match never {}), chunked)
        }
        Err(status) => {
            let response = http::Response::builder().status(status).body(Body::from(format!("{status}\n")));
            (response.expect("a valid response"), false)
        }
    };
    let written = write_response(&mut reader, &mut writer, response, chunked, timeouts.client).await;
    match written {
        Ok(()) => {
            // closing with unread input would reset the connection, and the answer with it
            let _ = writer.shutdown().await;
            let mut sink = tokio::io::sink();
            let _ = tokio::time::timeout(Duration::from_secs(1), tokio::io::copy(&mut reader, &mut sink)).await;
        }
        // no clean end (FIN) after a failure: the close resets
        Err(_) => writer.forget(),
    }
    written
}

/// Reads and parses a request head; a status to answer with when it is not one.
async fn read_request(reader: &mut OwnedReadHalf, timeout: Duration) -> io::Result<Result<http::Request<Body>, http::StatusCode>> {
    let mut buf = Vec::with_capacity(1024);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if buf.len() >= MAX_HEAD {
            return Ok(Err(http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE));
        }
        buf.reserve(1024.min(MAX_HEAD - buf.len()));
        let read = tokio::time::timeout_at(deadline, reader.read_buf(&mut buf)).await;
        match read {
            Err(_) => return Ok(Err(http::StatusCode::REQUEST_TIMEOUT)),
            Ok(Err(e)) => return Err(e),
            Ok(Ok(0)) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(Ok(_)) => {}
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut head = httparse::Request::new(&mut headers);
        match head.parse(&buf) {
            Ok(httparse::Status::Partial) => continue,
            Ok(httparse::Status::Complete(_)) => return Ok(to_request(&head).ok_or(http::StatusCode::BAD_REQUEST)),
            Err(_) => return Ok(Err(http::StatusCode::BAD_REQUEST)),
        }
    }
}

fn to_request(head: &httparse::Request) -> Option<http::Request<Body>> {
    let version = if head.version? == 0 { http::Version::HTTP_10 } else { http::Version::HTTP_11 };
    let mut request = http::Request::builder().method(head.method?).uri(head.path?).version(version);
    for h in head.headers.iter() {
        request = request.header(h.name, h.value);
    }
    request.body(Body::empty()).ok()
}

/// Writes the head, then the body as it comes; stops as soon as the client hangs up.
async fn write_response(
    reader: &mut OwnedReadHalf,
    writer: &mut OwnedWriteHalf,
    response: http::Response<Body>,
    chunked: bool,
    timeout: Duration,
) -> io::Result<()> {
    let (parts, mut body) = response.into_parts();
    let length = body.size_hint().exact();
    let mut head = format!("HTTP/1.1 {} {}\r\n", parts.status.as_str(), parts.status.canonical_reason().unwrap_or("")).into_bytes();
    for (name, value) in &parts.headers {
        // framing is ours to say, once
        if FRAMING_HEADERS.contains(name) {
            continue;
        }
        for part in [name.as_str().as_bytes(), b": ", value.as_bytes(), b"\r\n"] {
            head.extend_from_slice(part);
        }
    }
    let chunked = chunked && length.is_none();
    match length {
        Some(n) => head.extend_from_slice(format!("content-length: {n}\r\n").as_bytes()),
        None if chunked => head.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        None => {}
    }
    head.extend_from_slice(b"connection: close\r\n\r\n");
    send(writer, &head[..], timeout).await?;
    loop {
        // the next frame, unless the client hangs up first
        let frame = std::future::poll_fn(|cx| match Pin::new(&mut body).poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(Some(frame)),
            Poll::Pending => poll_hung_up(reader, cx).map(|()| None),
        });
        let Some(frame) = frame.await else { return Ok(()) };
        let data = match frame {
            None => break,
            Some(Err(e)) => {
                tracing::warn!(error = %e, "an event stream's body failed; resetting the connection");
                // a reset, not a clean end: an HTTP/1.0 client would take a cut body as whole
                let _ = writer.as_ref().set_zero_linger();
                return Err(io::Error::other(e));
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) if !data.is_empty() => data,
                _ => continue, // trailers, or nothing
            },
        };
        // A replay's frames are all ready at once and most writes skip tokio's own budget
        // (see `send`): spend it here, so a long catch-up yields to the worker's other tasks.
        tokio::task::coop::consume_budget().await;
        if chunked {
            // size, data and end in one write, the data not copied
            let mut size = [0u8; 18];
            let size = chunk_size_line(data.len(), &mut size);
            send(writer, Buf::chain(size, &data[..]).chain(&b"\r\n"[..]), timeout).await?;
        } else {
            send(writer, &data[..], timeout).await?;
        }
    }
    if chunked {
        send(writer, &b"0\r\n\r\n"[..], timeout).await?;
    }
    writer.flush().await
}

/// A chunk's size line: the length in hex, then CRLF.
fn chunk_size_line(len: usize, buf: &mut [u8; 18]) -> &[u8] {
    let digits = (usize::BITS - len.leading_zeros()).div_ceil(4).max(1) as usize;
    for (i, digit) in buf[..digits].iter_mut().rev().enumerate() {
        *digit = b"0123456789abcdef"[(len >> (4 * i)) & 0xf];
    }
    buf[digits..digits + 2].copy_from_slice(b"\r\n");
    &buf[..digits + 2]
}

/// One write, given up on when the client takes no data for `timeout`.
async fn send(writer: &mut OwnedWriteHalf, mut bytes: impl Buf, timeout: Duration) -> io::Result<()> {
    // Nearly every write fits the socket's buffer at once: no timer for those.
    while bytes.has_remaining() {
        let mut slices = [io::IoSlice::new(&[]); 4];
        let filled = bytes.chunks_vectored(&mut slices);
        match writer.try_write_vectored(&slices[..filled]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(written) => bytes.advance(written),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    if !bytes.has_remaining() {
        return Ok(());
    }
    tokio::time::timeout(timeout, writer.write_all_buf(&mut bytes))
        .await
        .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "the client stopped reading")))
}

/// Ready when the client closes its side, breaks the connection, or sends anything: a
/// stream's client has nothing more to say, and the connection ends with the response.
/// (Polled in place: no waiter registered anew for each frame.)
fn poll_hung_up(reader: &OwnedReadHalf, cx: &mut Context<'_>) -> Poll<()> {
    let mut byte = [0u8; 1];
    loop {
        match reader.as_ref().poll_read_ready(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(_)) => return Poll::Ready(()),
            Poll::Ready(Ok(())) => match reader.try_read(&mut byte) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                _ => return Poll::Ready(()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_size_lines_are_lowercase_hex() {
        let mut buf = [0u8; 18];
        for (len, line) in [(0, "0"), (10, "a"), (500, "1f4"), (0xffff_ffff, "ffffffff")] {
            assert_eq!(chunk_size_line(len, &mut buf), format!("{line}\r\n").as_bytes());
        }
    }
}
