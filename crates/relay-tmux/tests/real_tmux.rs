//! The real implementation against a real tmux server on its own socket (`tmux -L`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use relay_tmux::*;

/// A private tmux server, killed when the test ends.
struct Server {
    tmux: RealTmux,
    name: String,
}

impl Server {
    fn start(test: &str) -> Option<Self> {
        let found =
            std::process::Command::new("tmux").arg("-V").output().ok().filter(|o| o.status.success()).map(|_| PathBuf::from("tmux"));
        relay_e2e::require(test, "tmux", found)?;
        let name = format!("relay-test-{}-{}", std::process::id(), test);
        let tmux = RealTmux::named(&name);
        tmux.run(&["-f", "/dev/null", "new-session", "-d", "-s", "t", "-x", "200", "-y", "50", "cat"]).unwrap();
        Some(Self { tmux, name })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let tmux = RealTmux::named(&self.name);
        let socket = tmux.run(&["display-message", "-p", "#{socket_path}"]).ok();
        let _ = tmux.run(&["kill-server"]);
        if let Some(path) = socket {
            let _ = std::fs::remove_file(path.trim());
        }
    }
}

fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn panes_splits_keys_and_captures_on_a_real_server() {
    let Some(server) = Server::start("panes_splits_keys_and_captures_on_a_real_server") else { return };
    let t = &server.tmux;
    let panes = list_panes(t).unwrap();
    assert_eq!(panes.len(), 1);
    let first = &panes[0];
    assert!(first.id.starts_with('%'));
    assert_eq!(pane(t, &first.id).unwrap().target, "t:0.0");
    assert_eq!(pane(t, "t:0.0").unwrap().id, first.id);
    assert!(!first.in_mode);

    // typed text arrives literally; key names and leading dashes are not interpreted
    send_literal(t, &first.id, "-hello Enter C-c $(rm) ;").unwrap();
    send_enter(t, &first.id).unwrap();
    wait_for("the typed line", || capture(t, &first.id).unwrap().lines().filter(|l| l.contains("-hello Enter C-c $(rm) ;")).count() == 2);

    // a split beside, focus kept on the original
    let side = split_beside(t, &first.id, 40, "sleep 600").unwrap();
    assert_ne!(side, first.id);
    assert_eq!(pane(t, &side).unwrap().width, 40);
    let active = t.run(&["display-message", "-p", "-t", "t:0", "#{pane_id}"]).unwrap();
    assert_eq!(active.trim(), first.id);
    assert_eq!(panes_started_with(t, "sleep 600").unwrap(), std::slice::from_ref(&side));

    // copy mode is visible, so nobody types into it
    t.run(&["copy-mode", "-t", &first.id]).unwrap();
    assert!(pane(t, &first.id).unwrap().in_mode);

    kill_pane(t, &side).unwrap();
    assert!(pane(t, &side).is_err());
}
