use clap::{CommandFactory, Parser};
use relay_cli::cli::{Cli, Command, ServiceAction};
use relay_cli::{attach, bridge, commands, daemon};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    relay_util::init_tracing_quiet(cli.verbose);
    let socket = daemon::socket_path(cli.socket.as_deref());
    match cli.command {
        Command::Attach(args) => attach::attach(&socket, args).await,
        Command::Detach { pane, group } => attach::detach(&socket, pane, group).await,
        Command::Status { json } => commands::status(&socket, json).await,
        Command::Peers { pane, json } => commands::peers(&socket, pane, json).await,
        Command::Send { group, pane, text } => commands::send(&socket, pane, group, text).await,
        Command::Dm { peer, text, pane } => commands::dm(&socket, pane, peer, text).await,
        Command::History { group, pane, limit } => commands::history(&socket, pane, group, limit).await,
        Command::Mcp { pane } => bridge::serve(socket, pane).await,
        Command::Console(args) => commands::console(&socket, args).await,
        Command::Service { action } => commands::service(matches!(action, ServiceAction::Install)),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "relay", &mut std::io::stdout());
            Ok(())
        }
    }
}
