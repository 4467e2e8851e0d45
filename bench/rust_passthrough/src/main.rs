//! The Rust counterpart of bench/passthrough.py: every request is posted to
//! the one upstream and its answer sent back, nothing else. One thread, as
//! the queen's event loop is one thread, so the CPU per request compares
//! like for like.
//!
//!     rust-passthrough --port 0 --upstream http://127.0.0.1:PORT/v1
//!
//! Prints `READY <base URL>` once it listens.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

type Upstream = Client<HttpConnector, Full<Bytes>>;

const JSON: HeaderValue = HeaderValue::from_static("application/json");

fn answer(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, JSON);
    response
}

async fn forward(
    request: Request<Incoming>,
    upstream: Upstream,
    base: Arc<str>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    // The upstream's base URL ends in /v1, as the client's paths begin with it.
    let path = request.uri().path();
    let uri = format!("{base}{}", path.strip_prefix("/v1").unwrap_or(path));
    let body = request.into_body().collect().await?.to_bytes();
    let Ok(uri) = uri.parse::<hyper::Uri>() else {
        return Ok(answer(StatusCode::BAD_REQUEST, Bytes::from_static(b"bad path")));
    };
    let mut outgoing = Request::post(uri).body(Full::new(body)).expect("a POST with a URI");
    outgoing.headers_mut().insert(CONTENT_TYPE, JSON);
    match upstream.request(outgoing).await {
        Ok(response) => {
            let status = response.status();
            Ok(answer(status, response.into_body().collect().await?.to_bytes()))
        }
        Err(error) => Ok(answer(StatusCode::BAD_GATEWAY, Bytes::from(error.to_string()))),
    }
}

fn arguments() -> Result<(u16, String), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mut port, mut base) = (0u16, None);
    for pair in args.chunks(2) {
        match (pair[0].as_str(), pair.get(1)) {
            ("--port", Some(v)) => {
                port = v.parse().map_err(|_| format!("--port {v}: not a port"))?
            }
            ("--upstream", Some(v)) => base = Some(v.trim_end_matches('/').to_string()),
            (flag, _) => return Err(format!("unknown or incomplete argument {flag}")),
        }
    }
    Ok((port, base.ok_or("--upstream URL is required")?))
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let (port, base) = arguments().unwrap_or_else(|message| {
        eprintln!("rust-passthrough: {message}");
        std::process::exit(2)
    });
    let listener = TcpListener::bind(("127.0.0.1", port)).await.expect("listening socket");
    println!("READY http://127.0.0.1:{}/v1", listener.local_addr().unwrap().port());
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let upstream: Upstream = Client::builder(TokioExecutor::new()).build(connector);
    let base: Arc<str> = base.into();
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let _ = stream.set_nodelay(true);
        let (upstream, base) = (upstream.clone(), base.clone());
        tokio::task::spawn(async move {
            let service = service_fn(move |r| forward(r, upstream.clone(), base.clone()));
            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}
