//! The control thread's jobs: signals (SIGTERM and SIGINT stop the proxy,
//! SIGHUP reloads it), the reload itself, the drain on shutdown, and the
//! periodic maintenance that keeps per-route and per-worker state bounded.

use std::sync::Arc;
use std::time::Duration;

use crate::runtime::{Runtime, Shared};

/// SIGTERM, SIGINT and SIGHUP, caught from the moment this is built.
pub(super) struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installs the handlers; call inside the control runtime's context,
    /// before anything says the proxy is listening: a SIGTERM sent as soon
    /// as a supervisor (or a test) sees that must stop it gracefully, not
    /// kill it by the signal's default action.
    pub(super) fn install() -> Option<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        ) {
            (Ok(term), Ok(int), Ok(hup)) => Some(Signals { term, int, hup }),
            _ => None,
        }
    }
}

pub(super) async fn wait_for_signals(
    shared: &Arc<Shared>,
    config_path: &std::path::Path,
    signals: Option<Signals>,
) {
    let Some(Signals {
        mut term,
        mut int,
        mut hup,
    }) = signals
    else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        shared.shutdown.cancelled().await;
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = shared.shutdown.cancelled() => break,
            _ = hup.recv() => reload(shared, config_path),
        }
    }
    tracing::info!("shutting down: no new connections; finishing requests in flight");
}

/// SIGHUP: a new configuration replaces the running one only if it validates.
pub fn reload(shared: &Arc<Shared>, config_path: &std::path::Path) {
    crate::access_log::flush_all();
    let current = shared.runtime.load_full();
    let config = match crate::config::load(config_path) {
        Ok(config) => config,
        Err(error) => {
            tracing::error!(error = %error, "reload rejected; the running configuration stays in force");
            return;
        }
    };
    let old = &current.config.server;
    let new = &config.server;
    if old.https_listen != new.https_listen
        || old.http_listen != new.http_listen
        || old.admin_listen != new.admin_listen
        || old.max_connections != new.max_connections
        || old.workers != new.workers
    {
        tracing::warn!(
            "listen addresses, max_connections and workers change only on restart; \
             the rest of the new configuration is in force (max_header_bytes and the \
             timeouts for connections accepted from now on)"
        );
    }
    match Runtime::build(config, shared.workers, Some(&current), &shared.metrics) {
        Ok(runtime) => {
            shared.runtime.store(Arc::new(runtime));
            tracing::info!("configuration reloaded");
        }
        Err(error) => {
            tracing::error!(error = %error, "reload rejected; the running configuration stays in force")
        }
    }
}

pub(super) async fn drain(shared: &Arc<Shared>) {
    shared.shutdown.cancel();
    shared.connections.close();
    let timeout = shared.runtime.load().config.server.shutdown_timeout;
    if tokio::time::timeout(timeout, shared.connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            ?timeout,
            "shutdown_timeout reached with requests still in flight; closing them"
        );
    }
}

/// Periodic upkeep: rate-limiter sweeps, idle upstream connections closed.
pub(super) async fn maintenance(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shared.shutdown.cancelled() => return,
        }
        let runtime = shared.runtime.load_full();
        for route in runtime.routes.iter() {
            if let Some(limiter) = &route.limiter {
                limiter.sweep();
            }
        }
        runtime.upstreams.sweep();
    }
}
