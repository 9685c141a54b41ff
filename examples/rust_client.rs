//! A Rust client of Dynamite: dxr builds the XML-RPC calls and reads the answers, hyper
//! carries them over HTTP.
//!
//!     examples/local_cluster.sh                 # in another terminal
//!     cargo run --example rust_client [-- URL]  # URL: a balancer or node, http://127.0.0.1:30000
//!
//! It puts a key, reads it back, reads its versions and context, and writes again with that
//! context, as an application would, printing each answer. It panics (exit status 101) if
//! the store answers other than the contract says.

use std::borrow::Cow;
use std::collections::BTreeMap;

use bytes::Bytes;
use dxr::{FaultResponse, MethodCall, MethodResponse, TryFromValue, TryToParams, Value};
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, Uri, header};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// A client of one balancer or storage node, over a pool of keep-alive connections.
struct Dynamite {
    http: Client<HttpConnector, Full<Bytes>>,
    url: Uri,
}

impl Dynamite {
    fn new(url: Uri) -> Self {
        let http = Client::builder(TokioExecutor::new()).build_http();
        Dynamite { http, url }
    }

    /// Calls `method` with `params` (a tuple of Rust values) and converts the answer to `R`.
    /// A fault comes back as the error, a [`dxr::Fault`] with its code and string.
    async fn call<R: TryFromValue>(
        &self,
        method: &str,
        params: impl TryToParams,
    ) -> Result<R, Error> {
        let call = MethodCall {
            name: Cow::Borrowed(method),
            params: params.try_to_params()?,
        };
        let request = Request::builder()
            .method(Method::POST)
            .uri(&self.url)
            .header(header::CONTENT_TYPE, "text/xml")
            .body(Full::new(Bytes::from(call.to_xml()?)))?;
        let response = self.http.request(request).await?;
        if !response.status().is_success() {
            return Err(format!("{method}: HTTP {}", response.status()).into());
        }
        let body = response.into_body().collect().await?.to_bytes();
        let xml = std::str::from_utf8(&body)?;
        match MethodResponse::from_xml(xml) {
            Ok(answer) => Ok(R::try_from_value(&answer.value)?),
            Err(_) => Err(FaultResponse::from_xml(xml)?.fault.into()),
        }
    }
}

/// What `get_versions` answers: every sibling (latest first) and the context that covers
/// them, to hand back with the next `put`.
#[derive(Debug)]
struct Versions<T> {
    values: Vec<T>,
    context: String,
}

impl<T: TryFromValue> TryFromValue for Versions<T> {
    fn try_from_value(value: &Value) -> Result<Self, dxr::Error> {
        let members = BTreeMap::<String, Value>::try_from_value(value)?;
        let member = |name| {
            members
                .get(name)
                .ok_or(dxr::Error::missing_field("versions", name))
        };
        Ok(Versions {
            values: Vec::try_from_value(member("values")?)?,
            context: String::try_from_value(member("context")?)?,
        })
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    let url = std::env::args().nth(1);
    let url: Uri = url.as_deref().unwrap_or("http://127.0.0.1:30000").parse()?;
    let dynamite = Dynamite::new(url);
    let key = "rust-client:greeting";

    // put(key, value): "200" once W replicas have stored it.
    let status: String = dynamite.call("put", (key, "hello")).await?;
    println!("put({key:?}, \"hello\") -> {status:?}");
    assert_eq!(status, "200");

    // get(key): the value; nil, which dxr reads as None, where the key has none.
    let value: Option<String> = dynamite.call("get", (key,)).await?;
    println!("get({key:?}) -> {value:?}");
    assert_eq!(value.as_deref(), Some("hello"));
    let missing: Option<String> = dynamite.call("get", ("rust-client:nobody",)).await?;
    println!("get(\"rust-client:nobody\") -> {missing:?}");
    assert_eq!(missing, None);

    // get_versions(key): every sibling, and the context that covers them.
    let versions: Versions<String> = dynamite.call("get_versions", (key,)).await?;
    println!("get_versions({key:?}) -> {versions:?}");

    // put(key, value, context): supersedes every version the context covers.
    let update = (key, "hello, world", versions.context.as_str());
    let status: String = dynamite.call("put", update).await?;
    println!("put({key:?}, \"hello, world\", context) -> {status:?}");
    let versions: Versions<String> = dynamite.call("get_versions", (key,)).await?;
    println!("get_versions({key:?}) -> {versions:?}");
    assert_eq!(versions.values, ["hello, world"]);

    // A bad call answers a fault: here, a put without a value.
    let fault = dynamite.call::<String>("put", (key,)).await.unwrap_err();
    let fault = fault.downcast::<dxr::Fault>()?;
    println!("put({key:?}) -> fault {}: {}", fault.code(), fault.string());
    assert_eq!(fault.code(), -32602);
    Ok(())
}
