//! What relayd remembers across restarts: its credential on each server, the attachments
//! (with their peer tokens) and where each upstream stream stopped. One JSON file, private
//! (0600), replaced atomically.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use relay_proto::local::{Attachment, Credential};
use serde::{Deserialize, Serialize};

pub const STATE_FILE: &str = "state.json";
const STATE_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonCredential {
    pub daemon_id: String,
    pub token: String,
}

/// An attachment with its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredAttachment {
    #[serde(flatten)]
    pub attachment: Attachment,
    pub token: String,
    /// The name the attach asked for; with host and directory it is the peer's identity
    /// on the server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_name: Option<String>,
}

impl StoredAttachment {
    pub fn credential(&self) -> Credential {
        Credential {
            server: self.attachment.server.clone(),
            group: self.attachment.group.clone(),
            peer_id: self.attachment.peer_id.clone(),
            token: self.token.clone(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct State {
    pub version: u32,
    /// By server URL.
    pub daemons: BTreeMap<String, DaemonCredential>,
    pub attachments: Vec<StoredAttachment>,
    /// By "server group": the last event received on that upstream.
    pub last_event_ids: BTreeMap<String, u64>,
}

pub fn upstream_key(server: &str, group: &str) -> String {
    format!("{server} {group}")
}

impl State {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(STATE_FILE)
    }

    /// The saved state, or an empty one when there is none yet.
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let path = Self::path(dir);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| anyhow::anyhow!("{} is damaged ({e}); move it aside to start afresh", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self { version: STATE_VERSION, ..Self::default() }),
            Err(e) => Err(anyhow::anyhow!("cannot read {}: {e}", path.display())),
        }
    }

    /// Saves atomically and privately: the state holds tokens.
    pub fn save(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        let mut state = self.clone();
        state.version = STATE_VERSION;
        relay_util::write_atomically(&Self::path(dir), &serde_json::to_vec_pretty(&state).expect("state serializes"), 0o600)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_privately_and_atomically_and_loads_back() {
        let dir = tempfile::tempdir().unwrap();
        let state_dir = dir.path().join("state");
        assert_eq!(State::load(&state_dir).unwrap().attachments.len(), 0);
        let mut state = State::default();
        state.daemons.insert("http://s".into(), DaemonCredential { daemon_id: "d_1".into(), token: "rly_d".into() });
        state.attachments.push(StoredAttachment {
            attachment: Attachment {
                pane: "%3".into(),
                server: "http://s".into(),
                group: "g".into(),
                peer_id: "p_1".into(),
                display_name: "box:api".into(),
                working_directory: "/w".into(),
            },
            token: "rly_p".into(),
            requested_name: None,
        });
        state.last_event_ids.insert(upstream_key("http://s", "g"), 42);
        state.save(&state_dir).unwrap();
        let loaded = State::load(&state_dir).unwrap();
        assert_eq!(loaded.attachments, state.attachments);
        assert_eq!(loaded.last_event_ids[&upstream_key("http://s", "g")], 42);
        let mode = std::fs::metadata(State::path(&state_dir)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // no temp files left behind
        assert_eq!(std::fs::read_dir(&state_dir).unwrap().count(), 1);

        std::fs::write(State::path(&state_dir), b"{ broken").unwrap();
        let err = State::load(&state_dir).unwrap_err().to_string();
        assert!(err.contains("damaged"), "{err}");
    }
}
