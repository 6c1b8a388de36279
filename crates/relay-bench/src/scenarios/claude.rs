//! Delivery into a real Claude Code session (offline, with a scripted model): (a) the floor,
//! a line posted straight into the session's inbox → the session's next model request; (b)
//! relay, a DM sent over relay → its text inside the session's next model request. (b) − (a)
//! is what relay's own hops (server, relayd, relay-pane) cost.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use relay_e2e::claude::{Machine, Model, world};
use serde_json::{Value, json};

use super::{Target, register};
use crate::report::{Goal, Report, quantile};

const TEST: &str = "relay-bench claude";

pub async fn claude_inbox(samples: usize, report: &mut Report) -> Result<()> {
    let label = "claude inbox";
    let Some(w) = world(TEST) else { bail!("the Claude Code CLI is not installed (tests/run installs it; RELAY_TEST_CLAUDE)") };
    let Some(bob) = w.machine(TEST, "bob") else { bail!("tmux is not installed") };
    let pane = bob.start_claude("");
    bob.attach(&pane, "bob");
    w.model.wait_for("you are bob in relay group cc", Duration::from_secs(30));
    let socket = session_socket(&bob, &pane).context("the session's inbox socket")?;

    let http = reqwest::Client::new();
    let target = Target::new(http, w.server.url(""), None, Vec::new());
    let sender = register(&target.mcp(None).await?, "cc", "/bench/sender").await?;
    let sender = target.mcp(Some(&sender.token)).await?;

    let (mut floor, mut relayed) = (Vec::new(), Vec::new());
    for n in 0..samples {
        // which goes first alternates, so neither gains from the order
        for relay_first in [n % 2 == 1, n % 2 == 0] {
            wait_idle(&bob, &pane)?;
            if relay_first {
                let probe = format!("relay probe {n} {}", std::process::id());
                let sent = now();
                sender.call_tool("send_dm", &json!({"to": "bob", "message": probe})).await?;
                relayed.push(arrival(&w.model, &probe)? - sent);
            } else {
                let probe = format!("floor probe {n} {}", std::process::id());
                let sent = now();
                post(&socket, &probe)?;
                floor.push(arrival(&w.model, &probe)? - sent);
            }
        }
    }
    let ms = |v: f64| v * 1000.0;
    let (mut floor, mut relayed): (Vec<f64>, Vec<f64>) = (floor.into_iter().map(ms).collect(), relayed.into_iter().map(ms).collect());
    let mut paired: Vec<f64> = relayed.iter().zip(&floor).map(|(b, a)| b - a).collect();
    let floor_p50 = quantile(&mut floor, 0.5);
    let relayed_p50 = quantile(&mut relayed, 0.5);
    report.add(label, "(a) inbox post → model request p50", floor_p50, "ms");
    report.add(label, "(a) inbox post → model request p90", quantile(&mut floor, 0.9), "ms");
    report.add(label, "(b) relay send → model request p50", relayed_p50, "ms");
    report.add(label, "(b) relay send → model request p90", quantile(&mut relayed, 0.9), "ms");
    report.goal(
        label,
        "relay's own cost (b − a) p50",
        relayed_p50 - floor_p50,
        "ms",
        (Goal::AtMost(5.0), "≤ 5"),
        Some("56 ms to a pointer"),
    );
    report.add(label, "b − a, median of the pairs", quantile(&mut paired, 0.5), "ms");
    report.completed.push(label);
    Ok(())
}

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("after 1970").as_secs_f64()
}

/// The inbox socket of the Claude Code session in `pane`, from its registry.
fn session_socket(machine: &Machine, pane: &str) -> Option<PathBuf> {
    machine.session_entry(pane)?["messagingSocketPath"].as_str().map(PathBuf::from)
}

/// The session's turn is over (the scripted model answers at once).
fn wait_idle(machine: &Machine, pane: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !machine.session_idle(pane) {
        ensure!(Instant::now() < deadline, "the session stayed busy");
        std::thread::sleep(Duration::from_millis(20));
    }
    // and a moment more, so one turn's tail does not overlap the next probe
    std::thread::sleep(Duration::from_millis(200));
    Ok(())
}

/// Posts `text` into the inbox at `socket` as another session would.
fn post(socket: &Path, text: &str) -> Result<()> {
    let from = format!("uds:{}", socket.with_file_name("bench.sock").display());
    let content = format!("<cross-session-message from=\"{from}\" from-name=\"bench\">\n{text}\n</cross-session-message>");
    let line = json!({"type": "user", "message": {"role": "user", "content": content}, "from": from, "priority": "next"});
    let mut stream = UnixStream::connect(socket)?;
    stream.write_all(format!("{line}\n").as_bytes())?;
    stream.shutdown(std::net::Shutdown::Write)?;
    Ok(())
}

/// When (seconds since the epoch) the model got the request that first held `probe`.
fn arrival(model: &Model, probe: &str) -> Result<f64> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = std::fs::read_to_string(&model.log).unwrap_or_default();
        let found = log.lines().filter(|l| l.contains(probe)).find_map(|l| serde_json::from_str::<Value>(l).ok()?["t"].as_f64());
        if let Some(t) = found {
            return Ok(t);
        }
        ensure!(Instant::now() < deadline, "no model request held {probe:?}");
        std::thread::sleep(Duration::from_millis(2));
    }
}
