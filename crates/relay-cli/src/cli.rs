//! The command line.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// relay: real-time messages between AI coding agents in tmux panes.
#[derive(Debug, Parser)]
#[command(version, about, propagate_version = true)]
pub struct Cli {
    /// relayd's control socket [default: $XDG_RUNTIME_DIR/relay/relayd.sock]
    #[arg(long, global = true, env = "RELAYD_SOCKET")]
    pub socket: Option<PathBuf>,
    /// More logging on stderr (-v debug, -vv trace); RUST_LOG overrides
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Attach the agent in a tmux pane to a relay group, with a sidebar beside it
    Attach(AttachArgs),
    /// Leave the group(s) and close the pane's sidebar
    Detach {
        /// The pane [default: the one this runs in]
        pane: Option<String>,
        /// Only this group
        #[arg(long)]
        group: Option<String>,
    },
    /// The daemon, its server connections and the attachments
    Status {
        #[arg(long)]
        json: bool,
    },
    /// The peers in the pane's groups
    Peers {
        #[arg(long, env = "TMUX_PANE")]
        pane: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Broadcast to a group as the pane's peer
    Send {
        #[arg(long)]
        group: Option<String>,
        #[arg(long, env = "TMUX_PANE")]
        pane: Option<String>,
        text: String,
    },
    /// Send a DM as the pane's peer
    Dm {
        peer: String,
        text: String,
        #[arg(long, env = "TMUX_PANE")]
        pane: Option<String>,
    },
    /// A group's recent messages
    History {
        #[arg(long)]
        group: Option<String>,
        #[arg(long, env = "TMUX_PANE")]
        pane: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// The stdio MCP server for the agent: the relay's tools, as this pane's peer
    Mcp {
        #[arg(long, env = "TMUX_PANE")]
        pane: Option<String>,
    },
    /// Open the console in a browser: a one-time sign-in link for you on a relay-server
    Console(ConsoleArgs),
    /// Install or remove relayd as a user service (systemd or launchd)
    Service {
        #[command(subcommand)]
        action: ServiceAction,
    },
    /// Shell completions
    Completions { shell: clap_complete::Shell },
}

#[derive(Debug, Subcommand)]
pub enum ServiceAction {
    Install,
    Uninstall,
}

#[derive(Debug, clap::Args)]
pub struct AttachArgs {
    /// A tmux pane id (%3) or target (sess:1.0); without it, pick among the panes running an agent
    pub pane: Option<String>,
    #[arg(long, short, env = "RELAY_GROUP")]
    pub group: String,
    /// Display name [default: host:directory]
    #[arg(long)]
    pub name: Option<String>,
    /// relay-server URL [default: relayd's configured server]
    #[arg(long, env = "RELAY_SERVER")]
    pub server: Option<String>,
    #[arg(long, env = "RELAY_JOIN_KEY")]
    pub join_key: Option<String>,
    /// Attach even if no agent runs in the pane
    #[arg(long)]
    pub force: bool,
    /// Do not add `relay mcp` to Claude Code's MCP servers
    #[arg(long)]
    pub no_mcp_config: bool,
    /// Sidebar width in columns
    #[arg(long, default_value_t = 42)]
    pub width: u32,
    /// When Claude Code will not let a message in through its inbox (refused, denied,
    /// expired), announce it by keystrokes instead ("keys"); by default relay only reports it
    #[arg(long, value_enum, default_value_t)]
    pub fallback: relay_local::fallback::Fallback,
    /// Let relay's MCP tools run without a permission prompt in Claude Code (adds
    /// "mcp__relay" to permissions.allow in its settings.json)
    #[arg(long)]
    pub allow_tools: bool,
}

#[derive(Debug, clap::Args)]
pub struct ConsoleArgs {
    /// relay-server URL [default: relayd's configured server]
    #[arg(long, env = "RELAY_SERVER")]
    pub server: Option<String>,
    /// Your name in the console, the first time [default: your login name]
    #[arg(long)]
    pub name: Option<String>,
    /// Print the link; do not open a browser
    #[arg(long)]
    pub no_open: bool,
    /// End every console session of yours on the server (every browser signs in again)
    #[arg(long, conflicts_with_all = ["pair", "pair_with", "no_open"])]
    pub sign_out_everywhere: bool,
    /// Print a one-time code that lets another machine's relayd act for you (its agents show in your console)
    #[arg(long, conflicts_with_all = ["pair_with", "no_open"])]
    pub pair: bool,
    /// Redeem a code from `relay console --pair` on your other machine
    #[arg(long, value_name = "CODE", conflicts_with = "no_open")]
    pub pair_with: Option<String>,
}
