//! One worker thread's accept loop, and the life of each HTTPS connection
//! it accepts: a `max_connections` slot, the TLS handshake, hyper's HTTP/1.1
//! or HTTP/2 connection as ALPN chose, and the header-read and idle deadlines.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::OwnedSemaphorePermit;

use crate::connection::{Activity, ActivityIo, ConnInfo, ConnectionSlot, CutOff, Expiry, Timeouts};
use crate::h2_flood::ControlFrameGuard;
use crate::runtime::{Runtime, Shared};
use crate::sniffer::{AnomalyLog, RequestHeadSniffer};
use crate::socket::ClientSocket;
use crate::telemetry;

/// The HTTP/1.1 and HTTP/2 connection settings of a worker, built again
/// for new connections when a reload changes `max_header_bytes`.
struct HttpBuilders {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
    max_header_bytes: usize,
}

fn http_builders(runtime: &Runtime) -> HttpBuilders {
    let server = &runtime.config.server;
    let mut http1 = http1::Builder::new();
    http1
        .keep_alive(true)
        // Our own check answers 431 with the JSON error up to twice the
        // limit; hyper's bare 431 is only the backstop for larger heads.
        .max_buf_size((server.max_header_bytes * 2 + 4096).max(8192))
        .header_read_timeout(None);
    let mut http2 = http2::Builder::new(TokioExecutor::new());
    http2
        .timer(TokioTimer::new())
        .max_concurrent_streams(256)
        .max_header_list_size((server.max_header_bytes * 2) as u32)
        .keep_alive_interval(None);
    HttpBuilders {
        http1,
        http2,
        max_header_bytes: server.max_header_bytes,
    }
}

pub(super) async fn worker_loop(
    worker: usize,
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
) {
    let listener = match TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(error) => {
            tracing::error!(%error, worker, "cannot register the listener");
            shared.shutdown.cancel();
            return;
        }
    };
    let mut builders = Arc::new(http_builders(&shared.runtime.load()));
    // Opened here, on this worker's runtime, so that the first rate-limited
    // request finds it (a reload's new [redis] opens on first use).
    if let Some(redis) = &shared.runtime.load().redis {
        redis.warm(worker);
    }
    // Fires when some worker takes the last free slot. Registered before
    // each look at the free slots, so that running out while this worker
    // waits for a connection is never missed.
    let slots_ran_out = shared.slots_ran_out.notified();
    tokio::pin!(slots_ran_out);
    slots_ran_out.as_mut().enable();
    loop {
        let Some(mut permit) = acquire_slot(&shared).await else {
            return;
        };
        let accepted = loop {
            if shared.permits.available_permits() > 0 {
                // Slots to spare: nobody can be waiting for the one this
                // worker holds, so it waits for a connection with no timer
                // (an idle proxy does not wake up).
                tokio::select! {
                    accepted = listener.accept() => break accepted,
                    () = slots_ran_out.as_mut() => {
                        slots_ran_out.set(shared.slots_ran_out.notified());
                        slots_ran_out.as_mut().enable();
                    }
                    () = shared.shutdown.cancelled() => return,
                }
                continue;
            }
            // Each worker accepts on its own listener, and the kernel queues
            // a connection on one of them. A worker holding the last free
            // slot while its own queue is empty must not starve another
            // worker's queue: when every slot is taken, it hands its slot
            // back now and then. The semaphore is fair, so a worker already
            // waiting gets it.
            tokio::select! {
                accepted = listener.accept() => break accepted,
                () = tokio::time::sleep(SLOT_ROTATION) => {
                    if shared.permits.available_permits() == 0 {
                        drop(permit);
                        let Some(again) = acquire_slot(&shared).await else {
                            return;
                        };
                        permit = again;
                    }
                }
                () = shared.shutdown.cancelled() => return,
            }
        };
        let (tcp, peer) = match accepted {
            Ok(pair) => pair,
            Err(error) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        {
            // A reload's max_header_bytes reaches hyper's buffer and HTTP/2
            // header-list limits on connections accepted from now on.
            let runtime = shared.runtime.load();
            if runtime.config.server.max_header_bytes != builders.max_header_bytes {
                builders = Arc::new(http_builders(&runtime));
            }
        }
        let shared_for_task = shared.clone();
        let builders = builders.clone();
        shared.connections.spawn(serve_https(
            tcp,
            peer,
            permit,
            worker,
            shared_for_task,
            builders,
        ));
    }
}

/// How long a worker keeps the last free connection slot while nothing
/// arrives on its own listener (see `worker_loop`).
const SLOT_ROTATION: Duration = Duration::from_millis(50);

/// A `max_connections` slot, or `None` once the proxy is shutting down.
async fn acquire_slot(shared: &Shared) -> Option<OwnedSemaphorePermit> {
    let permit = tokio::select! {
        permit = shared.permits.clone().acquire_owned() => permit.ok(),
        _ = shared.shutdown.cancelled() => None,
    }?;
    if shared.permits.available_permits() == 0 {
        shared.slots_ran_out.notify_waiters();
    }
    Some(permit)
}

async fn serve_https(
    tcp: TcpStream,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
    worker: usize,
    shared: Arc<Shared>,
    builders: Arc<HttpBuilders>,
) {
    // Held by the connection's I/O from the handshake on, so that a
    // WebSocket tunnel keeps the slot until it closes.
    let slot = ConnectionSlot::new(shared.clone(), permit);
    let runtime = shared.runtime.load_full();
    let header_timeout = runtime.config.server.header_read_timeout;
    let idle_timeout = runtime.config.server.idle_timeout;
    let send_timeout = runtime.config.server.send_timeout;

    // TLS handshake, bounded by the header timeout (a client that connects
    // and never starts one must not hold a connection slot). Boxed, so that
    // its state (a whole rustls connection mid-handshake) is freed when it
    // ends instead of staying reserved in this task for the connection's life.
    let handshake = Box::pin(tokio::time::timeout(
        header_timeout,
        accept_tls(tcp, &runtime.tls),
    ));
    let tls = match handshake.await {
        Ok(Some(tls)) => tls,
        Ok(None) => return,
        Err(_) => {
            record_connection_rejection(
                &shared,
                "header_timeout",
                peer,
                Some("TLS handshake not completed"),
            );
            return;
        }
    };
    drop(runtime);
    let (_, session) = tls.get_ref();
    if session.alpn_protocol() == Some(crate::acme::ACME_TLS_ALPN) {
        // A CA's tls-alpn-01 validation: the handshake was the answer, and
        // no HTTP is spoken on such a connection (RFC 8737 §3).
        return;
    }
    let version = crate::tls::version_label(session.protocol_version());
    let is_h2 = session.alpn_protocol() == Some(b"h2");
    shared
        .metrics
        .tls_handshakes
        .get_or_create(&telemetry::VersionLabels { version })
        .inc();

    let activity = Activity::new(!is_h2);
    let anomalies = AnomalyLog::new();
    let info = Arc::new(ConnInfo::new(
        shared.clone(),
        worker,
        peer,
        version,
        is_h2,
        anomalies.clone(),
        activity.clone(),
    ));
    let timeouts = Timeouts {
        header: header_timeout,
        idle: idle_timeout,
        send: send_timeout,
    };
    // Boxed per request: hyper keeps the service's future inline in every
    // HTTP/1 connection (idle ones too) and moves it several times on its
    // way into a task per HTTP/2 stream; the pipeline's future is a few KiB,
    // a box is 16 bytes (unboxed, HTTP/2 cost 1,500 more instructions per
    // request under callgrind).
    let service = service_fn(move |request| {
        boxed_in_place(|| crate::pipeline::handle(request, info.clone()))
    });
    // The protocol is the one ALPN agreed on: HTTP/2 over TLS is only ever
    // negotiated that way (RFC 9113 §3.2), so nothing is sniffed or buffered
    // to guess it, and a client that offers no ALPN speaks HTTP/1.1.
    // HTTP/2 needs no request-head sniffer (HPACK hides heads from a byte
    // scanner, and the `http` crate drops a `:path` fragment), but its
    // control frames are counted.
    if is_h2 {
        let io = ActivityIo::new(
            ControlFrameGuard::new(tls, activity.clone()),
            activity.clone(),
        )
        .holding(slot);
        let connection = Box::pin(builders.http2.serve_connection(TokioIo::new(io), service));
        drive(
            connection,
            |c| c.graceful_shutdown(),
            &activity,
            timeouts,
            &shared,
            peer,
        )
        .await;
    } else {
        let io = ActivityIo::new(RequestHeadSniffer::new(tls, anomalies), activity.clone())
            .holding(slot);
        let connection = Box::pin(
            builders
                .http1
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades(),
        );
        drive(
            connection,
            |c| c.graceful_shutdown(),
            &activity,
            timeouts,
            &shared,
            peer,
        )
        .await;
    }
}

/// `Box::pin(make())` without building the future on the stack first and
/// copying its few KiB into the box: the slot is allocated before `make`
/// runs, so the compiler writes the new future straight into it.
fn boxed_in_place<F: Future>(make: impl FnOnce() -> F) -> Pin<Box<F>> {
    let slot = Box::new_uninit();
    Box::into_pin(Box::write(slot, make()))
}

/// Runs a connection to its end: its own header-read and idle deadlines,
/// and a graceful close when the proxy shuts down. The connection comes
/// boxed and pinned: an async fn keeps its arguments for its whole life, so
/// pinning a by-value connection here would reserve room for it twice.
async fn drive<C: Future<Output = hyper::Result<()>>>(
    mut connection: Pin<Box<C>>,
    shut_down_gracefully: impl Fn(Pin<&mut C>),
    activity: &Activity,
    timeouts: Timeouts,
    shared: &Shared,
    peer: SocketAddr,
) {
    // One timer serves both deadlines without being touched per request: it
    // never sleeps longer than `wake_at_least_every`, so a head that starts
    // while it is armed for a later idle deadline is seen at the next wake,
    // which then sleeps exactly until that head's own deadline.
    let wake_at_least_every = timeouts.shortest();
    let timer = tokio::time::sleep(wake_at_least_every);
    tokio::pin!(timer);
    let shutdown = shared.shutdown.cancelled();
    tokio::pin!(shutdown);
    let mut closing = false;
    // HTTP/2 bodies waiting on the client's flow-control window: stalled
    // when none has been pulled since `pulls_unchanged_since`.
    let mut seen_pulls = 0;
    let mut pulls_unchanged_since = tokio::time::Instant::now();
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(error) = result {
                    connection_error(shared, peer, &error);
                }
                return;
            }
            () = timer.as_mut() => {
                let now = tokio::time::Instant::now();
                let (awaiting, pulls) = activity.body_pull_state();
                if awaiting == 0 || pulls != seen_pulls {
                    seen_pulls = pulls;
                    pulls_unchanged_since = now;
                } else if now.duration_since(pulls_unchanged_since) >= timeouts.send {
                    tracing::info!(%peer, "send_timeout: the client stopped taking response data; connection closed");
                    return;
                }
                let (deadline, expiry) = activity.deadline(&timeouts);
                if deadline <= now {
                    match expiry {
                        Some(Expiry::HeaderTimeout) => {
                            record_connection_rejection(shared, "header_timeout", peer, Some("request head not completed"));
                            return;
                        }
                        Some(Expiry::Idle) if !closing => {
                            closing = true;
                            shut_down_gracefully(connection.as_mut());
                        }
                        // Closing for a whole timer period and still not done: stop waiting.
                        Some(Expiry::Idle) => return,
                        Some(Expiry::SendTimeout) => {
                            // Dropping the connection drops the response
                            // body, and with it the upstream connection.
                            tracing::info!(%peer, "send_timeout: the client stopped reading; connection closed");
                            return;
                        }
                        None => {}
                    }
                }
                let next = if deadline > now { deadline } else { now + wake_at_least_every };
                timer.as_mut().reset(next.min(now + wake_at_least_every));
            }
            why = activity.cut_off() => {
                match why {
                    CutOff::RapidReset => tracing::warn!(%peer, "the client cancelled most of its requests (rapid reset); connection closed"),
                    CutOff::ControlFrameFlood => tracing::warn!(
                        %peer,
                        "the client sent more than {} HTTP/2 PING, SETTINGS and PRIORITY frames in {:?}; connection closed",
                        crate::h2_flood::MAX_CONTROL_FRAMES,
                        crate::h2_flood::CONTROL_WINDOW
                    ),
                }
                return;
            }
            () = shutdown.as_mut(), if !closing => {
                closing = true;
                shut_down_gracefully(connection.as_mut());
            }
        }
    }
}

/// The TLS handshake, unless the client speaks plain HTTP (then it gets a 400).
async fn accept_tls(
    tcp: TcpStream,
    acceptor: &tokio_rustls::TlsAcceptor,
) -> Option<tokio_rustls::server::TlsStream<ClientSocket>> {
    let mut tls = match acceptor
        .accept(ClientSocket::new(tcp))
        .into_fallible()
        .await
    {
        Ok(tls) => tls,
        Err((_, mut socket)) => {
            if socket.spoke_plain_http() {
                refuse_plain_http(&mut socket).await;
            }
            return None;
        }
    };
    let (socket, session) = tls.get_mut();
    // Under TLS 1.3 what the handshake leaves held is session tickets, and
    // a client whose request came with its Finished gets them with the
    // answer. A client that sent nothing yet may be waiting for them (a
    // resumption check such as `openssl s_client -sess_out`), and under
    // TLS 1.2 it is the server's last flight: those go now.
    let request_arrived = session.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3)
        && session
            .reader()
            .into_first_chunk()
            .is_ok_and(|chunk| !chunk.is_empty());
    socket.handshake_done();
    if !request_arrived {
        socket.send_held().await.ok()?;
    }
    Some(tls)
}

/// A plain-HTTP client on the HTTPS port gets a 400 that says to use
/// https:// instead of a TLS alert it cannot read ([`ClientSocket`] told
/// it by its first byte).
async fn refuse_plain_http(socket: &mut ClientSocket) {
    // Not a TLS connection: nothing is to be held back.
    socket.handshake_done();
    let body =
        r#"{"error":"bad_request","message":"This port speaks HTTPS; use https:// in the URL."}"#;
    let response = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = socket.write_all(response.as_bytes()).await;
    let _ = socket.shutdown().await;
}

fn record_connection_rejection(
    shared: &Shared,
    reason: &'static str,
    peer: SocketAddr,
    detail: Option<&str>,
) {
    shared
        .metrics
        .rejections
        .get_or_create(&telemetry::ReasonLabels { reason })
        .inc();
    telemetry::security_event_with(reason, detail, None, peer.ip(), None);
}

fn connection_error(shared: &Shared, peer: SocketAddr, hyper_error: &hyper::Error) {
    {
        if hyper_error.is_parse_too_large() {
            record_connection_rejection(
                shared,
                "header_too_large",
                peer,
                Some("request head over the parser's limit"),
            );
            return;
        }
        if hyper_error.is_timeout() {
            record_connection_rejection(shared, "header_timeout", peer, None);
            return;
        }
    }
    tracing::debug!(error = %hyper_error, %peer, "connection ended with an error");
}
