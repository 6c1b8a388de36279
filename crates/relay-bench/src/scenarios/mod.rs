//! The scenarios. Each adds its figures to the report and says whether it completed.

mod claude;
mod console;
mod end_to_end;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};

use crate::mcp_http::McpHttp;
use crate::procstat;
use crate::report::{Goal, Report, quantile};
use crate::sse_reader::SseReader;

pub use claude::claude_inbox;
pub use console::console;
pub use end_to_end::end_to_end;

/// What the scenarios run against.
#[derive(Clone)]
pub struct Target {
    pub http: reqwest::Client,
    /// `http://host:port`
    pub base: String,
    /// The server's process, when the bench started it (for RSS and CPU).
    pub pid: Option<u32>,
    pub headers: Vec<(String, String)>,
}

impl Target {
    pub fn new(http: reqwest::Client, base: String, pid: Option<u32>, headers: Vec<(String, String)>) -> Self {
        Self { http, base, pid, headers }
    }

    pub fn mcp_url(&self) -> String {
        format!("{}/mcp", self.base)
    }

    pub async fn mcp(&self, token: Option<&str>) -> Result<McpHttp> {
        let mut headers = self.headers.clone();
        if let Some(t) = token {
            headers.push(("authorization".into(), format!("Bearer {t}")));
        }
        McpHttp::connect(&self.mcp_url(), &headers).await
    }
}

/// A registered peer.
#[derive(Clone)]
pub struct Peer {
    pub peer_id: String,
    pub token: String,
    pub group: String,
}

pub async fn register(mcp: &McpHttp, group: &str, dir: &str) -> Result<Peer> {
    let r = mcp.call_tool("register", &json!({"group_id": group, "hostname": "bench", "working_directory": dir})).await?;
    let s = &r["structuredContent"];
    Ok(Peer {
        peer_id: s["peer_id"].as_str().context("peer_id")?.to_owned(),
        token: s["token"].as_str().context("token")?.to_owned(),
        group: group.to_owned(),
    })
}

pub struct ToolLoad {
    pub tool: String,
    pub args: Value,
    pub sequential: usize,
    pub concurrency: usize,
    pub duration: Duration,
}

/// Sequential latency and concurrent throughput of one tool.
pub async fn tool_calls(
    target: &Target,
    token: Option<&str>,
    load: &ToolLoad,
    report: &mut Report,
    label: &'static str,
    goals: bool,
) -> Result<()> {
    let mcp = Arc::new(target.mcp(token).await?);
    let call = Arc::new(mcp.prepare(&load.tool, &load.args)?);
    for _ in 0..20 {
        mcp.call_prepared(&call).await?; // warm up
    }
    let mut samples = Vec::with_capacity(load.sequential);
    for _ in 0..load.sequential {
        let started = Instant::now();
        mcp.call_prepared(&call).await?;
        samples.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    let median = quantile(&mut samples, 0.5);
    let p99 = quantile(&mut samples, 0.99);

    let calls = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + load.duration;
    let workers: Vec<_> = (0..load.concurrency)
        .map(|_| {
            let (mcp, calls, call) = (mcp.clone(), calls.clone(), call.clone());
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    mcp.call_prepared(&call).await?;
                    calls.fetch_add(1, Ordering::Relaxed);
                }
                anyhow::Ok(())
            })
        })
        .collect();
    let started = Instant::now();
    let cpu = procstat::CpuMeter::start(target.pid);
    for w in workers {
        w.await??;
    }
    let done = calls.load(Ordering::Relaxed);
    let rate = done as f64 / started.elapsed().as_secs_f64();
    let cpu_per_call = cpu.per(done as usize);
    let c = load.concurrency;
    if goals {
        report.goal(label, "sequential median", median, "ms", (Goal::AtMost(0.3), "≤ 0.3"), Some("3–10 ms"));
        report.add(label, "sequential p99", p99, "ms");
        let name = if c == 32 { "calls/s at concurrency 32" } else { "calls/s at concurrency N" };
        report.goal(label, name, rate, "calls/s", (Goal::AtLeast(20_000.0), "≥ 20000"), Some("90–210/s"));
    } else {
        report.add(label, "sequential median", median, "ms");
        report.add(label, "sequential p99", p99, "ms");
        report.add(label, "calls/s at concurrency 32", rate, "calls/s");
    }
    add_cpu(report, label, cpu_per_call, ["server CPU per call", "bench client CPU per call"]);
    report.completed.push(label);
    Ok(())
}

/// The CPU that the server and the bench spent per unit of work, as two figures in µs.
fn add_cpu(report: &mut Report, label: &'static str, (server, bench): (Option<f64>, Option<f64>), names: [&'static str; 2]) {
    for (us, name) in [(server, names[0]), (bench, names[1])] {
        if let Some(us) = us {
            report.add(label, name, us, "µs");
        }
    }
}

/// A peer's SSE stream, opened.
async fn connect_stream(target: &Target, peer: &Peer) -> Result<SseReader> {
    SseReader::open(&target.base, &format!("/notifications/{}/{}", peer.group, peer.peer_id), &peer.token).await
}

/// Reads `reader` on a task of its own, its events' data going to `on_event` with when
/// their bytes arrived.
fn spawn_reader(reader: SseReader, on_event: impl FnMut(&[u8], Instant) + Send + 'static) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if let Err(e) = reader.run(on_event).await {
            eprintln!("relay-bench: an event stream broke: {e:#}");
        }
    })
}

/// An open SSE stream whose events' data go to `on_event`, with when their bytes arrived.
pub async fn open_stream(
    target: &Target,
    peer: &Peer,
    on_event: impl FnMut(&[u8], Instant) + Send + 'static,
) -> Result<tokio::task::JoinHandle<()>> {
    Ok(spawn_reader(connect_stream(target, peer).await?, on_event))
}

/// How long the polling reader stays awake after an arrival: a fan-out's deliveries come
/// some 10 µs apart.
#[cfg(target_os = "linux")]
const SPIN: Duration = Duration::from_micros(200);

/// The fan-out's stream readers: a task each, or on cores of their own one thread that
/// polls them all (see `poll_streams`). Dropping them stops them, on any path.
enum Readers {
    Tasks(Vec<tokio::task::JoinHandle<()>>),
    #[cfg(target_os = "linux")]
    Polling {
        stop: Arc<std::sync::atomic::AtomicBool>,
        thread: Option<std::thread::JoinHandle<Result<()>>>,
    },
}

impl Readers {
    fn start(readers: Vec<SseReader>, cores: Cores, arrivals: &Arc<Mutex<Arrivals>>) -> Self {
        #[cfg(target_os = "linux")]
        if let Cores::Own { .. } = cores {
            let (stop, arrivals) = (Arc::new(std::sync::atomic::AtomicBool::new(false)), arrivals.clone());
            let stopped = stop.clone();
            let thread = std::thread::spawn(move || {
                crate::sse_reader::poll_streams(readers, SPIN, &stopped, |stream, data, at| {
                    arrivals.lock().unwrap().push(stream, at, data);
                })
            });
            return Readers::Polling { stop, thread: Some(thread) };
        }
        #[cfg(not(target_os = "linux"))]
        let _ = cores;
        let spawn = |(stream, reader)| {
            let arrivals = arrivals.clone();
            spawn_reader(reader, move |data, at| arrivals.lock().unwrap().push(stream, at, data))
        };
        Readers::Tasks(readers.into_iter().enumerate().map(spawn).collect())
    }
}

impl Drop for Readers {
    fn drop(&mut self) {
        match self {
            Readers::Tasks(tasks) => tasks.iter().for_each(|t| t.abort()),
            #[cfg(target_os = "linux")]
            Readers::Polling { stop, thread } => {
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
                let Some(thread) = thread.take() else { return };
                match thread.join() {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => eprintln!("relay-bench: an event stream broke: {e:#}"),
                    Err(_) => eprintln!("relay-bench: the stream reader panicked"),
                }
            }
        }
    }
}

pub struct FanOut {
    /// The scenario's name in the report.
    pub label: &'static str,
    pub peers: usize,
    pub messages: usize,
    /// Sends a second; `None`: each as soon as the last was answered (to find the most
    /// deliveries a second the server makes).
    pub rate_per_second: Option<f64>,
}

/// Where the server and the bench run during a fan-out (see `cores`).
#[derive(Clone, Copy)]
pub enum Cores {
    /// Cores of their own, this many each: the run held to the target.
    Own { server: usize, bench: usize },
    /// No split (a single core, or the cores could not be read): held to the target too.
    Single,
    /// All cores shared, for comparison with `Own`.
    Shared,
}

impl Cores {
    fn held_to_target(self) -> bool {
        !matches!(self, Cores::Shared)
    }
}

/// Every event as it came: which stream, when its bytes arrived, and where its data lies
/// in `data`. Room is made and touched up front (for events of up to 512 bytes, 64 MiB in
/// all), so that a reader noting an event seldom waits for memory.
struct Arrivals {
    events: Vec<(usize, Instant, std::ops::Range<usize>)>,
    data: Vec<u8>,
}

impl Arrivals {
    fn with_room_for(events: usize) -> Self {
        let mut data = vec![1u8; (events * 512).min(64 << 20)];
        data.clear();
        let mut noted = vec![(0, Instant::now(), 0..0); events];
        noted.clear();
        Self { events: noted, data }
    }

    fn push(&mut self, stream: usize, at: Instant, data: &[u8]) {
        let start = self.data.len();
        self.data.extend_from_slice(data);
        self.events.push((stream, at, start..self.data.len()));
    }

    fn iter(&self) -> impl Iterator<Item = (usize, Instant, &[u8])> {
        self.events.iter().map(|(stream, at, range)| (*stream, *at, &self.data[range.clone()]))
    }
}

/// One sender, `peers` open streams: latency from send to every delivery.
pub async fn fan_out(target: &Target, opts: &FanOut, cores: Cores, report: &mut Report) -> Result<()> {
    fan_out_across(std::slice::from_ref(target), opts, cores, report).await
}

/// The fan-out with the streams spread over `targets` (a cluster's nodes), the sender on
/// the first: latency to the streams on the sender's node and on the others, apart.
// (long: a scenario is one timeline — set up, warm up, measure, check, report — read best whole)
pub async fn fan_out_across(targets: &[Target], opts: &FanOut, cores: Cores, report: &mut Report) -> Result<()> {
    let target = &targets[0];
    let anon = target.mcp(None).await?;
    let group = &format!("bench-{}", opts.label.replace([' ', ','], "-"));
    let sender = register(&anon, group, "/bench/sender").await?;
    let mut peers = Vec::with_capacity(opts.peers);
    for i in 0..opts.peers {
        peers.push(register(&anon, group, &format!("/bench/peer{i}")).await?);
    }
    // Each event is kept as it came and read after the run, so that all a stream does
    // while the server works is note the time.
    let expected = opts.peers * opts.messages;
    let arrivals = Arc::new(Mutex::new(Arrivals::with_room_for(expected)));
    let received = || arrivals.lock().unwrap().events.len();
    let mut readers = Vec::with_capacity(peers.len());
    for (i, peer) in peers.iter().enumerate() {
        readers.push(connect_stream(&targets[i % targets.len()], peer).await?);
    }
    let streams = Readers::start(readers, cores, &arrivals);
    let mcp = target.mcp(Some(&sender.token)).await?;
    let (pace, messages) = (opts.rate_per_second, opts.messages);
    let first_send = Instant::now();
    let cpu = procstat::CpuMeter::start(target.pid);
    // on a worker, beside the HTTP client's connection task, not handed across threads
    let sent_at = tokio::spawn(async move {
        let mut sent_at = Vec::with_capacity(messages);
        let mut tick = pace.map(|rate| tokio::time::interval(Duration::from_secs_f64(1.0 / rate)));
        // after a stall, keep the spacing rather than sending the missed ones back to back
        if let Some(tick) = &mut tick {
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        }
        for n in 0..messages {
            if let Some(tick) = &mut tick {
                tick.tick().await;
            }
            sent_at.push(Instant::now());
            mcp.call_tool("send_message", &json!({"message": format!("fan {n}")})).await?;
        }
        anyhow::Ok(sent_at)
    })
    .await??;
    let deadline = Instant::now() + Duration::from_secs(30);
    while received() < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cpu_per_delivery = cpu.per(received());
    drop(streams);
    let mut lat = Vec::with_capacity(expected);
    // with several nodes: the streams on the sender's node, and the rest
    let (mut same_node, mut other_node) = (Vec::new(), Vec::new());
    // per send: its first and its last delivery
    let mut per_send: Vec<Option<(f64, f64)>> = vec![None; opts.messages];
    let mut last_delivery = first_send;
    let (mut seen, mut duplicates) = (HashSet::with_capacity(expected), 0);
    for (stream, at, data) in arrivals.lock().unwrap().iter() {
        let event: Value = serde_json::from_slice(data).context("an event's data is not JSON")?;
        let fan = event["preview"].as_str().and_then(|p| p.strip_prefix("fan ")).and_then(|n| n.parse::<usize>().ok());
        if let Some((n, sent)) = fan.and_then(|n| Some((n, sent_at.get(n)?))) {
            if !seen.insert((stream, n)) {
                duplicates += 1;
                continue;
            }
            let ms = at.duration_since(*sent).as_secs_f64() * 1000.0;
            lat.push(ms);
            if stream % targets.len() == 0 { &mut same_node } else { &mut other_node }.push(ms);
            per_send[n] = Some(per_send[n].map_or((ms, ms), |(first, last)| (first.min(ms), last.max(ms))));
            last_delivery = last_delivery.max(at);
        }
    }
    let (mut firsts, mut spreads): (Vec<f64>, Vec<f64>) = per_send.iter().flatten().map(|(first, last)| (*first, last - first)).unzip();
    let got = lat.len();
    let p99 = quantile(&mut lat, 0.99);
    let label = if cores.held_to_target() { opts.label } else { "fan-out, cores shared" };
    report.add(label, "streams", opts.peers as f64, "streams");
    if targets.len() > 1 {
        report.add(label, "nodes", targets.len() as f64, "nodes");
        report.add(label, "sending node: send → delivery p50", quantile(&mut same_node, 0.5), "ms");
        report.add(label, "sending node: send → delivery p99", quantile(&mut same_node, 0.99), "ms");
        report.add(label, "other node: send → delivery p50", quantile(&mut other_node, 0.5), "ms");
        let p99 = quantile(&mut other_node, 0.99);
        report.goal(label, "other node: send → delivery p99", p99, "ms", (Goal::AtMost(10.0), "≤ 10 (100 msg/s × 100)"), None);
    }
    if let Cores::Own { server, bench } = cores {
        report.add(label, "server's cores", server as f64, "cores");
        report.add(label, "bench's cores", bench as f64, "cores");
    }
    report.add(label, "send → delivery p50", quantile(&mut lat, 0.5), "ms");
    if cores.held_to_target() && targets.len() == 1 && opts.rate_per_second.is_some() {
        let original = (opts.peers == 100).then_some("80–92 ms (one send)");
        let goal = if opts.peers >= 1000 { (Goal::AtMost(5.0), "≤ 5 (1,000)") } else { (Goal::AtMost(2.0), "≤ 2 (100)") };
        report.goal(label, "send → delivery p99", p99, "ms", goal, original);
    } else {
        report.add(label, "send → delivery p99", p99, "ms");
    }
    report.add(label, "send → delivery max", quantile(&mut lat, 1.0), "ms");
    // where the time goes: reaching the first stream, then the rest of them
    report.add(label, "send → first delivery p50", quantile(&mut firsts, 0.5), "ms");
    report.add(label, "first → last delivery p50", quantile(&mut spreads, 0.5), "ms");
    let per_second = got as f64 / last_delivery.duration_since(first_send).as_secs_f64().max(1e-9);
    if opts.rate_per_second.is_none() {
        report.goal(label, "deliveries/s", per_second, "events/s", (Goal::AtLeast(300_000.0), "≥ 300,000"), None);
    } else {
        report.add(label, "deliveries/s", per_second, "events/s");
    }
    report.add(label, "lost", (expected - got.min(expected)) as f64, "events");
    report.add(label, "duplicates", duplicates as f64, "events");
    add_cpu(report, label, cpu_per_delivery, ["server CPU per delivery", "bench client CPU per delivery"]);
    if got != expected || duplicates > 0 {
        bail!("fan-out delivered {got} of {expected} events, and {duplicates} more than once");
    }
    report.completed.push(label);
    Ok(())
}

/// `streams` idle SSE streams: the server's memory per stream and its CPU while idle.
pub async fn idle_streams(target: &Target, streams: usize, cpu_window: Duration, report: &mut Report) -> Result<()> {
    let pid = target.pid.context("idle streams needs a server the bench started (no --target)")?;
    let anon = target.mcp(None).await?;
    let peers: Vec<Peer> = {
        let mut v = Vec::new();
        for i in 0..streams.clamp(1, 100) {
            v.push(register(&anon, "bench-idle", &format!("/bench/idle{i}")).await?);
        }
        v
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = procstat::rss_bytes(pid).context("server RSS")?;
    let mut handles = Vec::with_capacity(streams);
    for chunk in (0..streams).collect::<Vec<_>>().chunks(256) {
        let opened = futures::future::join_all(chunk.iter().map(|i| open_stream(target, &peers[i % peers.len()], |_, _| {}))).await;
        for h in opened {
            handles.push(h?);
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = procstat::rss_bytes(pid).context("server RSS")?;
    let per_stream_kb = (after.saturating_sub(before)) as f64 / streams as f64 / 1024.0;
    let cpu = procstat::cpu_percent(pid, cpu_window).await.context("server CPU")?;
    let label = "idle";
    report.add(label, "open streams", streams as f64, "streams");
    report.goal(label, "server RSS per idle stream", per_stream_kb, "KB", (Goal::AtMost(8.0), "≤ 8 (10k)"), Some("≈ 46 KB"));
    report.add(label, "server RSS with the streams", after as f64 / 1_048_576.0, "MB");
    report.add(label, "server CPU while idle", cpu, "% core");
    for h in handles {
        h.abort();
    }
    report.completed.push(label);
    Ok(())
}

/// Panes attached in one group through one relayd: upstream connections (must be 1),
/// relayd's memory idle and under load, and the latency from a send to each pane's event.
// (long: a scenario is one timeline — set up, warm up, measure, check, report — read best whole)
pub async fn daemon(target: &Target, panes: usize, messages: usize, report: &mut Report) -> Result<()> {
    use relay_local::client::Client;
    use relay_proto::local::{AttachRequest, Reply, Request};
    let dir = tempfile::tempdir()?;
    let (mut relayd, socket) = relay_e2e::spawn_relayd(dir.path(), &target.base, &["--no-notifications"], &[], std::process::Stdio::null());
    let relayd_pid = relayd.0.id();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut control = loop {
        match Client::connect(&socket, "relay-bench").await {
            Ok(c) => break c,
            Err(e) if Instant::now() > deadline => bail!("relayd did not start: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    for i in 0..panes {
        let req = AttachRequest {
            pane: format!("%{i}"),
            group: "bench-daemon".into(),
            working_directory: format!("/bench/pane{i}"),
            ..Default::default()
        };
        match control.request(&Request::Attach(req)).await? {
            Reply::Attached { .. } => {}
            other => bail!("attach failed: {other:?}"),
        }
    }
    let sent_at: Arc<Mutex<HashMap<usize, Instant>>> = Arc::default();
    let latencies: Arc<Mutex<Vec<f64>>> = Arc::default();
    let (received, duplicates) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut readers = Vec::new();
    for i in 0..panes {
        let mut sub = Client::connect(&socket, "relay-bench").await?;
        sub.request(&Request::Subscribe { pane: format!("%{i}"), since: Default::default() }).await?;
        let (sent_at, latencies, received, duplicates) = (sent_at.clone(), latencies.clone(), received.clone(), duplicates.clone());
        readers.push(tokio::spawn(async move {
            let mut seen = HashSet::new();
            while let Ok(reply) = sub.next().await {
                let Reply::Event { event, .. } = reply else { continue };
                let Some(n) = event.preview.strip_prefix("fan ").and_then(|n| n.parse::<usize>().ok()) else { continue };
                if !seen.insert(n) {
                    duplicates.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                if let Some(at) = sent_at.lock().unwrap().get(&n) {
                    latencies.lock().unwrap().push(at.elapsed().as_secs_f64() * 1000.0);
                }
                received.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let metrics = target.http.get(format!("{}/metrics", target.base)).send().await?.text().await?;
    let upstreams: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("relay_open_streams{kind=\"daemon\"} "))
        .and_then(|v| v.trim().parse().ok())
        .context("no daemon stream gauge in /metrics")?;
    let idle_rss = procstat::rss_bytes(relayd_pid).context("relayd RSS")? as f64 / 1_048_576.0;

    let anon = target.mcp(None).await?;
    let sender = register(&anon, "bench-daemon", "/bench/far").await?;
    let mcp = target.mcp(Some(&sender.token)).await?;
    let mut peak_rss = idle_rss;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    for n in 0..messages {
        tick.tick().await;
        sent_at.lock().unwrap().insert(n, Instant::now());
        mcp.call_tool("send_message", &json!({"message": format!("fan {n}")})).await?;
        if n % 20 == 0 {
            peak_rss = peak_rss.max(procstat::rss_bytes(relayd_pid).unwrap_or(0) as f64 / 1_048_576.0);
        }
    }
    let expected = panes * messages;
    let deadline = Instant::now() + Duration::from_secs(30);
    while received.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for r in readers {
        r.abort();
    }
    relayd.kill_hard();
    let got = received.load(Ordering::Relaxed);
    let mut lat = latencies.lock().unwrap().clone();
    let label = "daemon";
    report.add(label, "panes", panes as f64, "panes");
    report.goal(label, "upstream connections", upstreams, "streams", (Goal::AtMost(1.0), "= 1"), None);
    report.goal(label, "relayd RSS idle", idle_rss, "MB", (Goal::AtMost(10.0), "≤ 10"), None);
    report.add(label, "relayd RSS under load", peak_rss, "MB");
    report.add(label, "send → pane event p50", quantile(&mut lat, 0.5), "ms");
    report.add(label, "send → pane event p99", quantile(&mut lat, 0.99), "ms");
    let duplicates = duplicates.load(Ordering::Relaxed);
    report.add(label, "lost", (expected - got.min(expected)) as f64, "events");
    report.add(label, "duplicates", duplicates as f64, "events");
    ensure!(upstreams == 1.0, "{upstreams} upstream connections for one group");
    ensure!(got == expected && duplicates == 0, "daemon fan-out delivered {got} of {expected} events, and {duplicates} more than once");
    report.completed.push(label);
    Ok(())
}
