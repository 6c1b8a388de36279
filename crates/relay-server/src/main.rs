use anyhow::Context;
use clap::Parser;
use relay_server::config::{Args, Config};
use tokio_util::sync::CancellationToken;

// jemalloc: a fifth less CPU per tool call than glibc's malloc, whose free-list
// consolidation showed in profiles (relay-bench, measured side by side), for ~2 MB of RSS.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    relay_util::init_tracing(args.verbose);
    let config = match args.config_file() {
        Some(path) => Config::load(&path)?,
        None => Config::default(),
    };
    let config = args.apply(config);
    // every event stream holds a descriptor; the soft limit is often a mere 1024
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        tracing::warn!(error = %e, "cannot raise the open-file limit");
    }
    let listener = tokio::net::TcpListener::bind(config.listen).await.with_context(|| format!("cannot listen on {}", config.listen))?;
    let shutdown = CancellationToken::new();
    tokio::spawn(relay_util::cancel_on_signal(shutdown.clone()));
    relay_server::run(config, listener, shutdown).await?;
    Ok(())
}
