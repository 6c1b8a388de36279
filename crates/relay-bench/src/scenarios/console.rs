//! The console in a real browser: an agent's message → its node in the page's DOM (timed in
//! the browser, p50/p99), and the page's transfer size and time to first render against the
//! local server. Chromium and Playwright come from `tests/run` (`RELAY_TEST_CHROMIUM`,
//! `RELAY_TEST_PYTHON`); the driver is `scripts/console_bench.py`.

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use super::Target;
use crate::report::{Goal, Report, quantile};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/console_bench.py");

pub async fn console(target: &Target, messages: usize, report: &mut Report) -> Result<()> {
    let tool = |var: &str| std::env::var_os(var).map(std::path::PathBuf::from).filter(|p| p.exists());
    let (Some(python), Some(chromium)) = (tool("RELAY_TEST_PYTHON"), tool("RELAY_TEST_CHROMIUM")) else {
        bail!("no browser: chromium and Playwright are installed by tests/run (RELAY_TEST_CHROMIUM, RELAY_TEST_PYTHON)")
    };
    // a daemon with one agent in the group, and a human who signs in
    let post = |path: &str, token: Option<&str>, body: Value| {
        let mut request = target.http.post(format!("{}{path}", target.base)).json(&body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        async move { request.send().await?.error_for_status()?.json::<Value>().await.context("a JSON answer") }
    };
    let daemon = post("/v1/daemons", None, json!({"hostname": "bench"})).await?;
    let token = daemon["token"].as_str().context("a daemon token")?.to_owned();
    let peer =
        post("/v1/peers", Some(&token), json!({"group_id": "bench-console", "hostname": "bench", "working_directory": "/bench/agent"}))
            .await?;
    let link = post("/v1/console/sign-in", Some(&token), json!({"name": "bench"})).await?;
    let config = json!({
        "server": target.base,
        "link": format!("{}{}", target.base, link["path"].as_str().context("a sign-in path")?),
        "chromium": chromium,
        "send_url": format!("{}/v1/peers/{}/messages", target.base, peer["peer_id"].as_str().context("a peer id")?),
        "daemon_token": token,
        "group": "bench-console",
        "messages": messages,
    });
    let dir = tempfile::tempdir()?;
    let config_path = dir.path().join("console.json");
    std::fs::write(&config_path, config.to_string())?;
    let out = tokio::process::Command::new(python).arg(SCRIPT).arg(&config_path).output().await.context("run the browser")?;
    if !out.status.success() {
        bail!("the browser script failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    let figures: Value = serde_json::from_slice(out.stdout.trim_ascii()).context("the browser script's figures")?;
    let mut latencies: Vec<f64> = figures["latencies_ms"].as_array().context("latencies")?.iter().filter_map(Value::as_f64).collect();
    if latencies.len() != messages {
        bail!("{} of {messages} messages reached the page", latencies.len());
    }
    let label = "console";
    report.goal(label, "message → DOM p50", quantile(&mut latencies, 0.5), "ms", (Goal::AtMost(50.0), "≤ 50"), None);
    report.add(label, "message → DOM p99", quantile(&mut latencies, 0.99), "ms");
    let first_render = figures["first_render_ms"].as_f64().context("first render")?;
    report.goal(label, "first render", first_render, "ms", (Goal::AtMost(300.0), "≤ 300"), None);
    let kb = figures["page_bytes"].as_f64().context("page size")? / 1024.0;
    report.goal(label, "whole page", kb, "KB", (Goal::AtMost(150.0), "≤ 150"), None);
    Ok(())
}
