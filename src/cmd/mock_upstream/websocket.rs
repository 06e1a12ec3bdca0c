//! `/ws`: the RFC 6455 opening handshake checked and answered, then an echo
//! of every text and binary message until the peer closes or the mock
//! shuts down.

use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};

use super::Shared;
use super::body::MockBody;

pub(super) enum Upgrade {
    NotAsked,
    Invalid,
    Valid(HeaderValue),
}

fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|value| {
        value
            .as_bytes()
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    })
}

/// Checks an RFC 6455 opening handshake and returns its key.
pub(super) fn websocket_key(headers: &HeaderMap, method: &Method) -> Upgrade {
    if !headers.contains_key(header::UPGRADE) {
        return Upgrade::NotAsked;
    }
    let version_ok = headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_some_and(|v| v.as_bytes().trim_ascii() == b"13");
    let key = headers.get(header::SEC_WEBSOCKET_KEY);
    match key {
        Some(key)
            if method == Method::GET
                && version_ok
                && has_token(headers, header::CONNECTION, "upgrade")
                && has_token(headers, header::UPGRADE, "websocket") =>
        {
            Upgrade::Valid(key.clone())
        }
        _ => Upgrade::Invalid,
    }
}

pub(super) fn accept_websocket(
    request: Request<Incoming>,
    key: &HeaderValue,
    shared: &Shared,
) -> Response<MockBody> {
    let accept = derive_accept_key(key.as_bytes().trim_ascii());
    let stop = shared.stop.clone();
    tokio::spawn(async move {
        match hyper::upgrade::on(request).await {
            Ok(upgraded) => {
                let socket =
                    WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None)
                        .await;
                echo_websocket(socket, stop).await;
            }
            Err(err) => tracing::debug!(error = %err, "mock-upstream: upgrade failed"),
        }
    });

    let mut response = Response::new(MockBody::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    match HeaderValue::from_str(&accept) {
        Ok(accept) => {
            headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
        }
        // base64 is always a valid header value; should that ever change,
        // a 500 is better than a handshake the client will reject.
        Err(_) => *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR,
    }
    response
}

/// Echoes text and binary messages until the peer closes. tungstenite
/// answers pings and close frames by itself; they go out on the next read
/// or flush.
async fn echo_websocket<S>(mut socket: WebSocketStream<S>, mut stop: watch::Receiver<()>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        let message = tokio::select! {
            message = socket.next() => message,
            _ = stop.changed() => {
                let _ = socket
                    .close(Some(CloseFrame {
                        code: CloseCode::Away,
                        reason: "mock-upstream shutting down".into(),
                    }))
                    .await;
                return;
            }
        };
        let sent = match message {
            Some(Ok(message @ (Message::Text(_) | Message::Binary(_)))) => {
                socket.send(message).await
            }
            Some(Ok(Message::Ping(_))) => socket.flush().await,
            Some(Ok(Message::Pong(_) | Message::Close(_) | Message::Frame(_))) => Ok(()),
            Some(Err(_)) | None => return,
        };
        if sent.is_err() {
            return;
        }
    }
}
