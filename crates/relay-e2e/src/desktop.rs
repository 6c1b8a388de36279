//! A desktop for notification tests: a private session bus (dbus-daemon) and a real
//! notification server (dunst on an Xvfb display). Everything is killed when dropped.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::{KillOnDrop, require};

pub struct Desktop {
    /// `DBUS_SESSION_BUS_ADDRESS` for the processes that should notify.
    pub bus: String,
    _children: Vec<KillOnDrop>,
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(tool)).find(|p| p.is_file())
}

fn spawn(cmd: &mut Command) -> Child {
    cmd.stdin(Stdio::null()).stderr(Stdio::null()).spawn().unwrap_or_else(|e| panic!("start {cmd:?}: {e}"))
}

impl Desktop {
    /// None (the test skips, or fails under CI) when the tools are missing.
    pub fn start(test: &str) -> Option<Self> {
        let tools = ["dbus-daemon", "Xvfb", "dunst", "dunstctl"];
        let found = tools.iter().all(|t| which(t).is_some()).then(|| PathBuf::from("/"));
        require(test, "dbus-daemon, Xvfb and dunst", found)?;
        let mut children = Vec::new();
        let mut bus = spawn(Command::new("dbus-daemon").args(["--session", "--nofork", "--print-address=1"]).stdout(Stdio::piped()));
        let mut address = String::new();
        BufReader::new(bus.stdout.take().expect("piped")).read_line(&mut address).expect("bus address");
        children.push(KillOnDrop(bus));
        let mut xvfb = spawn(Command::new("Xvfb").args(["-displayfd", "1", "-nolisten", "tcp"]).stdout(Stdio::piped()));
        let mut display = String::new();
        let mut out = xvfb.stdout.take().expect("piped");
        let mut byte = [0u8; 1];
        while out.read(&mut byte).unwrap_or(0) == 1 && byte[0] != b'\n' {
            display.push(byte[0] as char);
        }
        children.push(KillOnDrop(xvfb));
        let bus = address.trim().to_owned();
        let dunst = spawn(
            Command::new("dunst")
                .env("DISPLAY", format!(":{}", display.trim()))
                .env("DBUS_SESSION_BUS_ADDRESS", &bus)
                .stdout(Stdio::null()),
        );
        children.push(KillOnDrop(dunst));
        Some(Self { bus, _children: children })
    }

    fn dunstctl(&self, args: &[&str]) -> String {
        let out = Command::new("dunstctl").args(args).env("DBUS_SESSION_BUS_ADDRESS", &self.bus).output().expect("dunstctl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Every notification shown so far (dunst's history, as JSON text), once one is shown.
    pub fn shown(&self) -> Option<String> {
        if self.dunstctl(&["count", "displayed"]).trim() == "0" && self.dunstctl(&["count", "history"]).trim() == "0" {
            return None;
        }
        self.dunstctl(&["close-all"]);
        std::thread::sleep(std::time::Duration::from_millis(200));
        Some(self.dunstctl(&["history"]))
    }
}
