//! Receipts from this pane to relayd, which passes them on to the server: sent in order on
//! one connection, kept and resent when relayd restarts.

use std::path::PathBuf;
use std::time::Duration;

use relay_proto::Receipt;
use relay_proto::local::{Reply, Request};
use tokio::sync::mpsc;

/// Receipts kept while relayd is away; the oldest go first past this.
const BACKLOG: usize = 4096;

pub struct Reporter {
    tx: mpsc::UnboundedSender<Vec<Receipt>>,
}

impl Reporter {
    pub fn spawn(socket: PathBuf, pane: String) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(socket, pane, rx));
        Self { tx }
    }

    pub fn send(&self, receipts: Vec<Receipt>) {
        if !receipts.is_empty() {
            let _ = self.tx.send(receipts);
        }
    }
}

async fn run(socket: PathBuf, pane: String, mut rx: mpsc::UnboundedReceiver<Vec<Receipt>>) {
    let mut backlog: Vec<Receipt> = Vec::new();
    let mut client = None;
    loop {
        if backlog.is_empty() {
            match rx.recv().await {
                Some(batch) => backlog.extend(batch),
                None => return,
            }
        }
        while let Ok(batch) = rx.try_recv() {
            backlog.extend(batch);
        }
        if backlog.len() > BACKLOG {
            backlog.drain(..backlog.len() - BACKLOG);
        }
        if client.is_none() {
            client = relay_local::client::Client::connect(&socket, "relay-pane").await.ok();
        }
        let sent = match client.as_mut() {
            Some(c) => c.request(&Request::Report { pane: pane.clone(), receipts: backlog.clone() }).await,
            None => {
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        match sent {
            Ok(Reply::Reported { .. }) => backlog.clear(),
            Ok(other) => {
                // relayd refused them (the pane was detached, say): resending cannot help
                tracing::warn!(?other, "relayd did not take the receipts");
                backlog.clear();
            }
            Err(_) => {
                client = None;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}
