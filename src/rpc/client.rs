//! XML-RPC calls to other daemons over pooled keep-alive HTTP connections.
//!
//! One [`RpcClient`] is shared by every request a daemon coordinates. hyper's pool keeps idle
//! connections per peer, so a busy balancer reuses warm connections instead of paying a TCP
//! handshake per replica call. Each call is bounded by a timeout; a late reply is dropped
//! with the future that awaited it, so nothing lingers after the timeout.
//!
//! Every answer carries the peer's clock ([`clock::CLOCK_HEADER`]); the client records each
//! exchange in its [`PeerClocks`], so whatever a daemon calls, it learns how far each peer's
//! clock is from its own.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use dxr::Value;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Request, StatusCode};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::clock::{self, Exchange, PeerClocks};
use crate::rpc::codec;
use crate::rpc::transport::{CONNECT_TIMEOUT, DialService};
use crate::security::Outgoing;

/// Idle connections kept per peer; enough for the concurrency one balancer drives.
const MAX_IDLE_CONNECTIONS_PER_PEER: usize = 256;
/// How long an idle pooled connection is kept before it is closed.
const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest response body accepted from a peer: a sibling set of maximum-size values.
pub(crate) const MAX_RESPONSE_BYTES: usize = 256 * 1024 * 1024;

/// Why a call to a peer failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    #[error("timed out")]
    Timeout,
    #[error("unreachable: {0}")]
    Transport(String),
    /// Nothing of the call left this daemon (no connection could be made, or the queue for
    /// the peer refused it): unlike after a timeout, the peer cannot have applied it.
    #[error("unreachable: {0}")]
    Unsent(String),
    /// The caller's time ran out while the call still waited in the queue for its peer
    /// (`balancer::node_queue`): a timeout, but one the peer cannot have acted on.
    #[error("timed out before it was sent")]
    TimedOutUnsent,
    /// The call was refused whole before anything in it was acted on (it could not be
    /// encoded, or the peer refused the exchange with a 4xx status: too large, undecodable).
    #[error("refused: {0}")]
    Refused(String),
    #[error("HTTP status {0}")]
    Status(u16),
    #[error("fault {code}: {message}")]
    Fault { code: i32, message: String },
    #[error("bad response: {0}")]
    BadResponse(String),
    /// The node received the operation after the moment its sender stopped waiting for it,
    /// and refused it unapplied.
    #[error("arrived {late_by_ms} ms after its deadline; refused")]
    Expired { late_by_ms: u64 },
}

impl CallError {
    /// Whether the peer may have received the call, and acted on it, despite the error: the
    /// call went out and no answer came back, or one that could not be read.
    pub fn maybe_applied(&self) -> bool {
        matches!(
            self,
            CallError::Timeout | CallError::Transport(_) | CallError::BadResponse(_)
        )
    }

    /// Whether the error says the peer cannot be reached (down, hung, cut off), rather than
    /// that it answered: what marks a node down.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            CallError::Timeout
                | CallError::TimedOutUnsent
                | CallError::Transport(_)
                | CallError::Unsent(_)
        )
    }
}

#[derive(Clone)]
pub struct RpcClient {
    /// Speaks HTTPS to `https://` URLs (the scheme [`Outgoing::scheme`] picks) and plain HTTP
    /// to the others.
    http: Http,
    /// `http` or `https`, for every call.
    scheme: &'static str,
    /// The headers proving who this daemon is (see [`crate::security::access`]).
    credentials: Vec<(hyper::header::HeaderName, HeaderValue)>,
    max_response_bytes: usize,
    /// The peers' clocks, from every answer this client (and its clones) received.
    clocks: Arc<PeerClocks>,
    /// The daemon's layout version, sent with every call, and told of the versions answers
    /// carry (see [`LAYOUT_HEADER`]).
    beacon: Option<Arc<dyn LayoutBeacon>>,
}

/// hyper-util's pooled client over the connections it opens: TCP, or those of the
/// [`crate::rpc::transport::Dialer`] the daemon was given. Both speak TLS where the URL is
/// `https://`.
#[derive(Clone)]
enum Http {
    Tcp(Client<HttpsConnector<HttpConnector>, Full<Bytes>>),
    Dialed(Client<HttpsConnector<DialService>, Full<Bytes>>),
}

impl Http {
    fn request(&self, request: Request<Full<Bytes>>) -> hyper_util::client::legacy::ResponseFuture {
        match self {
            Http::Tcp(client) => client.request(request),
            Http::Dialed(client) => client.request(request),
        }
    }
}

/// Every internal call and its answer carry the sender's newest layout version in this
/// header, so that a daemon that is behind hears of a change at its next exchange with one
/// that is not, instead of at the next gossip round.
pub const LAYOUT_HEADER: &str = "dynamite-layout";

/// A daemon's side of [`LAYOUT_HEADER`].
pub trait LayoutBeacon: Send + Sync {
    /// The newest layout version this daemon knows (0: none).
    fn own_version(&self) -> u64;
    /// A peer said it knows `version`.
    fn heard_version(&self, version: u64);
}

impl Default for RpcClient {
    fn default() -> Self {
        Self::new()
    }
}

impl RpcClient {
    /// A client over plain HTTP that sends no credential.
    pub fn new() -> Self {
        Self::with_outgoing(&Outgoing::default())
    }

    /// A client whose calls carry `outgoing`'s credential, over HTTPS when it names CAs, on
    /// the connections of its dialer (TCP without one).
    pub fn with_outgoing(outgoing: &Outgoing) -> Self {
        let tls = match &outgoing.tls {
            Some(config) => (**config).clone(),
            None => crate::security::tls::untrusting_client(),
        };
        let tls = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1();
        let mut pool = Client::builder(TokioExecutor::new());
        pool.pool_max_idle_per_host(MAX_IDLE_CONNECTIONS_PER_PEER)
            .pool_idle_timeout(IDLE_CONNECTION_TIMEOUT);
        let http = match &outgoing.dialer {
            None => {
                let mut connector = HttpConnector::new();
                connector.set_nodelay(true);
                connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
                // The TLS layer above takes `https://` URLs.
                connector.enforce_http(false);
                Http::Tcp(pool.build(tls.wrap_connector(connector)))
            }
            Some(dialer) => {
                // The pool then reads `tokio::time` (simulated time under a simulation)
                // instead of `std::time::Instant`, and keeps idle connections: its sweep of
                // expired ones walks a `HashMap`, whose order differs from run to run, and so
                // would the order of the connections' closing messages.
                pool.pool_timer(hyper_util::rt::TokioTimer::new())
                    .pool_idle_timeout(None::<Duration>);
                Http::Dialed(pool.build(tls.wrap_connector(DialService(dialer.clone()))))
            }
        };
        RpcClient {
            http,
            scheme: outgoing.scheme(),
            credentials: outgoing.credentials.clone(),
            max_response_bytes: MAX_RESPONSE_BYTES,
            clocks: Arc::default(),
            beacon: None,
        }
    }

    /// This client, carrying the daemon's layout version (see [`LAYOUT_HEADER`]).
    pub fn with_beacon(mut self, beacon: Arc<dyn LayoutBeacon>) -> Self {
        self.beacon = Some(beacon);
        self
    }

    /// What the exchanges so far tell of the peers' clocks.
    pub fn clocks(&self) -> &PeerClocks {
        &self.clocks
    }

    /// This client, recording its exchanges in `clocks`: a daemon's clients share one, so
    /// that the cluster clock has every node its gossip reaches, not only those its requests
    /// happened to call.
    pub fn with_clocks(mut self, clocks: Arc<PeerClocks>) -> Self {
        self.clocks = clocks;
        self
    }

    /// The clocks this client records in, to share with another client.
    pub fn shared_clocks(&self) -> Arc<PeerClocks> {
        self.clocks.clone()
    }

    /// A client that accepts smaller replies, so tests can pass the cap without 256 MiB.
    #[cfg(test)]
    pub(crate) fn with_max_response_bytes(max_response_bytes: usize) -> Self {
        RpcClient {
            max_response_bytes,
            ..RpcClient::new()
        }
    }

    /// Calls `method` on the daemon at `address` ("host:port"), giving up after `timeout`.
    pub async fn call(
        &self,
        address: &str,
        method: &str,
        params: Vec<Value>,
        timeout: Duration,
    ) -> Result<Value, CallError> {
        let body = codec::call_xml(method, params)
            .map_err(|error| CallError::BadResponse(error.to_string()))?;
        let exchange = async {
            let (status, bytes) = self
                .post(address, "/RPC2", "text/xml", Bytes::from(body))
                .await?;
            if !status.is_success() {
                return Err(CallError::Status(status.as_u16()));
            }
            let text = std::str::from_utf8(&bytes)
                .map_err(|_| CallError::BadResponse("response is not UTF-8".into()))?;
            codec::parse_response(text)
                .map_err(|(code, message)| CallError::Fault { code, message })
        };
        within(timeout, exchange).await
    }

    /// POSTs a binary body to `path` on the daemon at `address`; the reply body, within `timeout`.
    /// A 4xx answer carries the node's reason and becomes a fault.
    pub async fn post_bytes(
        &self,
        address: &str,
        path: &str,
        body: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, CallError> {
        let exchange = async {
            let (status, bytes) = self
                .post(address, path, "application/octet-stream", body)
                .await?;
            if status.is_success() {
                Ok(bytes)
            } else if status.is_client_error() {
                // The whole exchange was refused (a batch the node cannot decode, one too
                // large): no fault of the operations inside, whose callers must not be told
                // their request was invalid. An operation's own refusal comes back inside a
                // successful reply.
                let message = String::from_utf8_lossy(&bytes).trim().to_owned();
                Err(CallError::Refused(format!(
                    "HTTP {}: {message}",
                    status.as_u16()
                )))
            } else {
                Err(CallError::Status(status.as_u16()))
            }
        };
        within(timeout, exchange).await
    }

    /// Is the daemon at `address` serving? `GET /health` within `timeout`.
    pub async fn probe(&self, address: &str, timeout: Duration) -> bool {
        self.check_health(address, timeout).await.is_ok()
    }

    /// As [`Self::probe`], saying why not: refused, a certificate not trusted, a status...
    pub async fn check_health(&self, address: &str, timeout: Duration) -> Result<(), String> {
        let request = Request::get(format!("{}://{address}/health", self.scheme))
            .body(Full::new(Bytes::new()))
            .map_err(|error| error.to_string())?;
        let answered = async {
            let sent_us = clock::now_us();
            let response = self
                .http
                .request(request)
                .await
                .map_err(|error| with_causes(&error))?;
            self.record_clock(address, sent_us, response.headers());
            if let (Some(beacon), Some(version)) =
                (&self.beacon, layout_version_in(response.headers()))
            {
                beacon.heard_version(version);
            }
            let status = response.status();
            // Read the small body so the connection goes back to the pool.
            response
                .into_body()
                .collect()
                .await
                .map_err(|error| error.to_string())?;
            if status.is_success() {
                Ok(())
            } else {
                Err(format!("HTTP status {}", status.as_u16()))
            }
        };
        tokio::time::timeout(timeout, answered)
            .await
            .unwrap_or_else(|_| Err("timed out".into()))
    }

    /// One POST on a pooled connection: the status and the whole (bounded) body.
    async fn post(
        &self,
        address: &str,
        path: &str,
        content_type: &'static str,
        body: Bytes,
    ) -> Result<(StatusCode, Bytes), CallError> {
        let mut request = Request::post(format!("{}://{address}{path}", self.scheme))
            .header(CONTENT_TYPE, HeaderValue::from_static(content_type));
        for (name, value) in &self.credentials {
            request = request.header(name, value.clone());
        }
        if let Some(beacon) = &self.beacon {
            request = request.header(LAYOUT_HEADER, beacon.own_version());
        }
        let request = request
            .body(Full::new(body))
            .map_err(|error| CallError::Refused(error.to_string()))?;
        let sent_us = clock::now_us();
        let response = self.http.request(request).await.map_err(|error| {
            if error.is_connect() {
                CallError::Unsent(with_causes(&error))
            } else {
                CallError::Transport(with_causes(&error))
            }
        })?;
        self.record_clock(address, sent_us, response.headers());
        let status = response.status();
        let bytes = Limited::new(response.into_body(), self.max_response_bytes)
            .collect()
            .await
            .map_err(|error| {
                // A reply over the cap is an answer, however unusable: the peer is up, and
                // reporting it as unreachable would mark a healthy node down.
                if error.is::<LengthLimitError>() {
                    CallError::BadResponse(format!(
                        "reply larger than {} bytes",
                        self.max_response_bytes
                    ))
                } else {
                    CallError::Transport(error.to_string())
                }
            })?
            .to_bytes();
        Ok((status, bytes))
    }
}

/// An error and its causes, one after another: hyper's own text says only "client error
/// (Connect)", while the cause says which (refused, a certificate not trusted...).
fn with_causes(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        let said = inner.to_string();
        if !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        cause = inner.source();
    }
    text
}

/// The layout version a [`LAYOUT_HEADER`] carries.
pub fn layout_version_in(headers: &hyper::HeaderMap) -> Option<u64> {
    headers.get(LAYOUT_HEADER)?.to_str().ok()?.parse().ok()
}

impl RpcClient {
    /// Records the exchange an answer's clock header completes (see [`crate::clock`]).
    fn record_clock(&self, address: &str, sent_us: u64, headers: &hyper::HeaderMap) {
        let answered_us = clock::now_us();
        let Some(reading) = headers
            .get(clock::CLOCK_HEADER)
            .and_then(|value| value.to_str().ok())
            .and_then(clock::parse_header)
        else {
            return;
        };
        self.clocks.record(
            address,
            &Exchange {
                sent_us,
                received_us: reading.received_us,
                replied_us: reading.replied_us,
                answered_us,
            },
            reading.anchor_us,
        );
    }
}

/// Runs `exchange`, or fails with [`CallError::Timeout`] once `timeout` has passed.
async fn within<T>(
    timeout: Duration,
    exchange: impl std::future::Future<Output = Result<T, CallError>>,
) -> Result<T, CallError> {
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or(Err(CallError::Timeout))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a failed call tells its caller about the peer: a refused connection sent nothing
    /// (nothing can have been applied); a peer that took the call and never answered may have
    /// acted on it. Both say the peer is unreachable.
    #[tokio::test]
    async fn a_refused_connection_sent_nothing_and_a_silent_peer_may_have_acted() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let closed_address = closed.local_addr().expect("address").to_string();
        drop(closed);
        let silent_address = crate::rpc::test_node::silent_peer();
        let client = RpcClient::new();
        let call = |address: String| {
            let client = client.clone();
            async move {
                client
                    .post_bytes(
                        &address,
                        "/",
                        Bytes::from_static(b"x"),
                        Duration::from_millis(300),
                    )
                    .await
            }
        };
        match call(closed_address).await {
            Err(error @ CallError::Unsent(_)) => {
                assert!(!error.maybe_applied() && error.is_unreachable(), "{error}")
            }
            other => panic!("a refused connection: expected unsent, got {other:?}"),
        }
        match call(silent_address).await {
            Err(error @ CallError::Timeout) => {
                assert!(error.maybe_applied() && error.is_unreachable(), "{error}")
            }
            other => panic!("a silent peer: expected a timeout, got {other:?}"),
        }
    }
}
