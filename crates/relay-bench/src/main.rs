//! relay-bench: starts relay-server (unless given --target), runs each scenario, prints a
//! table and writes every figure to a JSON file.

mod cores;
mod floor;
mod http1;
mod mcp_http;
mod procstat;
mod report;
mod scenarios;
mod sse_reader;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use serde_json::{Value, json};

use cores::CoreSplit;
use report::{Goal, Report};
use scenarios::{Cores, FanOut, Target, ToolLoad};

/// Measures relay side by side on this machine: tools/call latency and throughput, fan-out
/// to open streams, memory per idle stream, relayd with 20 panes, and end to end through tmux.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// A small version of every scenario, in seconds (CI runs this)
    #[arg(long)]
    quick: bool,
    /// Load an already running MCP server over streamable HTTP instead (tools/call only)
    #[arg(long)]
    target: Option<String>,
    /// With --target: the tool to call
    #[arg(long, requires = "target")]
    tool: Option<String>,
    /// With --target: the tool's arguments, as JSON
    #[arg(long, requires = "target", default_value = "{}")]
    args: String,
    /// With --target: an extra request header, "Name: value" (repeatable)
    #[arg(long = "header", requires = "target")]
    headers: Vec<String>,
    /// Streams in the fan-out scenario [default: 100; quick: 20]
    #[arg(long)]
    peers: Option<usize>,
    /// Messages sent in the fan-out scenario, 100 a second [default: 300; quick: 40]
    #[arg(long)]
    messages: Option<usize>,
    /// Streams in the idle scenario [default: 10000; quick: 500]
    #[arg(long)]
    streams: Option<usize>,
    /// Run only these scenarios (repeatable): tools, fan-out, fan-out-1000, saturation,
    /// daemon, end-to-end, claude-inbox, idle, cluster, console
    #[arg(long, value_parser = SCENARIOS)]
    only: Vec<String>,
    /// Where to write the JSON figures
    #[arg(long, default_value = "target/relay-bench.json")]
    out: PathBuf,
}

const SCENARIOS: [&str; 10] =
    ["tools", "fan-out", "fan-out-1000", "saturation", "daemon", "end-to-end", "claude-inbox", "idle", "cluster", "console"];

#[tokio::main]
async fn main() -> Result<()> {
    // run's servers and temp dirs are gone by the time a failure ends the process
    if !run(Args::parse()).await? {
        std::process::exit(1);
    }
    Ok(())
}

/// Every scenario asked for; whether all of them completed.
async fn run(args: Args) -> Result<bool> {
    // thousands of streams need thousands of descriptors, here and in the server
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let http = reqwest::Client::builder().pool_max_idle_per_host(256).build()?;
    let mut report = Report::default();

    let server;
    let target = match &args.target {
        Some(url) => {
            let base = url.trim_end_matches('/').trim_end_matches("/mcp").to_owned();
            Target::new(http.clone(), base, None, parse_headers(&args.headers)?)
        }
        None => {
            server = BenchServer::start()?;
            tokio::time::sleep(Duration::from_millis(500)).await;
            let rss = procstat::rss_bytes(server.process.pid()).context("server RSS")? as f64 / 1_048_576.0;
            report.goal("server", "idle RSS", rss, "MB", (Goal::AtMost(15.0), "≤ 15"), Some("100 MB"));
            server.target(&http)
        }
    };

    let quick = args.quick;
    let load = |tool: &str, args: Value, sequential| tool_load(tool, args, sequential, quick);
    if let Some(tool) = &args.tool {
        let tool_args: Value = serde_json::from_str(&args.args).context("--args must be JSON")?;
        let outcome =
            scenarios::tool_calls(&target, None, &load(tool, tool_args, if quick { 200 } else { 2000 }), &mut report, "tools/call", false)
                .await;
        record(&mut report, "tools/call", outcome);
    } else if args.target.is_some() {
        report.failures.push("--target needs --tool (and usually --args)".into());
    } else {
        run_scenarios(&args, &target, &http, &mut report).await;
    }

    report.print_table();
    let command: Vec<String> = std::env::args().collect();
    report.write_json(&args.out, &command, quick)?;
    println!("figures written to {}", args.out.display());
    Ok(report.failures.is_empty())
}

/// A relay-server the bench started, on a fresh temp dir, its rate limits out of the way.
struct BenchServer {
    process: relay_e2e::ServerProcess,
    _data: tempfile::TempDir,
}

impl BenchServer {
    fn start() -> Result<Self> {
        let data = tempfile::tempdir()?;
        let data_dir = data.path().to_str().context("temp dir path")?;
        let args = ["--data-dir", data_dir, "--rate-per-second", "1000000000", "--rate-burst", "4000000000"];
        Ok(Self { process: relay_e2e::ServerProcess::start(0, &args), _data: data })
    }

    fn target(&self, http: &reqwest::Client) -> Target {
        Target::new(http.clone(), format!("http://{}", self.process.addr), Some(self.process.pid()), Vec::new())
    }
}

/// Every scenario against the server the bench started, or those `--only` names.
async fn run_scenarios(args: &Args, target: &Target, http: &reqwest::Client, report: &mut Report) {
    let quick = args.quick;
    let runs = |name: &str| args.only.is_empty() || args.only.iter().any(|o| o == name);
    let load = |tool: &str, args: Value, sequential| tool_load(tool, args, sequential, quick);
    if runs("tools") {
        let outcome = async {
            let anon = target.mcp(None).await?;
            let peer = scenarios::register(&anon, "bench-tools", "/bench/caller").await?;
            scenarios::tool_calls(
                target,
                Some(&peer.token),
                &load("list_peers", json!({}), if quick { 200 } else { 2000 }),
                report,
                "list_peers",
                true,
            )
            .await?;
            let message = json!({"message": "a benchmark message of modest size"});
            scenarios::tool_calls(
                target,
                Some(&peer.token),
                &load("send_message", message, if quick { 100 } else { 1000 }),
                report,
                "send_message",
                false,
            )
            .await
        }
        .await;
        record(report, "tools/call", outcome);
    }
    if runs("fan-out") {
        let fan = FanOut {
            label: "fan-out",
            peers: args.peers.unwrap_or(if quick { 20 } else { 100 }),
            messages: args.messages.unwrap_or(if quick { 40 } else { 300 }),
            rate_per_second: Some(100.0),
        };
        let split = CoreSplit::plan().unwrap_or_else(|e| {
            eprintln!("relay-bench: the cores this process may use are unknown ({e}); the fan-out shares them");
            None
        });
        match split {
            Some(split) => {
                let outcome = fan_out_on_own_cores(&split, &fan, http, report).await;
                record(report, "fan-out", outcome);
                // the same with every core shared, for comparison
                let outcome = scenarios::fan_out(target, &fan, Cores::Shared, report).await;
                record(report, "fan-out, cores shared", outcome);
            }
            None => {
                let outcome = scenarios::fan_out(target, &fan, Cores::Single, report).await;
                record(report, "fan-out", outcome);
            }
        }
    }
    // a group of 1,000 (10 messages a second: 10,000 deliveries a second)
    if runs("fan-out-1000") {
        let fan = FanOut {
            label: "fan-out 1000",
            peers: if quick { 100 } else { 1000 },
            messages: if quick { 20 } else { 100 },
            rate_per_second: Some(10.0),
        };
        let outcome = scenarios::fan_out(target, &fan, Cores::Single, report).await;
        record(report, "fan-out 1000", outcome);
        // what the machine allows, beside it: the same writes with no relay at all
        let streams = fan.peers;
        match tokio::task::spawn_blocking(move || floor::loopback_writes(streams, 300, 20)).await {
            Ok(Ok(Some(took))) => report.add("fan-out 1000", "floor: a plain write to each socket", took.as_secs_f64() * 1000.0, "ms"),
            Ok(Ok(None)) => {}
            Ok(Err(e)) => report.failures.push(format!("fan-out 1000 floor: {e}")),
            Err(e) => report.failures.push(format!("fan-out 1000 floor: {e}")),
        }
    }
    // 100 streams and no pacing: the most deliveries a second
    if runs("saturation") {
        let fan = FanOut {
            label: "saturation",
            peers: if quick { 20 } else { 100 },
            messages: if quick { 200 } else { 3000 },
            rate_per_second: None,
        };
        let outcome = scenarios::fan_out(target, &fan, Cores::Single, report).await;
        record(report, "saturation", outcome);
    }
    if runs("cluster") {
        let outcome = cluster(http, quick, report).await;
        record(report, "cluster", outcome);
    }
    if runs("daemon") {
        let outcome = scenarios::daemon(target, 20, if quick { 20 } else { 200 }, report).await;
        record(report, "daemon", outcome);
    }
    if runs("end-to-end") {
        let outcome = scenarios::end_to_end(target, if quick { 3 } else { 20 }, report).await;
        record(report, "end to end", outcome);
    }
    if runs("claude-inbox") {
        let outcome = scenarios::claude_inbox(if quick { 3 } else { 20 }, report).await;
        record(report, "claude inbox", outcome);
    }
    if runs("console") {
        let outcome = scenarios::console(target, if quick { 20 } else { 100 }, report).await;
        record(report, "console", outcome);
    }
    if runs("idle") {
        let streams = args.streams.unwrap_or(if quick { 500 } else { 10_000 });
        let window = Duration::from_secs(if quick { 2 } else { 5 });
        let outcome = scenarios::idle_streams(target, streams, window, report).await;
        record(report, "idle", outcome);
    }
}

/// Three NATS servers and two relay nodes on this machine (sharing its cores with the
/// bench): tool calls through one node, and the fan-out with half the streams on each.
async fn cluster(http: &reqwest::Client, quick: bool, report: &mut Report) -> Result<()> {
    let Some(nats) = relay_e2e::nats::NatsCluster::start("relay-bench cluster", 3) else {
        eprintln!("relay-bench: no nats-server (tests/run installs one): the cluster scenario is skipped");
        return Ok(());
    };
    let urls = nats.urls();
    let limits = ["--rate-per-second", "1000000000", "--rate-burst", "4000000000"];
    let nodes: Vec<relay_e2e::ServerProcess> =
        (0..2).map(|_| relay_e2e::ServerProcess::start(0, &[&["--nats", &urls], &limits[..]].concat())).collect();
    let targets: Vec<Target> =
        nodes.iter().map(|n| Target::new(http.clone(), format!("http://{}", n.addr), Some(n.pid()), Vec::new())).collect();
    let anon = targets[0].mcp(None).await?;
    let peer = scenarios::register(&anon, "bench-cluster-tools", "/bench/caller").await?;
    let (sequential, duration) = (if quick { 100 } else { 1000 }, Duration::from_secs(if quick { 2 } else { 10 }));
    let load = |tool: &str, args: Value| ToolLoad { tool: tool.to_owned(), args, sequential, concurrency: 32, duration };
    scenarios::tool_calls(&targets[0], Some(&peer.token), &load("list_peers", json!({})), report, "cluster list_peers", false).await?;
    let message = json!({"message": "a benchmark message of modest size"});
    scenarios::tool_calls(&targets[0], Some(&peer.token), &load("send_message", message), report, "cluster send_message", false).await?;
    let fan = FanOut {
        label: "cluster fan-out",
        peers: if quick { 20 } else { 100 },
        messages: if quick { 40 } else { 300 },
        rate_per_second: Some(100.0),
    };
    scenarios::fan_out_across(&targets, &fan, Cores::Single, report).await
}

/// The fan-out against a server of its own, started on its share of the cores, while the
/// bench keeps to the rest (see `cores`).
async fn fan_out_on_own_cores(split: &CoreSplit, fan: &FanOut, http: &reqwest::Client, report: &mut Report) -> Result<()> {
    let server = split.on_server_cores(BenchServer::start)??;
    let _pinned = split.pin_bench()?;
    let cores = Cores::Own { server: split.server.len(), bench: split.bench.len() };
    scenarios::fan_out(&server.target(http), fan, cores, report).await
}

/// `sequential` calls one after another, then 32 at a time for 10 s (2 s when quick).
fn tool_load(tool: &str, args: Value, sequential: usize, quick: bool) -> ToolLoad {
    ToolLoad { tool: tool.to_owned(), args, sequential, concurrency: 32, duration: Duration::from_secs(if quick { 2 } else { 10 }) }
}

fn record(report: &mut Report, scenario: &str, outcome: Result<()>) {
    if let Err(e) = outcome {
        report.failures.push(format!("{scenario}: {e:#}"));
    }
}

fn parse_headers(raw: &[String]) -> Result<Vec<(String, String)>> {
    raw.iter()
        .map(|h| {
            let (k, v) = h.split_once(':').with_context(|| format!("header {h:?} is not \"Name: value\""))?;
            Ok((k.trim().to_owned(), v.trim().to_owned()))
        })
        .collect()
}
