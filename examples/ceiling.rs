//! The ceiling server: the fastest one XML-RPC hop can be on this machine.
//!
//! It is the daemons' HTTP stack with no work behind it: the same tokio runtime (one worker
//! thread per core), a task per keep-alive HTTP/1.1 connection with `TCP_NODELAY`, each POST
//! body read completely, and a fixed response (`"200"`, as a put answers). What `loadgen`
//! measures against it bounds what it can measure against a storage node or a balancer, so
//! the project's figures are given as fractions of it.
//!
//!     cargo run --release --example ceiling -- --port 29999

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

const RESPONSE: &str = "<?xml version=\"1.0\"?><methodResponse><params><param><value><string>200</string></value></param></params></methodResponse>";

#[derive(Debug, Parser)]
#[command(about = "An XML-RPC server that answers every call with \"200\" and does nothing")]
struct Args {
    /// Port to listen on.
    #[arg(short, long, default_value_t = 29999)]
    port: u16,
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0")]
    bind: IpAddr,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("ceiling: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let listen = SocketAddr::new(args.bind, args.port);
        let listener = match TcpListener::bind(listen).await {
            Ok(listener) => listener,
            Err(error) => {
                eprintln!("ceiling: cannot listen on {listen}: {error}");
                return ExitCode::FAILURE;
            }
        };
        eprintln!("ceiling: serving on {listen}");
        serve(listener).await
    })
}

async fn serve(listener: TcpListener) -> ExitCode {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                eprintln!("ceiling: accept failed: {error}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), hyper::service::service_fn(respond));
            let _ = connection.await;
        });
    }
}

async fn respond(request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let status = match request.into_body().collect().await {
        Ok(_) => StatusCode::OK,
        Err(_) => StatusCode::BAD_REQUEST,
    };
    let mut response = Response::new(Full::new(Bytes::from_static(RESPONSE.as_bytes())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/xml"));
    Ok(response)
}
