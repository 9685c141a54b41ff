//! The HTTP side of both daemons: XML-RPC on `POST /` and `/RPC2`, `GET /health`, `GET /metrics`,
//! and the status page on `GET /`.
//!
//! A daemon provides a [`Handler`]; this module owns everything around it: keep-alive HTTP/1.1
//! connections (a task each, over TLS when the daemon has a certificate), who may call what
//! ([`crate::security`]: HTTP 401 before anything is read, fault 403 for a method the caller's
//! credentials do not open), the body size limit (HTTP 413 before parsing), parsing, the
//! `system.*` methods every XML-RPC server is expected to have, and turning errors into faults
//! in one place.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use dxr::Value;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use hyper::{Method as HttpMethod, Request as HttpRequest, Response, StatusCode};
use hyper_util::rt::TokioIo;

use crate::error::{Error, Result};
use crate::rpc::codec::{self, Call, Param};
use crate::rpc::messages;
use crate::rpc::transport::Listener;
use crate::security::{Access, Credentials, Principal, Refusal, Security, access};

/// A daemon's requests, one typed value per call (mini-redis's `Command`): the one place its
/// method names, their parameters and their help texts are declared. `system.listMethods`
/// and `system.methodHelp` answer from here, so the list cannot drift from what is parsed.
pub trait Request: Sized + Send + 'static {
    /// The daemon's methods, one variant each.
    type Method: Copy + Send + 'static;
    /// Every method, as `system.listMethods` lists them.
    const METHODS: &'static [Self::Method];
    fn name(method: Self::Method) -> &'static str;
    /// A one-line help text: the call's shape and what it answers.
    fn help(method: Self::Method) -> &'static str;
    /// Reads `method`'s parameters; -32602 when they are not what it takes.
    fn parse(method: Self::Method, params: Vec<Param>) -> Result<Self>;
    /// Who may call `method`: clients, or cluster members only.
    fn access(method: Self::Method) -> Access {
        let _ = method;
        Access::Client
    }
}

/// The method called `name`, if the daemon has one.
fn method_named<R: Request>(name: &str) -> Option<R::Method> {
    R::METHODS
        .iter()
        .copied()
        .find(|&method| R::name(method) == name)
}

/// What a daemon serves. Replies are a value's XML text (see [`codec`]).
pub trait Handler: Send + Sync + 'static {
    type Request: Request;
    /// Runs one request. `system.*` methods never reach here.
    fn call(&self, request: Self::Request) -> impl Future<Output = Result<String>> + Send;
    /// The daemon's counters and gauges, as `/metrics` and `stats()` both show them.
    fn figures(&self) -> Vec<crate::telemetry::Figure>;
    /// The daemon's latency histograms, for `/metrics`.
    fn histograms(&self) -> Vec<crate::telemetry::HistogramMetric> {
        Vec::new()
    }
    /// One call of `method` took `elapsed` (faults included), for the daemon's request
    /// latency histogram.
    fn observe(&self, method: &'static str, elapsed: std::time::Duration) {
        let _ = (method, elapsed);
    }
    /// Counts a call answered with a fault (whether its request could not be read or it
    /// failed), for daemons that count them.
    fn count_fault(&self) {}
    /// Whether [`Handler::batch`] is served. Checked before the body is read, so a daemon
    /// without batches never buffers one (they may be far larger than `--max-request-bytes`).
    const SERVES_BATCHES: bool = false;

    /// Whether the status page is served ([`crate::status`]: `GET /` and `GET
    /// /status.json`, behind the same credential check as the calls).
    const SERVES_STATUS: bool = false;

    /// The status page's figures, as JSON (see [`crate::status::json`]).
    fn status_json(&self) -> String {
        String::new()
    }

    /// The daemon's newest layout version, for [`crate::rpc::client::LAYOUT_HEADER`] (0: none,
    /// not sent).
    fn layout_version(&self) -> u64 {
        0
    }

    /// Where this daemon's own measurements put the cluster clock, sent to every caller in
    /// the [`crate::clock::CLOCK_HEADER`] (`None`: not sent). Only storage nodes' anchors
    /// count ([`crate::clock::PeerClocks::anchor_us`]).
    fn clock_anchor_us(&self) -> Option<i64> {
        None
    }

    /// A caller said it knows layout `version`.
    fn heard_layout_version(&self, version: u64) {
        let _ = version;
    }

    /// Why replica operations routed with layout `version` are refused (a sender so far
    /// behind that every version it routes with is over), or `None`.
    fn refuses_layout(&self, version: u64) -> Option<String> {
        let _ = version;
        None
    }

    /// Answers a binary batch posted to [`messages::BATCH_PATH`]; only storage nodes serve it.
    fn batch(&self, body: Bytes) -> impl Future<Output = Result<Vec<u8>>> + Send {
        let _ = body;
        std::future::ready(Err(Error::UnknownMethod("internal batches".into())))
    }
}

/// Largest batch body accepted from a balancer: many operations, each up to a client's
/// largest value, so well above `--max-request-bytes`; only cluster members send these.
const MAX_BATCH_BYTES: usize = 512 * 1024 * 1024;

/// TCP connections this process has accepted: with keep-alive clients and a pooling balancer
/// it stays near the number of concurrent clients, whatever the request count.
pub static CONNECTIONS_ACCEPTED: crate::telemetry::Counter = crate::telemetry::Counter::new();

/// Requests refused for their credentials, by [`Refusal`] kind; and internal methods called
/// with a client's credentials only.
static NO_PASSWORD: crate::telemetry::Counter = crate::telemetry::Counter::new();
static WRONG_PASSWORD: crate::telemetry::Counter = crate::telemetry::Counter::new();
static WRONG_SECRET: crate::telemetry::Counter = crate::telemetry::Counter::new();
static FORBIDDEN: crate::telemetry::Counter = crate::telemetry::Counter::new();
/// TLS handshakes that failed or did not finish in time.
static TLS_HANDSHAKE_FAILURES: crate::telemetry::Counter = crate::telemetry::Counter::new();
/// When a refused request was last logged (µs), so a flood of them logs once per interval.
static LAST_REFUSAL_LOGGED_US: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
const REFUSAL_LOG_INTERVAL_US: u64 = 10_000_000;
/// How long a client has to finish its TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

fn count_refusal(refusal: Option<Refusal>) {
    let counter = match refusal {
        Some(Refusal::NoPassword) => &NO_PASSWORD,
        Some(Refusal::WrongPassword) => &WRONG_PASSWORD,
        Some(Refusal::WrongSecret) => &WRONG_SECRET,
        None => &FORBIDDEN,
    };
    counter.inc();
    let now = crate::clock::now_us();
    let last = LAST_REFUSAL_LOGGED_US.load(std::sync::atomic::Ordering::Relaxed);
    if now.saturating_sub(last) >= REFUSAL_LOG_INTERVAL_US
        && LAST_REFUSAL_LOGGED_US
            .compare_exchange(
                last,
                now,
                std::sync::atomic::Ordering::Relaxed,
                std::sync::atomic::Ordering::Relaxed,
            )
            .is_ok()
    {
        tracing::warn!(
            kind = refusal.map_or("forbidden_method", Refusal::kind),
            "refused a call for its credentials (counted in dynamite_auth_failures_total; \
             logged at most once per 10 s)"
        );
    }
}

/// The caller of one request, checked against every method it calls (each call of a
/// multicall too).
#[derive(Clone, Copy)]
pub struct Caller<'a> {
    pub principal: Principal,
    pub credentials: &'a Credentials,
}

impl Caller<'_> {
    /// A caller as a daemon without credentials sees everyone.
    pub const OPEN: Caller<'static> = Caller {
        principal: Principal::Anonymous,
        credentials: &OPEN_CREDENTIALS,
    };

    fn check(&self, access: Access, what: &str) -> Result<()> {
        if self.credentials.permits(self.principal, access) {
            Ok(())
        } else {
            count_refusal(None);
            Err(Error::Forbidden(format!(
                "{what} is for the cluster's daemons: calls to it need the cluster secret"
            )))
        }
    }
}

static OPEN_CREDENTIALS: Credentials = Credentials {
    client: None,
    secrets: Vec::new(),
};

/// Server settings shared by both daemons.
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    pub max_request_bytes: usize,
}

/// Serves connections from `listener` (TCP, or a simulated network: see
/// [`crate::rpc::transport`]) until `shutdown` resolves, then stops accepting and lets open
/// requests finish.
pub async fn serve<H: Handler>(
    mut listener: impl Listener,
    handler: Arc<H>,
    limits: ServerLimits,
    security: Security,
    shutdown: impl Future<Output = ()>,
) {
    let mut shutdown = std::pin::pin!(shutdown);
    let connections = hyper_util::server::graceful::GracefulShutdown::new();
    // Every connection's task, so that none outlives `serve` (see the end).
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            // A stop is not postponed by connections that keep coming.
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        // Forget the connections that ended, so that the set holds the open ones only.
        while tasks.try_join_next().is_some() {}
        let stream = match accepted {
            Ok(stream) => stream,
            Err(error) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        CONNECTIONS_ACCEPTED.inc();
        let handler = handler.clone();
        let credentials = security.credentials.clone();
        let service = hyper::service::service_fn(move |request| {
            let handler = handler.clone();
            let credentials = credentials.clone();
            async move { Ok::<_, Infallible>(respond(&*handler, limits, &credentials, request).await) }
        });
        let mut http = hyper::server::conn::http1::Builder::new();
        let watcher = connections.watcher();
        let Some(acceptor) = security.acceptor.clone() else {
            let connection = http
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service);
            let connection = watcher.watch(connection);
            tasks.spawn(async move {
                if let Err(error) = connection.await {
                    tracing::debug!(%error, "connection ended with an error");
                }
            });
            continue;
        };
        // The handshake runs in the connection's task, so a slow client holds up no one else.
        tasks.spawn(async move {
            let stream =
                match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(error)) => {
                        TLS_HANDSHAKE_FAILURES.inc();
                        tracing::debug!(%error, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        TLS_HANDSHAKE_FAILURES.inc();
                        tracing::debug!("TLS handshake timed out");
                        return;
                    }
                };
            let connection = http
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(error) = watcher.watch(connection).await {
                tracing::debug!(%error, "connection ended with an error");
            }
        });
    }
    // Connections that come now are refused at once, rather than left in the backlog until
    // the process exits and then reset.
    drop(listener);
    let drain = crate::shutdown::DRAIN_TIMEOUT;
    if tokio::time::timeout(drain, connections.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            drain_s = drain.as_secs(),
            "requests still in flight after the drain: cut"
        );
    }
    // What is still running is cut here, before the daemon syncs its storage: no request is
    // answered after that sync.
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
}

/// Answers one request, with two readings of this daemon's clock in a header so that the
/// caller can tell how far its clock is from ours (see [`crate::clock`]).
async fn respond<H: Handler>(
    handler: &H,
    limits: ServerLimits,
    credentials: &Credentials,
    request: HttpRequest<Incoming>,
) -> Response<Full<Bytes>> {
    let received_us = crate::clock::now_us();
    let mut response = if request.uri().path() == "/health" {
        route(handler, limits, Caller::OPEN, request).await
    } else {
        match guarded(handler, limits, credentials, request).await {
            Ok(response) => response,
            // Refused for its credentials: nothing more is said (no clock, no layout).
            Err(refused) => return refused,
        }
    };
    if let Ok(value) = HeaderValue::from_str(&crate::clock::header_value(
        received_us,
        handler.clock_anchor_us(),
    )) {
        response
            .headers_mut()
            .insert(crate::clock::CLOCK_HEADER, value);
    }
    let version = handler.layout_version();
    if version > 0 {
        response.headers_mut().insert(
            crate::rpc::client::LAYOUT_HEADER,
            HeaderValue::from(version),
        );
    }
    response
}

/// Answers a request other than `/health`, once its credentials are checked: `Err` with the
/// refusal when they are not good enough.
async fn guarded<H: Handler>(
    handler: &H,
    limits: ServerLimits,
    credentials: &Credentials,
    request: HttpRequest<Incoming>,
) -> Result<Response<Full<Bytes>>, Response<Full<Bytes>>> {
    let headers = request.headers();
    let identified = credentials.identify(
        headers
            .get(hyper::header::AUTHORIZATION)
            .map(HeaderValue::as_bytes),
        headers
            .get(access::SECRET_HEADER)
            .map(HeaderValue::as_bytes),
    );
    let principal = match identified {
        Ok(Principal::Anonymous) if credentials.needs_password() => {
            return Err(refuse(Refusal::NoPassword));
        }
        Ok(principal) => principal,
        Err(refusal) => return Err(refuse(refusal)),
    };
    let caller = Caller {
        principal,
        credentials,
    };
    let mut refused = None;
    // Only daemons speak of layouts: a client's header is not listened to.
    if let Some(version) = crate::rpc::client::layout_version_in(request.headers())
        && credentials.permits(principal, Access::Internal)
    {
        handler.heard_layout_version(version);
        if request.uri().path() == messages::BATCH_PATH {
            refused = handler.refuses_layout(version);
        }
    }
    Ok(match refused {
        // Refused before it is read: the sender hears of the newer layout in this answer's
        // header, and routes again.
        Some(reason) => plain(StatusCode::CONFLICT, reason),
        None => route(handler, limits, caller, request).await,
    })
}

/// The answer to a request refused for its credentials.
fn refuse(refusal: Refusal) -> Response<Full<Bytes>> {
    count_refusal(Some(refusal));
    let status = StatusCode::from_u16(refusal.status()).unwrap_or(StatusCode::FORBIDDEN);
    let mut response = plain(status, refusal.reason().to_owned());
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            hyper::header::WWW_AUTHENTICATE,
            HeaderValue::from_static(access::REALM_CHALLENGE),
        );
    }
    response
}

async fn route<H: Handler>(
    handler: &H,
    limits: ServerLimits,
    caller: Caller<'_>,
    request: HttpRequest<Incoming>,
) -> Response<Full<Bytes>> {
    let path = request.uri().path();
    match (request.method(), path) {
        (&HttpMethod::GET, "/health") => plain(StatusCode::OK, "ok\n".into()),
        (&HttpMethod::GET, "/metrics") => {
            let mut figures = handler.figures();
            figures.push(crate::telemetry::Figure::counter(
                "connections_accepted",
                "dynamite_connections_accepted_total",
                "TCP connections accepted.",
                &CONNECTIONS_ACCEPTED,
            ));
            figures.extend(auth_figures());
            let exposition = crate::telemetry::render(&figures, &handler.histograms());
            let mut response = plain(StatusCode::OK, exposition);
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(crate::telemetry::OPENMETRICS_CONTENT_TYPE),
            );
            response
        }
        (&HttpMethod::POST, messages::BATCH_PATH) if H::SERVES_BATCHES => {
            if let Err(error) = caller.check(Access::Internal, "internal batches") {
                return plain(StatusCode::FORBIDDEN, format!("{}\n", error.fault_string()));
            }
            let body = match read_body(request, MAX_BATCH_BYTES).await {
                Ok(body) => body,
                Err(status) => return plain(status, format!("{status}\n")),
            };
            let started = std::time::Instant::now();
            let answer = handler.batch(body).await;
            handler.observe("internal.batch", started.elapsed());
            match answer {
                Ok(reply) => {
                    let mut response = Response::new(Full::new(Bytes::from(reply)));
                    response.headers_mut().insert(
                        CONTENT_TYPE,
                        HeaderValue::from_static("application/octet-stream"),
                    );
                    response
                }
                Err(error) => plain(
                    StatusCode::BAD_REQUEST,
                    format!("{}\n", error.fault_string()),
                ),
            }
        }
        (&HttpMethod::GET, "/") if H::SERVES_STATUS => crate::status::page_response(),
        (&HttpMethod::GET, crate::status::JSON_PATH) if H::SERVES_STATUS => {
            crate::status::json_response(handler.status_json())
        }
        (&HttpMethod::POST, "/" | "/RPC2") => {
            let body = match read_body(request, limits.max_request_bytes).await {
                Ok(body) => body,
                Err(status) => return plain(status, format!("{status}\n")),
            };
            xml(handle_body(handler, caller, &body).await)
        }
        (_, "/" | "/RPC2" | "/health" | "/metrics") => plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed\n".into(),
        ),
        _ => plain(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

/// Reads the whole body, refusing with 413 anything over `max_bytes` — by its declared length
/// before reading a byte, or while reading when the length is not declared.
async fn read_body(request: HttpRequest<Incoming>, max_bytes: usize) -> Result<Bytes, StatusCode> {
    if let Some(length) = request.headers().get(CONTENT_LENGTH) {
        let declared = length
            .to_str()
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or(StatusCode::BAD_REQUEST)?;
        if declared > max_bytes as u64 {
            return Err(StatusCode::PAYLOAD_TOO_LARGE);
        }
    }
    match Limited::new(request.into_body(), max_bytes).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.is::<http_body_util::LengthLimitError>() => {
            Err(StatusCode::PAYLOAD_TOO_LARGE)
        }
        Err(_) => Err(StatusCode::BAD_REQUEST),
    }
}

/// Parses and runs one XML-RPC request body; always yields an XML-RPC response body.
pub async fn handle_body<H: Handler>(handler: &H, caller: Caller<'_>, body: &[u8]) -> String {
    let result = match codec::parse_call(body) {
        Ok(call) => dispatch(handler, caller, call).await,
        Err(error) => Err(error),
    };
    match result {
        Ok(value_xml) => codec::response_xml(&value_xml),
        Err(error) => {
            handler.count_fault();
            tracing::debug!(%error, "request failed");
            codec::fault_xml(&error)
        }
    }
}

async fn dispatch<H: Handler>(handler: &H, caller: Caller<'_>, call: Call) -> Result<String> {
    match call.method.as_str() {
        "system.listMethods" => {
            expect_params(&call.params, 0)?;
            let mut names: Vec<&str> = H::Request::METHODS
                .iter()
                .map(|&method| H::Request::name(method))
                .collect();
            names.extend([
                "system.listMethods",
                "system.methodHelp",
                "system.multicall",
            ]);
            let items: Vec<String> = names.iter().map(|name| codec::string_xml(name)).collect();
            Ok(codec::array_xml(items.iter().map(String::as_str)))
        }
        "system.methodHelp" => {
            expect_params(&call.params, 1)?;
            let Some(Value::String(name)) = call.params[0].tree() else {
                return Err(Error::invalid(
                    "system.methodHelp takes a method name string",
                ));
            };
            let help = system_help(name)
                .or_else(|| method_named::<H::Request>(name).map(H::Request::help))
                .ok_or_else(|| Error::UnknownMethod(name.clone()))?;
            Ok(codec::string_xml(help))
        }
        "system.multicall" => multicall(handler, caller, call.params).await,
        name => {
            let method = method_named::<H::Request>(name)
                .ok_or_else(|| Error::UnknownMethod(name.to_owned()))?;
            caller.check(H::Request::access(method), name)?;
            let started = std::time::Instant::now();
            let answer = match H::Request::parse(method, call.params) {
                Ok(request) => handler.call(request).await,
                Err(error) => Err(error),
            };
            handler.observe(H::Request::name(method), started.elapsed());
            answer
        }
    }
}

fn system_help(name: &str) -> Option<&'static str> {
    match name {
        "system.listMethods" => Some("system.listMethods() -> array of the method names served"),
        "system.methodHelp" => Some("system.methodHelp(name) -> a method's help text"),
        "system.multicall" => Some(
            "system.multicall([{methodName, params}, ...]) -> one [result] or fault struct per call",
        ),
        _ => None,
    }
}

/// Runs the calls one after another; each yields `[result]` or a fault struct, as the
/// multicall convention says. Nested multicalls are refused to keep the work bounded.
async fn multicall<H: Handler>(
    handler: &H,
    caller: Caller<'_>,
    params: Vec<Param>,
) -> Result<String> {
    let calls = codec::multicall_calls(params)?;
    let mut results = Vec::with_capacity(calls.len());
    for call in calls {
        let result = match call {
            Some(call) if call.method == "system.multicall" => {
                Err(Error::invalid("system.multicall may not be nested"))
            }
            Some(call) => Box::pin(dispatch(handler, caller, call)).await,
            None => Err(Error::invalid("each call is a struct {methodName, params}")),
        };
        results.push(match result {
            Ok(value_xml) => codec::array_xml([value_xml.as_str()]),
            Err(error) => {
                handler.count_fault();
                codec::fault_struct_xml(error.fault_code(), &error.fault_string())
            }
        });
    }
    Ok(codec::array_xml(results.iter().map(String::as_str)))
}

/// Checks the parameter count, the most common mistake a caller makes.
pub fn expect_params(params: &[Param], expected: usize) -> Result<()> {
    if params.len() == expected {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "expected {expected} parameters, got {}",
            params.len()
        )))
    }
}

fn xml(body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/xml"));
    response
}

fn plain(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

/// The refusals counted since start, for `/metrics`.
fn auth_figures() -> [crate::telemetry::Figure; 5] {
    use crate::telemetry::Figure;
    const HELP: &str = "Calls refused for their credentials, by why.";
    const METRIC: &str = "dynamite_auth_failures_total";
    [
        Figure::counter("auth_no_password", METRIC, HELP, &NO_PASSWORD)
            .labelled("kind", Refusal::NoPassword.kind()),
        Figure::counter("auth_wrong_password", METRIC, HELP, &WRONG_PASSWORD)
            .labelled("kind", Refusal::WrongPassword.kind()),
        Figure::counter("auth_wrong_secret", METRIC, HELP, &WRONG_SECRET)
            .labelled("kind", Refusal::WrongSecret.kind()),
        Figure::counter("auth_forbidden_method", METRIC, HELP, &FORBIDDEN)
            .labelled("kind", "forbidden_method"),
        Figure::counter(
            "tls_handshake_failures",
            "dynamite_tls_handshake_failures_total",
            "TLS handshakes that failed or timed out.",
            &TLS_HANDSHAKE_FAILURES,
        ),
    ]
}
