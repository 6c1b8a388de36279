use clap::Parser;
use relay_local::config::{Config, choose_server};
use relayd::args::Args;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    relay_util::init_tracing(args.verbose);
    let config_file = args.config_file();
    let config = match &config_file {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    // the same choice `relay` and `relay mcp` make (relayd asks no relayd)
    let server = choose_server(args.server.as_deref(), config_file, async { None }).await;
    let mut config = args.apply(config);
    config.server = server.url;
    let shutdown = CancellationToken::new();
    tokio::spawn(relay_util::cancel_on_signal(shutdown.clone()));
    relayd::run(config, shutdown).await?;
    Ok(())
}
