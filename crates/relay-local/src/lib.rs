//! What relay's local programs (relayd, the `relay` CLI, relay-pane) share: the client of
//! relayd's socket and where that socket lives, the user's config file, desktop
//! notifications, and what relay knows of the agents in tmux panes (their processes, Claude
//! Code's sessions).
//!
//! The crates graph: `relay-proto` ← `relay-local` ← {`relayd`, `relay-cli`, `relay-pane`};
//! no binary crate depends on another.

pub mod agents;
pub mod claude;
pub mod client;
pub mod config;
pub mod fallback;
pub mod intro;
pub mod notify;
pub mod paths;
