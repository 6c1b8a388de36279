use clap::Parser;
use relayd::config::{Args, Config};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    relay_util::init_tracing(args.verbose);
    let config = match args.config_file() {
        Some(path) => Config::load(&path)?,
        None => Config::default(),
    };
    let config = args.apply(config);
    let shutdown = CancellationToken::new();
    tokio::spawn(relay_util::cancel_on_signal(shutdown.clone()));
    relayd::run(config, shutdown).await?;
    Ok(())
}
