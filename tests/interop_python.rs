//! The official MCP Python SDK against the real relay-server binary, in both protocol modes.

use std::process::Command;

use relay_e2e::{ServerProcess, python_with_mcp};

fn run_interop(test: &str, mode: &str) {
    let Some(python) = python_with_mcp(test) else { return };
    let server = ServerProcess::start(0, &["--ephemeral"]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/interop.py");
    let out = Command::new(python).arg(script).arg(server.url("")).arg(mode).output().expect("run python");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "python interop ({mode}) failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains(&format!("ok: python mcp interop, mode={mode}")), "{stdout}");
}

#[test]
fn python_sdk_auto_mode_uses_the_stateless_protocol() {
    run_interop("python_sdk_auto_mode_uses_the_stateless_protocol", "auto");
}

#[test]
fn python_sdk_legacy_mode_uses_sessions() {
    run_interop("python_sdk_legacy_mode_uses_sessions", "legacy");
}
