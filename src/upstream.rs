//! The upstream leg: pooled HTTP/1.1 keep-alive connections to the plain-HTTP
//! application, with the connect and response-head timeouts of `[upstream]`.
//!
//! One client (and so one pool) per worker thread: each worker runs its own
//! single-threaded runtime, and a pool shared across them would hand
//! connections between threads on every request.

use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::Upstream;
use crate::policy::limits::{LimitedBody, is_body_too_large};
use crate::reject::{Rejection, UpstreamErrorKind};

pub type UpstreamBody = LimitedBody<Incoming>;

#[derive(Clone)]
pub struct UpstreamClient {
    client: Client<HttpConnector, UpstreamBody>,
    timeout: Duration,
}

impl UpstreamClient {
    pub fn new(config: &Upstream) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(config.connect_timeout));
        connector.set_nodelay(true);
        connector.enforce_http(true);
        connector.set_keepalive(Some(Duration::from_secs(60)));
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(config.pool_idle_timeout)
            .pool_max_idle_per_host(1024)
            .http1_preserve_header_case(false)
            .build(connector);
        UpstreamClient {
            client,
            timeout: config.timeout,
        }
    }

    /// Sends the request; the answer is the upstream's response head (the body
    /// streams on), or why the upstream failed as a [`Rejection`].
    pub async fn send(
        &self,
        request: Request<UpstreamBody>,
    ) -> Result<Response<Incoming>, Rejection> {
        match tokio::time::timeout(self.timeout, self.client.request(request)).await {
            Err(_elapsed) => Err(Rejection::Upstream(UpstreamErrorKind::Timeout)),
            Ok(Ok(response)) => Ok(response),
            Ok(Err(error)) => {
                if is_body_too_large(&error) {
                    return Err(Rejection::BodyTooLarge);
                }
                let kind = if error.is_connect() {
                    UpstreamErrorKind::Connect
                } else {
                    UpstreamErrorKind::Reset
                };
                tracing::warn!(error = %error_chain(&error), kind = kind.as_str(), "upstream request failed");
                Err(Rejection::Upstream(kind))
            }
        }
    }
}

fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut current = error.source();
    while let Some(e) = current {
        text.push_str(": ");
        text.push_str(&e.to_string());
        current = e.source();
    }
    text
}
