//! Claude Code's own CLI sees relay-server as a working MCP server, the seed's way
//! (`claude mcp add --transport http`) and with a bearer header.

use relay_e2e::mcp::{Client, Mode};
use relay_e2e::{ServerProcess, claude_code, claude_command};
use serde_json::json;

fn mcp_list(bin: &std::path::Path, home: &std::path::Path) -> String {
    let out = claude_command(bin, home).args(["mcp", "list"]).output().expect("run claude mcp list");
    assert!(out.status.success(), "claude mcp list: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn claude_mcp_list_reports_relay_connected() {
    let test = "claude_mcp_list_reports_relay_connected";
    let Some(bin) = claude_code(test) else { return };
    let server = ServerProcess::start(0, &["--ephemeral"]);
    let home = tempfile::tempdir().unwrap();
    let url = server.url("/mcp");

    let add = claude_command(&bin, home.path()).args(["mcp", "add", "--transport", "http", "relay", &url]).output().unwrap();
    assert!(add.status.success(), "claude mcp add: {}", String::from_utf8_lossy(&add.stderr));
    let listed = mcp_list(&bin, home.path());
    let line = listed.lines().find(|l| l.starts_with("relay:")).unwrap_or_else(|| panic!("relay not listed:\n{listed}"));
    assert!(line.contains(&url) && line.contains("✔ Connected"), "{line}");
    assert!(!line.contains("tools fetch failed"), "{line}");

    // the same with a token in the Authorization header, as a configured client would
    let anon = Client::connect(&url, None, Mode::Stateless).await;
    let reg = anon.ok("register", json!({"group_id": "cc", "hostname": "h", "working_directory": "/w"})).await;
    let header = format!("Authorization: Bearer {}", reg["token"].as_str().unwrap());
    let add = claude_command(&bin, home.path())
        .args(["mcp", "add", "--transport", "http", "relay-auth", &url, "--header", &header])
        .output()
        .unwrap();
    assert!(add.status.success(), "claude mcp add --header: {}", String::from_utf8_lossy(&add.stderr));
    let listed = mcp_list(&bin, home.path());
    let line = listed.lines().find(|l| l.starts_with("relay-auth:")).unwrap_or_else(|| panic!("not listed:\n{listed}"));
    assert!(line.contains("✔ Connected"), "{line}");

    // a server that is not there is reported as such, so the check above can fail
    drop(server);
    let listed = mcp_list(&bin, home.path());
    assert!(!listed.contains("✔ Connected"), "{listed}");
}
