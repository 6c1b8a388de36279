//! The `relay` command, and the pieces of it other binaries share (reaching relayd, acting
//! as a pane's peer on the server, finding a pane's Claude Code session).

pub mod attach;
pub mod bridge;
pub mod cli;
pub mod commands;
pub mod daemon;
