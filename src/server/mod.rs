//! Listeners, workers, connections and shutdown.
//!
//! The HTTPS port is served by N worker threads (one per core by default),
//! each with its own single-threaded tokio runtime and its own
//! `SO_REUSEPORT` listener on the same address, so the kernel spreads
//! connections across cores and a request never changes threads. The main
//! thread runs a small control runtime: signals, the HTTP→HTTPS redirect
//! listener, the admin listener and periodic maintenance.
//!
//! Shutdown follows tokio's mini-redis: stop accepting, tell every
//! connection to finish (hyper's graceful shutdown), wait for them up to
//! `shutdown_timeout`.
//!
//! This file binds the listeners and starts the threads ([`run`]); then:
//!
//! * `worker.rs`: a worker's accept loop and the life of one HTTPS
//!   connection (TLS handshake, hyper, the header-read and idle deadlines);
//! * `control.rs`: signals, reload, drain and maintenance on the control thread;
//! * `redirect_listener.rs`: the plain-HTTP listener that redirects to HTTPS.

mod control;
pub mod plain_listener;
mod redirect_listener;
mod worker;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use anyhow::Context as _;
use socket2::{Domain, Socket, Type};
use tokio::net::TcpListener;

use crate::config::Config;
use crate::runtime::{Runtime, Shared};

pub use control::reload;

/// Binds a listening socket. `reuse_port` lets every worker bind the same address.
pub fn bind(addr: SocketAddr, reuse_port: bool) -> std::io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_tcp_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// How long the kernel holds a connection whose client has sent nothing
/// before handing it to us anyway (rounded to its SYN-ACK retransmissions).
const DEFER_ACCEPT_SECONDS: libc::c_int = 1;

/// TCP_DEFER_ACCEPT, on the HTTPS listeners: a connection is accepted
/// once its first bytes have arrived, not at the end of the TCP handshake.
/// A TLS client speaks first, so the worker is woken once per new
/// connection with the ClientHello already readable, instead of once to
/// accept and again when the hello arrives; a client that connects and
/// sends nothing costs the proxy nothing until the deadline (nginx's
/// `deferred`, HAProxy's `defer-accept`). The redirect and admin listeners,
/// off the hot path, go without: a silent connection takes one of their
/// slots at once, which is what their own caps are about.
fn defer_accept(socket: &impl std::os::fd::AsRawFd, seconds: libc::c_int) -> std::io::Result<()> {
    // SAFETY: a valid socket descriptor, and a c_int option of its size.
    let result = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&raw const seconds).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if result == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// One listener per worker on the same address.
///
/// `SO_REUSEPORT` would as readily share the port with another process
/// already listening there with it (an old instance left running), and the
/// kernel would silently split the connections between the two. A socket
/// without it cannot bind a port that anyone listens on, so one is bound
/// first, alone, to find out (and to resolve port 0), then let go.
fn bind_workers(addr: SocketAddr, workers: usize) -> anyhow::Result<Vec<std::net::TcpListener>> {
    let alone = bind(addr, false).with_context(|| format!("cannot listen on {addr}"))?;
    let actual = alone.local_addr()?;
    drop(alone);
    let mut listeners = Vec::with_capacity(workers);
    for _ in 0..workers {
        let listener = bind(actual, true).with_context(|| format!("cannot listen on {actual}"))?;
        defer_accept(&listener, DEFER_ACCEPT_SECONDS)
            .with_context(|| format!("cannot set TCP_DEFER_ACCEPT on {actual}"))?;
        listeners.push(listener);
    }
    Ok(listeners)
}

/// Runs the proxy until SIGTERM/SIGINT. Reloads on SIGHUP.
pub fn run(config: Config) -> anyhow::Result<()> {
    let workers = config.server.workers;
    let https = bind_workers(config.server.https_listen, workers)?;
    let https_addr = https[0].local_addr()?;
    let http = match config.server.http_listen {
        Some(addr) => Some(bind(addr, false).with_context(|| format!("cannot listen on {addr}"))?),
        None => None,
    };
    let admin = match config.server.admin_listen {
        Some(addr) => Some(bind(addr, false).with_context(|| format!("cannot listen on {addr}"))?),
        None => None,
    };
    let config_path = config.path.clone();
    let metrics = crate::telemetry::Metrics::new();
    let runtime = Runtime::build(config, workers, None, &metrics)?;
    let shared = Shared::new(runtime, workers, metrics);
    let control = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let signals = {
        let _context = control.enter();
        control::Signals::install()
    };

    if let Some(http) = &http {
        eprintln!(
            "portcullis: http (redirect) listening on {}",
            http.local_addr()?
        );
    }
    if let Some(admin) = &admin {
        eprintln!("portcullis: admin listening on {}", admin.local_addr()?);
    }
    // Last, so that a supervisor (or a test) that waits for this line finds the others printed.
    eprintln!("portcullis: https listening on {https_addr}");

    let mut threads = Vec::new();
    for (worker, listener) in https.into_iter().enumerate() {
        let shared = shared.clone();
        threads.push(
            std::thread::Builder::new()
                .name(format!("portcullis-w{worker}"))
                .spawn(move || {
                    crate::access_log::batch_on_this_thread();
                    let rt = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(error) => {
                            tracing::error!(%error, "cannot start a worker runtime");
                            shared.shutdown.cancel();
                            return;
                        }
                    };
                    rt.block_on(async move {
                        tokio::spawn(crate::access_log::flush_periodically());
                        worker::worker_loop(worker, listener, shared.clone()).await;
                        // The listener is closed now, but this runtime still
                        // drives the connections it accepted (and their
                        // upstream legs): dropping it would cut requests in
                        // flight. Keep it running until they are done; the
                        // control thread bounds the whole drain by
                        // `shutdown_timeout` and then exits the process.
                        shared.connections.wait().await;
                    });
                })?,
        );
    }

    control.block_on(async move {
        if let Some(http) = http {
            tokio::spawn(redirect_listener::redirect_loop(
                TcpListener::from_std(http)?,
                shared.clone(),
                https_addr.port(),
            ));
        }
        if let Some(admin) = admin {
            tokio::spawn(crate::admin::serve(
                TcpListener::from_std(admin)?,
                shared.clone(),
            ));
        }
        tokio::spawn(control::maintenance(shared.clone()));
        shared.listeners_ready.store(true, Ordering::Release);
        control::wait_for_signals(&shared, &config_path, signals).await;
        control::drain(&shared).await;
        anyhow::Ok(())
    })?;
    // A worker hands its last access-log lines over as its thread ends; the
    // drain has let every connection finish (or given up on them), so the
    // workers end now: wait a moment for them, never for a stuck one.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while threads.iter().any(|t| !t.is_finished()) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    Ok(())
}
