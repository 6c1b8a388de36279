//! The service files relay ships and installs parse as their service managers read them:
//! the launchd plist as Python's plistlib (expat, as strict as `plutil -lint` about XML),
//! the systemd unit with `systemd-analyze verify` where the machine has it.

use std::path::{Path, PathBuf};
use std::process::Command;

use relay_cli::commands::{launchd_plist, systemd_unit};

/// A path with characters the installers must escape, holding a stand-in relayd.
fn awkward_relayd(dir: &Path, name: &str) -> PathBuf {
    let bin = dir.join(name).join("relayd");
    std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
    std::fs::write(&bin, "#!/bin/sh\necho relayd-ran \"$@\"\n").unwrap();
    std::fs::set_permissions(&bin, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    bin
}

fn python(test: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| std::env::split_paths(&paths).map(|d| d.join("python3")).find(|p| p.is_file()));
    relay_e2e::require(test, "python3", found)
}

/// The plist's ProgramArguments, as plistlib reads them (panics with its error otherwise).
fn program_arguments(python: &Path, plist: &str) -> Vec<String> {
    let script = "import json, plistlib, sys\nprint(json.dumps(plistlib.loads(sys.stdin.buffer.read())['ProgramArguments']))";
    let mut child = Command::new(python)
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), plist.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "plistlib rejects the plist: {}\n{plist}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn the_launchd_plist_parses_and_runs_the_installed_relayd() {
    let Some(python) = python("the_launchd_plist_parses_and_runs_the_installed_relayd") else { return };
    let shipped = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../launchd/com.relay.relayd.plist")).unwrap();
    assert_eq!(program_arguments(&python, &shipped)[..2], ["/bin/sh", "-c"]);

    let dir = tempfile::tempdir().unwrap();
    let relayd = awkward_relayd(dir.path(), "my \"tools\" & <bin> $HOME `x` 100% \\");
    let args = program_arguments(&python, &launchd_plist(&relayd));
    // run the script as launchd would, with a HOME whose log directory exists
    std::fs::create_dir_all(dir.path().join("Library/Logs")).unwrap();
    let out = Command::new(&args[0]).args(&args[1..]).env("HOME", dir.path()).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "relayd-ran\n", "{args:?}");
}

#[test]
fn the_systemd_unit_verifies() {
    let Ok(out) = Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("SKIPPED: the_systemd_unit_verifies (systemd-analyze not available)");
        return;
    };
    assert!(out.status.success());
    let dir = tempfile::tempdir().unwrap();
    let relayd = awkward_relayd(dir.path(), "my tools & <bin> $HOME `x` 100%;");
    let unit = dir.path().join("relayd.service");
    let text = systemd_unit(&relayd).unwrap();
    std::fs::write(&unit, &text).unwrap();
    // system mode: --user needs a running user manager; the unit's syntax is the same
    let out = Command::new("systemd-analyze").arg("verify").arg(&unit).output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && said.trim().is_empty(), "systemd-analyze verify: {said}\n{text}");
    // and it does complain about a broken one, so the check above means something
    std::fs::write(&unit, text.replace("Restart=on-failure", "Restart=sometimes")).unwrap();
    let out = Command::new("systemd-analyze").arg("verify").arg(&unit).output().unwrap();
    assert!(!String::from_utf8_lossy(&out.stderr).trim().is_empty());
    // a path systemd cannot run is refused with words, not written
    for refused in ["a \"quoted\" dir", "it's", "back\\slash"] {
        let err = systemd_unit(&dir.path().join(refused).join("relayd")).unwrap_err();
        assert!(err.to_string().contains("install relayd elsewhere"), "{err}");
    }
}
