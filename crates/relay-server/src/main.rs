use anyhow::Context;
use clap::Parser;
use relay_server::config::{Args, ClusterCommand, Command, Config};
use tokio_util::sync::CancellationToken;

// jemalloc: a fifth less CPU per tool call than glibc's malloc, whose free-list
// consolidation showed in profiles (relay-bench, measured side by side), for ~2 MB of RSS.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    relay_util::init_tracing(args.verbose);
    let config = match args.config_file() {
        Some(path) => Config::load(&path)?,
        None => Config::default(),
    };
    let command = args.command.take();
    let config = args.apply(config);
    match command {
        Some(Command::Cluster { action: ClusterCommand::Check }) => {
            let report = relay_server::cluster_check(&config).await?;
            print!("{}", report.text);
            if report.problems > 0 {
                anyhow::bail!("{} problem(s) found", report.problems);
            }
            println!("the cluster looks right");
            return Ok(());
        }
        Some(Command::Migrate { from, to }) => {
            let done = relay_server::migrate(&config, &from, to, &mut |line| println!("{line}"))?;
            println!(
                "copied {} group(s), {} entries, {} peer(s), {} token(s), {} daemon(s), {} delivery record(s)",
                done.groups, done.entries, done.peers, done.principals, done.daemons, done.deliveries
            );
            return Ok(());
        }
        None => {}
    }
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
