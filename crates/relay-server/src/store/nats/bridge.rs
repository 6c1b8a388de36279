//! The store trait is synchronous (SQLite, the default, answers in microseconds and pays
//! nothing for it); the NATS client is asynchronous. The client lives on a small runtime
//! of its own, and a store call waits for its answer. On the server's multi-threaded
//! runtime the wait hands the worker's other tasks to another thread first
//! (`block_in_place`), so a slow NATS never stalls unrelated connections.

use std::future::Future;
use std::sync::mpsc;

use tokio::runtime::{Builder, Handle, Runtime, RuntimeFlavor};

use super::super::{Result, StoreError};

pub struct Bridge {
    runtime: Option<Runtime>,
    handle: Handle,
}

impl Bridge {
    pub fn new() -> Result<Self> {
        let runtime = Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("relay-nats")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Nats(format!("cannot start the NATS client's runtime: {e}")))?;
        Ok(Self { handle: runtime.handle().clone(), runtime: Some(runtime) })
    }

    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Runs `work` on the client's runtime and waits for its answer.
    pub fn call<T: Send + 'static>(&self, work: impl Future<Output = Result<T>> + Send + 'static) -> Result<T> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.handle.spawn(async move {
            let _ = tx.send(work.await);
        });
        let wait = move || rx.recv().unwrap_or_else(|_| Err(StoreError::Nats("the NATS client stopped".into())));
        match Handle::try_current() {
            Ok(current) if current.runtime_flavor() == RuntimeFlavor::MultiThread => tokio::task::block_in_place(wait),
            _ => wait(),
        }
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        // dropping a runtime blocks, which is refused inside another runtime
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}
