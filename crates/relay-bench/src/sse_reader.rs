//! A lean reader of SSE streams over plain HTTP/1.1.
//!
//! The fan-out and idle scenarios hold hundreds to thousands of streams on the same cores
//! as the server they measure. A general HTTP client spent as much CPU per event as the
//! server did (two task hops and a JSON parse each, ~18 µs on the 2-vCPU machine), and on
//! two cores that CPU is taken from the server and counted as its latency. This reader
//! does one read per arrival, notes the time before doing anything else, and hands each
//! event's data to the caller as bytes.
//!
//! Streams are read either each on its own task ([`SseReader::run`]) or all together by
//! one thread that polls them ([`poll_streams`], Linux): see there for why.

use std::time::Instant;

use anyhow::{Result, bail, ensure};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::http1::{self, Chunked};

/// An open event stream whose response head has been read and accepted.
pub struct SseReader {
    tcp: TcpStream,
    events: SseDecoder,
}

/// Turns a stream's body, as it arrives, into events.
pub struct SseDecoder {
    /// Bytes read from the socket, not yet decoded.
    raw: Vec<u8>,
    /// Decoded body, not yet split into lines.
    body: Vec<u8>,
    /// `None`: the body lasts until the connection closes.
    chunked: Option<Chunked>,
    /// The `data:` lines of the event being read, joined by newlines.
    data: Vec<u8>,
}

impl SseReader {
    /// `GET {path}` on `base` (`http://host:port`) with a bearer token; fails unless the
    /// server answers 200 with an event stream.
    pub async fn open(base: &str, path: &str, token: &str) -> Result<Self> {
        let authority = http1::authority(base)?;
        let mut tcp = http1::connect(authority).await?;
        let request =
            format!("GET {path} HTTP/1.1\r\nhost: {authority}\r\nauthorization: Bearer {token}\r\naccept: text/event-stream\r\n\r\n");
        tcp.write_all(request.as_bytes()).await?;
        let mut raw = Vec::with_capacity(4096);
        let Some(head) = http1::read_head(&mut tcp, &mut raw).await? else {
            bail!("stream {path}: closed before the response head");
        };
        ensure!(head.status == 200, "stream {path}: HTTP {}", head.status);
        ensure!(
            head.header("content-type").is_some_and(|v| v.to_ascii_lowercase().starts_with(b"text/event-stream")),
            "stream {path}: not an event stream"
        );
        let chunked = head.chunked().then(Chunked::default);
        raw.drain(..head.len);
        Ok(Self { tcp, events: SseDecoder { raw, body: Vec::new(), chunked, data: Vec::new() } })
    }

    /// Reads until the stream ends, calling `on_event` with each event's data and when its
    /// bytes arrived. Ends with an error if the framing is broken.
    pub async fn run(mut self, mut on_event: impl FnMut(&[u8], Instant)) -> Result<()> {
        let mut arrived = Instant::now();
        loop {
            if self.events.decode(&mut on_event, arrived)? {
                return Ok(());
            }
            self.events.raw.reserve(4096);
            if self.tcp.read_buf(&mut self.events.raw).await? == 0 {
                return self.events.closed();
            }
            arrived = Instant::now();
        }
    }
}

impl SseDecoder {
    /// Hands out the events in the bytes read so far; whether the body has ended.
    fn decode(&mut self, on_event: &mut impl FnMut(&[u8], Instant), arrived: Instant) -> Result<bool> {
        let ended = match &mut self.chunked {
            Some(chunked) => !chunked.decode(&mut self.raw, &mut self.body)?,
            None => {
                self.body.append(&mut self.raw);
                false
            }
        };
        self.dispatch_lines(on_event, arrived);
        Ok(ended)
    }

    /// The connection closed: the end of a body that lasts until then, or else a cut one.
    fn closed(&self) -> Result<()> {
        match self.chunked {
            None => Ok(()),
            Some(_) => bail!("the stream closed inside its chunked body"),
        }
    }

    /// Splits `body` into SSE lines; a blank line ends an event that had data.
    fn dispatch_lines(&mut self, on_event: &mut impl FnMut(&[u8], Instant), arrived: Instant) {
        let mut start = 0;
        while let Some(len) = self.body[start..].iter().position(|&b| b == b'\n') {
            let line = &self.body[start..start + len];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.is_empty() {
                if !self.data.is_empty() {
                    on_event(&self.data, arrived);
                    self.data.clear();
                }
            } else if let Some(value) = line.strip_prefix(b"data:") {
                if !self.data.is_empty() {
                    self.data.push(b'\n');
                }
                self.data.extend_from_slice(value.strip_prefix(b" ").unwrap_or(value));
            }
            start += len + 1;
        }
        self.body.drain(..start);
    }
}

/// Reads every stream on the calling thread until `stop` is set or all have ended,
/// calling `on_event` with the stream's index, each event's data and when its bytes
/// arrived.
///
/// A write to a socket whose reader sleeps must wake it, and on a virtual machine waking a
/// thread on another core takes an interrupt through the hypervisor, paid by the writer:
/// in the fan-out it was some 40% of the server's CPU per delivery, a cost a reader on
/// another machine never puts on the server. So after each arrival this thread goes on
/// polling, without sleeping, for `spin`: a burst of deliveries finds it awake, and only
/// the burst's first has to wake it. It sleeps between bursts, so it costs its core little.
// (long: one hot loop, kept in one piece so what it does per arrival is visible at once)
#[cfg(target_os = "linux")]
pub fn poll_streams(
    readers: Vec<SseReader>,
    spin: std::time::Duration,
    stop: &std::sync::atomic::AtomicBool,
    mut on_event: impl FnMut(usize, &[u8], Instant),
) -> Result<()> {
    use std::io::{ErrorKind, Read};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::sync::atomic::Ordering;

    // SAFETY: epoll_create1 returns a new descriptor or -1; the OwnedFd closes it.
    let epoll = match unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) } {
        -1 => return Err(std::io::Error::last_os_error().into()),
        fd => unsafe { OwnedFd::from_raw_fd(fd) },
    };
    // One stream's broken framing ends that stream, not the others; the first such error
    // is the outcome.
    let mut failure: Option<anyhow::Error> = None;
    let mut fail = |index: usize, e: anyhow::Error| {
        failure.get_or_insert(e.context(format!("stream {index}")));
    };
    let mut streams = Vec::with_capacity(readers.len());
    let mut open = 0;
    for (index, reader) in readers.into_iter().enumerate() {
        // still non-blocking, as tokio left it
        let tcp = reader.tcp.into_std()?;
        let mut events = reader.events;
        // what came with the response head
        let ended = events.decode(&mut |data, at| on_event(index, data, at), Instant::now()).unwrap_or_else(|e| {
            fail(index, e);
            true
        });
        if !ended {
            let mut interest = libc::epoll_event { events: (libc::EPOLLIN | libc::EPOLLRDHUP) as u32, u64: index as u64 };
            // SAFETY: both descriptors are open; the kernel copies `interest`.
            if unsafe { libc::epoll_ctl(epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, tcp.as_raw_fd(), &mut interest) } != 0 {
                return Err(std::io::Error::last_os_error().into());
            }
            open += 1;
        }
        streams.push((tcp, events, ended));
    }
    let mut ready = vec![libc::epoll_event { events: 0, u64: 0 }; streams.len().clamp(1, 1024)];
    let mut buf = vec![0u8; 64 * 1024];
    let mut last_arrival = Instant::now();
    while open > 0 && !stop.load(Ordering::Relaxed) {
        // poll while a burst may be under way; otherwise sleep, waking to check `stop`
        let timeout_ms = if last_arrival.elapsed() < spin { 0 } else { 20 };
        // SAFETY: `ready` has room for the count passed.
        let n = unsafe { libc::epoll_wait(epoll.as_raw_fd(), ready.as_mut_ptr(), ready.len() as i32, timeout_ms) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            return Err(e.into());
        }
        for event in &ready[..n as usize] {
            let index = event.u64 as usize;
            let (tcp, events, ended) = &mut streams[index];
            if *ended {
                continue;
            }
            // read until the socket is drained; whether the stream has ended
            let drained = loop {
                match tcp.read(&mut buf) {
                    Ok(0) => break events.closed().map(|()| true),
                    Ok(got) => {
                        let arrived = Instant::now();
                        last_arrival = arrived;
                        events.raw.extend_from_slice(&buf[..got]);
                        match events.decode(&mut |data, at| on_event(index, data, at), arrived) {
                            Ok(false) => {}
                            done => break done,
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break Ok(false),
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => break Err(e.into()),
                }
            };
            *ended = drained.unwrap_or_else(|e| {
                fail(index, e);
                true
            });
            if *ended {
                // SAFETY: both descriptors are open; a null event is allowed for DEL.
                unsafe { libc::epoll_ctl(epoll.as_raw_fd(), libc::EPOLL_CTL_DEL, tcp.as_raw_fd(), std::ptr::null_mut()) };
                open -= 1;
            }
        }
    }
    failure.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// Serves `response` to the first connection, in pieces of `piece` bytes.
    async fn serve(response: &'static [u8], piece: usize) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 1024];
            let _ = tcp.read(&mut request).await.unwrap();
            for part in response.chunks(piece) {
                tcp.write_all(part).await.unwrap();
                tcp.flush().await.unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
        });
        base
    }

    async fn events(response: &'static [u8], piece: usize) -> Result<Vec<String>> {
        let base = serve(response, piece).await;
        let mut got = Vec::new();
        SseReader::open(&base, "/s", "t").await?.run(|data, _| got.push(String::from_utf8(data.to_vec()).unwrap())).await?;
        Ok(got)
    }

    const CHUNKED: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n\
        a\r\nretry: 2\n\n\r\n\
        1e\r\nevent: message\ndata: {\"a\":1}\n\n\r\n\
        f\r\ndata: one\ndata:\r\n\
        b\r\n two\n\n: hi\n\r\n\
        0\r\n\r\n";

    #[tokio::test]
    async fn reads_events_whole_or_in_pieces() {
        for piece in [CHUNKED.len(), 1, 7] {
            assert_eq!(events(CHUNKED, piece).await.unwrap(), ["{\"a\":1}", "one\ntwo"], "piece {piece}");
        }
    }

    #[tokio::test]
    async fn reads_a_body_that_ends_with_the_connection() {
        let response = b"HTTP/1.0 200 OK\r\ncontent-type: text/event-stream\r\n\r\ndata: x\n\ndata: y\r\n\r\n";
        assert_eq!(events(response, 5).await.unwrap(), ["x", "y"]);
    }

    #[cfg(target_os = "linux")]
    async fn polled(responses: &[(&'static [u8], usize)]) -> Result<Vec<(usize, String)>> {
        let mut readers = Vec::new();
        for &(response, piece) in responses {
            readers.push(SseReader::open(&serve(response, piece).await, "/s", "t").await?);
        }
        let reading = tokio::task::spawn_blocking(move || {
            let stop = std::sync::atomic::AtomicBool::new(false);
            let mut got = Vec::new();
            let spin = std::time::Duration::from_micros(200);
            poll_streams(readers, spin, &stop, |i, data, _| got.push((i, String::from_utf8(data.to_vec()).unwrap())))?;
            Ok(got)
        });
        tokio::time::timeout(std::time::Duration::from_secs(10), reading).await.expect("the streams were read to their ends").unwrap()
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn one_thread_polls_many_streams_to_their_ends() {
        let close_delimited = b"HTTP/1.0 200 OK\r\ncontent-type: text/event-stream\r\n\r\ndata: x\n\ndata: y\r\n\r\n";
        let mut got = polled(&[(CHUNKED, 7), (close_delimited, 5), (CHUNKED, CHUNKED.len())]).await.unwrap();
        got.sort();
        let expected: Vec<(usize, String)> = [(0, "one\ntwo"), (0, "{\"a\":1}"), (1, "x"), (1, "y"), (2, "one\ntwo"), (2, "{\"a\":1}")]
            .into_iter()
            .map(|(i, d)| (i, d.to_owned()))
            .collect();
        assert_eq!(got, expected);
        // a broken stream is the outcome, once the others are read to their ends
        let cut = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n5\r\ndata:";
        let e = polled(&[(CHUNKED, 7), (cut, 64)]).await.unwrap_err();
        assert!(format!("{e:#}").contains("stream 1: the stream closed inside its chunked body"), "{e:#}");
    }

    #[tokio::test]
    async fn refuses_what_is_not_an_event_stream() {
        let e = events(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n", 64).await.unwrap_err();
        assert!(e.to_string().contains("HTTP 403"), "{e}");
        let e = events(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nhello", 64).await.unwrap_err();
        assert!(e.to_string().contains("not an event stream"), "{e}");
    }

    #[tokio::test]
    async fn a_broken_chunk_is_an_error() {
        let response = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n";
        let e = events(response, 64).await.unwrap_err();
        assert!(e.to_string().contains("bad chunk size"), "{e}");
        let cut = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n5\r\ndata:";
        let e = events(cut, 64).await.unwrap_err();
        assert!(e.to_string().contains("inside its chunked body"), "{e}");
    }
}
