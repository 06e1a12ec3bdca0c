//! The admin listener: `/healthz` (the process is up), `/readyz` (listeners
//! bound and every upstream group with a server taking requests — health
//! checks passing, or without checks one accepting a connection; 503
//! otherwise, naming the groups) and
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

use crate::config::ServerAddress;
use crate::runtime::Shared;
use crate::server::plain_listener;
use crate::upstream::UpstreamStream;

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
            let runtime = shared.runtime.load_full();
            let mut unavailable = Vec::new();
            for (group, health) in runtime.upstreams.groups() {
                // With health checks their verdict; without, a connection
                // to any of the group's servers.
                let ready = if group.health_check.is_some() {
                    health.any_available()
                } else {
                    any_reachable(&group.servers).await
                };
                if !ready {
                    unavailable.push(serde_json::Value::from(&*group.name));
                }
            }
            let status = if listening && unavailable.is_empty() {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            let body = serde_json::json!({
                "listeners": listening,
                "upstream": unavailable.is_empty(),
                "unavailable_upstreams": unavailable,
            });
            text(status, format!("{body}\n"), "application/json")
        }
        "/metrics" => text(
            StatusCode::OK,
            {
                let runtime = shared.runtime.load();
                runtime.upstreams.refresh_gauges(&shared.metrics);
                runtime.refresh_cert_gauges(&shared.metrics);
                shared.metrics.encode()
            },
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
        _ => text(StatusCode::NOT_FOUND, "not found\n".into(), "text/plain"),
    }
}

/// Some server of the list accepts a connection within 2 s.
async fn any_reachable(servers: &[ServerAddress]) -> bool {
    let mut attempts = tokio::task::JoinSet::new();
    for server in servers {
        let server = server.clone();
        attempts.spawn(async move {
            matches!(
                tokio::time::timeout(Duration::from_secs(2), UpstreamStream::connect(&server))
                    .await,
                Ok(Ok(_))
            )
        });
    }
    while let Some(reached) = attempts.join_next().await {
        if matches!(reached, Ok(true)) {
            return true;
        }
    }
    false
}
