//! One control connection: hello, then requests and replies, or a subscription's events.

use std::collections::BTreeMap;
use std::sync::Arc;

use interprocess::local_socket::tokio::Stream;
use relay_proto::EventKind;
use relay_proto::local::{self, ErrorCode, FrameReader, PROTOCOL_VERSION, Reply, Request};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::daemon::{Daemon, Failure, Subscription};
use crate::socket::{peer_allowed, peer_euid};
use relay_local::paths::euid;

pub async fn serve(daemon: Arc<Daemon>, stream: Stream) {
    let peer = peer_euid(&stream);
    if !peer_allowed(peer, euid()) {
        tracing::warn!(?peer, "refused a control connection from another user");
        return;
    }
    let connection = Connection { daemon, stream: &stream, reader: FrameReader::default(), greeted: false };
    if let Err(e) = connection.run().await {
        tracing::debug!(error = %e, "control connection ended");
    }
}

struct Connection<'a> {
    daemon: Arc<Daemon>,
    stream: &'a Stream,
    reader: FrameReader,
    greeted: bool,
}

impl Connection<'_> {
    async fn run(mut self) -> std::io::Result<()> {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            while let Some(line) = self.reader.next_line() {
                let request = line.and_then(|l| local::decode::<Request>(&l));
                match request {
                    Err(e) => self.send(&Reply::Error { code: e.code(), message: e.to_string() }).await?,
                    Ok(Request::Subscribe { pane, since }) if self.greeted => return self.subscribe(pane, since).await,
                    Ok(request) => {
                        let shutdown = matches!(request, Request::Shutdown) && self.greeted;
                        let reply = self.handle(request).await;
                        self.send(&reply).await?;
                        if shutdown {
                            self.daemon.shutdown.cancel();
                            return Ok(());
                        }
                    }
                }
            }
            let mut reader = self.stream;
            let n = tokio::select! {
                _ = self.daemon.shutdown.cancelled() => return Ok(()),
                n = reader.read(&mut buf) => n?,
            };
            if n == 0 {
                return Ok(());
            }
            self.reader.push(&buf[..n]);
        }
    }

    async fn send(&self, reply: &Reply) -> std::io::Result<()> {
        let mut writer = self.stream;
        writer.write_all(local::encode(reply).as_bytes()).await
    }

    async fn handle(&mut self, request: Request) -> Reply {
        if !self.greeted {
            return match request {
                Request::Hello { version, client } if version == PROTOCOL_VERSION => {
                    self.greeted = true;
                    tracing::debug!(%client, "client connected");
                    Reply::Hello { version: PROTOCOL_VERSION, daemon: env!("CARGO_PKG_VERSION").to_owned() }
                }
                Request::Hello { version, .. } => error((
                    ErrorCode::VersionMismatch,
                    format!("this relayd speaks protocol {PROTOCOL_VERSION}, the client {version}; update both to the same release"),
                )),
                _ => error((ErrorCode::HelloFirst, "say hello first: {\"type\":\"hello\",\"version\":1,\"client\":\"…\"}".into())),
            };
        }
        let outcome = match request {
            Request::Hello { .. } => Ok(Reply::Hello { version: PROTOCOL_VERSION, daemon: env!("CARGO_PKG_VERSION").to_owned() }),
            Request::Attach(req) => self.daemon.attach(req).await,
            Request::Detach { pane, group } => self.daemon.detach(&pane, group.as_deref()).await,
            Request::Status => Ok(Reply::Status { status: self.daemon.status() }),
            Request::Credentials { pane } => self.daemon.credentials(&pane),
            Request::Report { pane, receipts } => self.daemon.report(&pane, receipts),
            Request::Agent { pane, agent } => Ok(self.daemon.agent_started(&pane, agent)),
            Request::Delivery { pane, path, activity } => self.daemon.delivery(&pane, path, activity),
            Request::Peers { pane } => self.daemon.peers(&pane).await,
            Request::MessageStatus { pane, group, message_id } => self.daemon.message_status(&pane, &group, &message_id).await,
            Request::Send(req) => self.daemon.send(req).await,
            Request::Console { server, action } => self.daemon.console(server, action).await,
            Request::Shutdown => Ok(Reply::ShuttingDown),
            Request::Subscribe { .. } => unreachable!("handled by run"),
        };
        outcome.unwrap_or_else(error)
    }

    /// Streams the pane's events until the client hangs up: first what it missed after
    /// `since` (per group), then live ones, never one twice.
    async fn subscribe(self, pane: String, since: BTreeMap<String, u64>) -> std::io::Result<()> {
        let Subscription { id, attachments, events: mut live, mut agents } = self.daemon.subscribe(&pane);
        let result = async {
            let view = attachments.iter().map(|a| a.attachment.clone()).collect();
            self.send(&Reply::Subscribed { pane: pane.clone(), attachments: view }).await?;
            let mut delivered = self.daemon.since_defaults(&attachments);
            // per group: its server, and how often relayd had seen that server's log start over
            let mut restarts_seen: BTreeMap<String, (&str, u64)> = attachments
                .iter()
                .map(|a| {
                    let (server, group) = (a.attachment.server.as_str(), &a.attachment.group);
                    (group.clone(), (server, self.daemon.log_restarts(server, group)))
                })
                .collect();
            for a in &attachments {
                let Some(&from) = since.get(&a.attachment.group) else { continue };
                let current = delivered.get(&a.attachment.group).copied().unwrap_or(0);
                if from >= current {
                    delivered.insert(a.attachment.group.clone(), from);
                    continue;
                }
                match self.daemon.catch_up(a, from).await {
                    Ok(missed) => {
                        let mut last = from;
                        for event in missed.into_iter().filter(|e| e.seq <= current) {
                            last = event.seq;
                            self.send(&Reply::Event { pane: pane.clone(), event }).await?;
                        }
                        delivered.insert(a.attachment.group.clone(), last.max(current));
                    }
                    Err(e) => {
                        tracing::warn!(%pane, error = %e, "cannot fetch what a subscriber missed");
                        delivered.insert(a.attachment.group.clone(), from);
                    }
                }
            }
            let mut buf = [0u8; 512];
            let mut reader = self.stream;
            loop {
                tokio::select! {
                    event = live.recv() => {
                        let Some(event) = event else { return Ok(()) }; // dropped as too slow
                        if event.kind != EventKind::Receipt {
                            let seen = delivered.entry(event.group.clone()).or_default();
                            // a server that lost its data numbers its events from 1 again
                            if let Some((server, before)) = restarts_seen.get_mut(event.group.as_str()) {
                                let restarts = self.daemon.log_restarts(server, &event.group);
                                if std::mem::replace(before, restarts) != restarts {
                                    *seen = 0;
                                }
                            }
                            if event.seq <= *seen {
                                continue;
                            }
                            *seen = event.seq;
                        }
                        self.send(&Reply::Event { pane: pane.clone(), event }).await?;
                    }
                    agent = agents.recv() => {
                        let Some(agent) = agent else { return Ok(()) }; // dropped as too slow
                        self.send(&Reply::Agent { pane: pane.clone(), agent }).await?;
                    }
                    n = reader.read(&mut buf) => {
                        if n? == 0 {
                            return Ok(()); // the client hung up
                        }
                    }
                    _ = self.daemon.shutdown.cancelled() => return Ok(()),
                }
            }
        }
        .await;
        self.daemon.unsubscribe(id);
        result
    }
}

fn error((code, message): Failure) -> Reply {
    Reply::Error { code, message }
}
