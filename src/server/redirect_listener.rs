//! The plain-HTTP listener (`http_listen`): every request gets a 308 to the
//! same URL on HTTPS, built by [`crate::redirect`], except, with `[acme]`,
//! the CA's http-01 validations under `/.well-known/acme-challenge/`. It
//! runs on the control thread's runtime, beside the admin listener, and
//! drains with the rest on shutdown.

use std::sync::Arc;

use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use super::plain_listener;

use crate::runtime::Shared;

/// The HTTP listener: every request gets a 308 to the same URL on HTTPS.
pub(super) async fn redirect_loop(listener: TcpListener, shared: Arc<Shared>, https_port: u16) {
    let max_connections = shared.runtime.load().config.server.max_connections;
    let permits =
        plain_listener::permits(plain_listener::REDIRECT_MAX_CONNECTIONS, max_connections);
    while let Some((tcp, peer, permit)) =
        plain_listener::accept(&listener, &permits, &shared.shutdown, "http").await
    {
        let shared = shared.clone();
        shared.clone().connections.spawn(async move {
            let _permit = permit;
            let runtime = shared.runtime.load_full();
            let port = Some(
                runtime
                    .config
                    .server
                    .redirect_https_port
                    .unwrap_or(https_port),
            )
            .filter(|p| *p != 443);
            let timeout = runtime.config.server.header_read_timeout;
            let acme = runtime.acme.as_ref().map(|acme| acme.certs.clone());
            drop(runtime);
            let service = service_fn(move |request| {
                let acme = acme.clone();
                async move {
                    let answer = match (&acme, crate::acme::http01::challenge_token(&request)) {
                        (Some(certs), Some(token)) => {
                            crate::acme::http01::answer(certs, request.method(), token).await
                        }
                        _ => crate::redirect::respond(&request, port),
                    };
                    Ok::<_, std::convert::Infallible>(answer)
                }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(timeout)
                .keep_alive(true);
            let connection = builder.serve_connection(TokioIo::new(tcp), service);
            tokio::pin!(connection);
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(error) = result {
                        tracing::debug!(%error, %peer, "redirect connection ended with an error");
                    }
                }
                _ = shared.shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        });
    }
}
