//! The admin listener: `/healthz` (the process is up), `/readyz` (listeners
//! bound and the upstream accepting connections; 503 otherwise) and
//! `/metrics` (Prometheus text format). Keep it on a private address.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::runtime::Shared;
use crate::server::plain_listener;

pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let max_connections = shared.runtime.load().config.server.max_connections;
    let permits = plain_listener::permits(plain_listener::ADMIN_MAX_CONNECTIONS, max_connections);
    while let Some((tcp, _, permit)) =
        plain_listener::accept(&listener, &permits, &shared.shutdown, "admin").await
    {
        let shared = shared.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = service_fn(move |request| {
                let shared = shared.clone();
                async move { Ok::<_, std::convert::Infallible>(answer(&request, &shared).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

async fn answer(request: &Request<Incoming>, shared: &Shared) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: String, content_type: &'static str| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        response
    };
    match request.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n".into(), "text/plain"),
        "/readyz" => {
            let listening = shared.listeners_ready.load(Ordering::Acquire);
            let upstream = shared.runtime.load().config.upstream.authority.clone();
            let reachable = upstream_reachable(&upstream).await;
            let status = if listening && reachable {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            let body = format!("{{\"listeners\":{listening},\"upstream\":{reachable}}}\n");
            text(status, body, "application/json")
        }
        "/metrics" => text(
            StatusCode::OK,
            shared.metrics.encode(),
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
        _ => text(StatusCode::NOT_FOUND, "not found\n".into(), "text/plain"),
    }
}

async fn upstream_reachable(authority: &http::uri::Authority) -> bool {
    let port = authority.port_u16().unwrap_or(80);
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let connect = tokio::net::TcpStream::connect((host, port));
    matches!(
        tokio::time::timeout(Duration::from_secs(2), connect).await,
        Ok(Ok(_))
    )
}
