//! Where a daemon's connections come from: accepted by a [`Listener`], opened by a
//! [`Dialer`].
//!
//! In production both are TCP: the server accepts from a `tokio::net::TcpListener`, and the
//! pooled client ([`super::client::RpcClient`]) opens connections with hyper-util's
//! `HttpConnector`. A test can put another network underneath, such as a deterministic
//! simulation's (tokio-rs's turmoil, `tests/simulation.rs`): it gives the server a listener of
//! its own and the client a dialer (through [`crate::security::Outgoing::dialer`]), and the
//! daemons run unchanged above it, HTTP, TLS and all. Nothing else in the crate opens a
//! socket.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

/// A byte stream both ways: a TCP connection, or a simulated one.
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Stream for T {}

/// What the server accepts connections from.
pub trait Listener: Send + 'static {
    type Stream: Stream;
    /// The next connection. An error is the listener's (out of file descriptors and the
    /// like): the server backs off and accepts again.
    fn accept(&mut self) -> impl Future<Output = io::Result<Self::Stream>> + Send;
}

impl Listener for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;

    async fn accept(&mut self) -> io::Result<Self::Stream> {
        let (stream, _) = tokio::net::TcpListener::accept(self).await?;
        // Requests and answers are small and latency-bound: no Nagle delay.
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }
}

/// A connection a [`Dialer`] opened.
pub type DialFuture = Pin<Box<dyn Future<Output = io::Result<Box<dyn Stream>>> + Send>>;

/// Opens connections to other daemons, in place of TCP.
pub trait Dialer: Send + Sync + 'static {
    /// A connection to `host`:`port`, named as the layout and `-s` name daemons (a host
    /// name or an IP address).
    fn dial(&self, host: &str, port: u16) -> DialFuture;
}

/// How long opening a connection may take, whatever opens it: a peer that does not answer
/// a SYN counts as unreachable after this.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// A [`Dialer`] as hyper-util's client takes a connector: a service from a URI to a
/// connection.
#[derive(Clone)]
pub(crate) struct DialService(pub(crate) Arc<dyn Dialer>);

impl tower_service::Service<Uri> for DialService {
    type Response = Dialed;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Dialed>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let Some(host) = uri.host() else {
            return Box::pin(std::future::ready(Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("no host in {uri}"),
            ))));
        };
        let default_port = if uri.scheme_str() == Some("https") {
            443
        } else {
            80
        };
        let port = uri.port_u16().unwrap_or(default_port);
        let opening = self.0.dial(host, port);
        Box::pin(async move {
            match tokio::time::timeout(CONNECT_TIMEOUT, opening).await {
                Ok(stream) => Ok(Dialed(TokioIo::new(stream?))),
                Err(_) => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "connection timed out",
                )),
            }
        })
    }
}

/// A dialed connection, as hyper reads and writes it.
pub(crate) struct Dialed(TokioIo<Box<dyn Stream>>);

impl Connection for Dialed {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for Dialed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Dialed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::DuplexStream;
    use tokio::sync::{mpsc, oneshot};

    use super::*;
    use crate::config::NodeConfig;
    use crate::rpc::client::RpcClient;
    use crate::security::{Outgoing, Security};
    use crate::storage::StorageConfig;

    /// Connections as in-memory pipes: the dialer keeps one end and hands the other to the
    /// listener.
    struct PipeListener(mpsc::UnboundedReceiver<DuplexStream>);

    impl Listener for PipeListener {
        type Stream = DuplexStream;

        async fn accept(&mut self) -> io::Result<DuplexStream> {
            match self.0.recv().await {
                Some(stream) => Ok(stream),
                // No dialer left: nothing will ever come.
                None => std::future::pending().await,
            }
        }
    }

    struct PipeDialer {
        listener: mpsc::UnboundedSender<DuplexStream>,
        dialed: AtomicUsize,
    }

    impl Dialer for PipeDialer {
        fn dial(&self, _host: &str, _port: u16) -> DialFuture {
            let (ours, theirs) = tokio::io::duplex(64 * 1024);
            self.dialed.fetch_add(1, Ordering::Relaxed);
            let handed = self.listener.send(theirs);
            Box::pin(async move {
                handed.map_err(|_| io::Error::from(io::ErrorKind::ConnectionRefused))?;
                Ok(Box::new(ours) as Box<dyn Stream>)
            })
        }
    }

    /// A storage node served from a listener of its own answers the pooled client over the
    /// connections of a dialer of its own: the daemons' HTTP and XML-RPC, with no socket.
    #[tokio::test]
    async fn a_node_serves_through_a_listener_and_a_dialer_of_its_own() {
        let (to_listener, accepted) = mpsc::unbounded_channel();
        let config = NodeConfig {
            listen: "127.0.0.1:0".parse().expect("address"),
            peers: vec![],
            storage: StorageConfig::InMemory,
            log_requests: false,
            max_request_bytes: 1 << 20,
            ring: None,
            aae_interval: Duration::from_secs(1),
            aae_max_keys: 1000,
            cache_bytes: 0,
            advertise: "node.pipe:1".into(),
            zone: String::new(),
            replicas: 3,
            security: Security::default(),
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let node = tokio::spawn(crate::node::run(
            config,
            PipeListener(accepted),
            async move {
                let _ = stopped.await;
            },
        ));
        let dialer = Arc::new(PipeDialer {
            listener: to_listener,
            dialed: AtomicUsize::new(0),
        });
        let client = RpcClient::with_outgoing(&Outgoing {
            dialer: Some(dialer.clone()),
            ..Outgoing::default()
        });
        let timeout = Duration::from_secs(5);
        client
            .check_health("node.pipe:1", timeout)
            .await
            .expect("GET /health through the pipe");
        for _ in 0..3 {
            let methods = client
                .call("node.pipe:1", "system.listMethods", vec![], timeout)
                .await
                .expect("system.listMethods through the pipe");
            assert!(format!("{methods:?}").contains("local.put"), "{methods:?}");
        }
        // Every call went through the dialer's pipes (TCP to node.pipe:1 cannot connect).
        assert!(dialer.dialed.load(Ordering::Relaxed) >= 1);
        stop.send(()).expect("the node runs");
        node.await
            .expect("the node's task")
            .expect("the node stops cleanly");
    }
}
