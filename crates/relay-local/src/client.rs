//! A client of relayd's control socket, for the CLI, the pane and tests.

use std::path::Path;

use interprocess::local_socket::GenericFilePath;
use interprocess::local_socket::tokio::Stream;
use interprocess::local_socket::tokio::prelude::*;
use relay_proto::local::{self, FrameReader, PROTOCOL_VERSION, Reply, Request};
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("relayd is not running (no socket at {path}): {source}")]
    NotRunning { path: String, source: std::io::Error },
    #[error("lost the connection to relayd: {0}")]
    Io(#[from] std::io::Error),
    #[error("relayd sent a frame this client cannot read: {0}")]
    BadFrame(#[from] local::FrameError),
    #[error("relayd closed the connection")]
    Closed,
    #[error("relayd refused the hello: {0:?}")]
    Refused(Box<Reply>),
}

pub struct Client {
    stream: Stream,
    reader: FrameReader,
}

impl Client {
    /// Connects and exchanges hellos.
    pub async fn connect(path: &Path, client_name: &str) -> Result<Self, ClientError> {
        let stream = connect(path).await.map_err(|source| ClientError::NotRunning { path: path.display().to_string(), source })?;
        let mut client = Self { stream, reader: FrameReader::default() };
        let hello = Request::Hello { version: PROTOCOL_VERSION, client: client_name.to_owned() };
        match client.request(&hello).await? {
            Reply::Hello { .. } => Ok(client),
            other => Err(ClientError::Refused(Box::new(other))),
        }
    }

    pub async fn send(&mut self, request: &Request) -> Result<(), ClientError> {
        (&mut &self.stream).write_all(local::encode(request).as_bytes()).await?;
        Ok(())
    }

    /// Sends raw bytes; for tests of the daemon's frame handling.
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        (&mut &self.stream).write_all(bytes).await?;
        Ok(())
    }

    pub async fn request(&mut self, request: &Request) -> Result<Reply, ClientError> {
        self.send(request).await?;
        self.next().await
    }

    /// The next frame from the daemon.
    pub async fn next(&mut self) -> Result<Reply, ClientError> {
        let mut buf = [0u8; 16 * 1024];
        loop {
            if let Some(line) = self.reader.next_line() {
                return Ok(local::decode(&line?)?);
            }
            let n = (&mut &self.stream).read(&mut buf).await?;
            if n == 0 {
                return Err(ClientError::Closed);
            }
            self.reader.push(&buf[..n]);
        }
    }
}

/// Opens a connection to the socket at `path`, without the hello.
pub async fn connect(path: &Path) -> std::io::Result<Stream> {
    Stream::connect(path.to_fs_name::<GenericFilePath>()?).await
}
