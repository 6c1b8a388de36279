//! `relay-server cluster check`: can this node reach NATS, and are the cluster's streams
//! and buckets there, replicated as configured, with their replicas current? Reads only:
//! it creates nothing.

use std::fmt::Write as _;
use std::time::Duration;

use async_nats::jetstream;

use super::super::Result;
use super::{BUCKETS, LOG_STREAM, NatsOptions, REQUEST_TIMEOUT, nats_error, server_addrs};

/// What the check found, line by line, and how many of the lines are problems.
#[derive(Debug, Default)]
pub struct CheckReport {
    pub text: String,
    pub problems: usize,
}

impl CheckReport {
    fn line(&mut self, ok: bool, what: String) {
        if !ok {
            self.problems += 1;
        }
        let _ = writeln!(self.text, "{} {what}", if ok { "ok  " } else { "FAIL" });
    }
}

pub async fn check(options: &NatsOptions) -> Result<CheckReport> {
    let mut report = CheckReport::default();
    let servers = server_addrs(&options.urls)?;
    let client = match async_nats::ConnectOptions::new()
        .name("relay-server cluster check")
        .connection_timeout(Duration::from_secs(5))
        .request_timeout(Some(REQUEST_TIMEOUT))
        .connect(servers)
        .await
    {
        Ok(client) => client,
        Err(e) => {
            report.line(false, format!("cannot connect to {}: {e}", options.urls.join(",")));
            return Ok(report);
        }
    };
    let server = client.server_info();
    report.line(true, format!("connected to {} ({}:{}, nats-server {})", server.server_name, server.host, server.port, server.version));
    let js = jetstream::new(client.clone());
    let names = std::iter::once(LOG_STREAM.to_owned()).chain(BUCKETS.iter().map(|b| format!("KV_{b}")));
    for name in names {
        let what = if name == LOG_STREAM { format!("stream {name}") } else { format!("bucket {}", &name[3..]) };
        let info = match js.get_stream(&name).await {
            Ok(mut stream) => stream.info().await.cloned().map_err(nats_error),
            Err(e) => Err(nats_error(e)),
        };
        let info = match info {
            Ok(info) => info,
            Err(e) => {
                report.line(false, format!("{what}: missing or unreadable ({e}); a relay-server node creates it on start"));
                continue;
            }
        };
        if name == LOG_STREAM {
            let kept = match info.config.max_age {
                age if age.is_zero() => "forever".to_owned(),
                age => format!("for {} day(s)", age.as_secs_f64() / 86_400.0),
            };
            report.line(true, format!("{what}: keeps messages {kept}"));
        }
        let replicas = info.config.num_replicas;
        report.line(
            replicas == options.replicas,
            format!("{what}: {replicas} replica(s), {} wanted; {} message(s)", options.replicas, info.state.messages),
        );
        if let Some(cluster) = &info.cluster {
            let leader = cluster.leader.clone().unwrap_or_default();
            report.line(!leader.is_empty(), format!("{what}: leader {}", if leader.is_empty() { "none (no quorum?)" } else { &leader }));
            for peer in &cluster.replicas {
                let healthy = peer.current && !peer.offline;
                let lag = peer.lag.map(|l| format!(", {l} behind")).unwrap_or_default();
                let state = if peer.offline {
                    "offline"
                } else if peer.current {
                    "current"
                } else {
                    "catching up"
                };
                report.line(healthy, format!("{what}: replica {} {state}{lag}", peer.name));
            }
        }
    }
    Ok(report)
}
