//! End to end, as an agent sees it: a message sent through `relay mcp` in one tmux pane,
//! the announcement line typed into another pane's agent, seen with `capture-pane`.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use relay_e2e::tmux::{TmuxServer, call_tool, relay_mcp, stand_in_agent};
use relay_tmux::Tmux;
use serde_json::json;

use super::Target;
use crate::procstat;
use crate::report::{Goal, Report, quantile};

const GROUP: &str = "bench-e2e";
const ANNOUNCEMENT: &str = "new message in bench-e2e from alice";

pub async fn end_to_end(target: &Target, messages: usize, report: &mut Report) -> Result<()> {
    let label = "end to end";
    let Some(tmux) = TmuxServer::start("relay-bench end to end", "bench") else { bail!("tmux is not installed") };
    let dir = tempfile::tempdir()?;
    let (mut relayd, socket) = relay_e2e::spawn_relayd(dir.path(), &target.base, &["--no-notifications"], &[], Stdio::null());
    let agent = stand_in_agent(dir.path());
    let log = |name: &str| dir.path().join(format!("{name}.log"));
    let pane_a = tmux.new_pane("/tmp", &format!("python3 {} {}", agent.display(), log("a").display()));
    let pane_b = tmux.new_pane("/", &format!("python3 {} {}", agent.display(), log("b").display()));
    wait_for("relayd and the agents", || socket.exists() && log("a").exists() && log("b").exists()).await?;
    for (pane, name) in [(&pane_a, "alice"), (&pane_b, "bob")] {
        let out = tmux.relay(&socket, &["attach", pane, "--group", GROUP, "--name", name, "--no-mcp-config"], &[]);
        ensure!(out.status.success(), "relay attach {pane}: {}", String::from_utf8_lossy(&out.stderr));
    }
    wait_for("the intro line", || std::fs::read_to_string(log("b")).is_ok_and(|l| l.contains("You are bob"))).await?;
    let sender = relay_mcp(&socket, &pane_a).await;
    // the sidebars subscribe and settle; then what they cost at rest
    tokio::time::sleep(Duration::from_millis(700)).await;
    let sidebars = sidebar_pids(&socket);
    let sidebar_rss = sidebars.iter().filter_map(|&pid| procstat::rss_bytes(pid)).max().unwrap_or(0) as f64 / 1_048_576.0;
    let (anon, file) = sidebars.iter().filter_map(|&pid| procstat::rss_anon_and_file(pid)).max().unwrap_or_default();

    let shown = || -> Result<usize> {
        let screen = tmux.tmux.run(&["capture-pane", "-p", "-S", "-", "-t", &pane_b])?;
        Ok(screen.matches(ANNOUNCEMENT).count())
    };
    let mut latencies = Vec::with_capacity(messages);
    for n in 0..messages {
        let before = shown()?;
        let started = Instant::now();
        call_tool(&sender, "send_message", json!({"message": format!("end to end {n}")})).await.map_err(anyhow::Error::msg)?;
        let deadline = started + Duration::from_secs(5);
        while shown()? == before {
            ensure!(Instant::now() < deadline, "message {n} was never announced in the pane");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        latencies.push(started.elapsed().as_secs_f64() * 1000.0);
        // an idle pane, as the sidebar sees it every 2 s (else it waits out a quiet period)
        tokio::time::sleep(Duration::from_millis(2500)).await;
    }
    let _ = sender.cancel().await;
    relayd.kill_hard();

    report.goal(label, "send → line on screen p50", quantile(&mut latencies, 0.5), "ms", (Goal::AtMost(50.0), "≤ 50"), None);
    report.add(label, "send → line on screen p99", quantile(&mut latencies, 0.99), "ms");
    report.add(label, "messages announced", latencies.len() as f64, "messages");
    ensure!(sidebars.len() == 2, "expected 2 sidebars, found {}", sidebars.len());
    report.goal(label, "relay-pane RSS idle", sidebar_rss, "MB", (Goal::AtMost(10.0), "≤ 10"), None);
    report.add(label, "of which its own (heap, stacks)", anon as f64 / 1_048_576.0, "MB");
    report.add(label, "of which mapped files (code, libraries)", file as f64 / 1_048_576.0, "MB");
    report.completed.push(label);
    Ok(())
}

async fn wait_for(what: &str, mut ready: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !ready() {
        ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// The relay-pane processes talking to the relayd at `socket` (their command line names it).
fn sidebar_pids(socket: &Path) -> Vec<u32> {
    let needle = socket.to_string_lossy();
    let Ok(procs) = std::fs::read_dir("/proc") else { return Vec::new() };
    procs
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            let cmdline =
                std::fs::read(format!("/proc/{pid}/cmdline")).map(|c| String::from_utf8_lossy(&c).into_owned()).unwrap_or_default();
            comm.trim() == "relay-pane" && cmdline.contains(needle.as_ref())
        })
        .collect()
}
