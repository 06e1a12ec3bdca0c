//! The HTTP client instant-acme talks to the CA with: one HTTP/1.1
//! exchange per connection over rustls ([`crate::outbound_tls`]), trusting
//! the system's roots plus `directory_ca`. Ours rather than instant-acme's
//! hyper-rustls client so that `directory_ca` adds to the system's roots
//! (theirs replaces them), and so the tree gains no second TLS stack
//! configuration.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use http::header::HOST;
use http::{HeaderValue, Request, Response};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_util::rt::TokioIo;
use instant_acme::{BodyWrapper, BytesResponse, HttpClient};
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// One exchange with the CA, connection included.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(30);
/// ACME answers are small JSON documents and PEM chains.
const MAX_ANSWER_BYTES: usize = 1 << 20;

#[derive(Clone)]
pub struct DirectoryClient {
    tls: TlsConnector,
}

impl DirectoryClient {
    pub fn new(extra_roots: &[CertificateDer<'static>]) -> anyhow::Result<Self> {
        Ok(DirectoryClient {
            tls: crate::outbound_tls::connector(extra_roots)?,
        })
    }
}

impl HttpClient for DirectoryClient {
    fn request(
        &self,
        request: Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        let tls = self.tls.clone();
        Box::pin(async move {
            match tokio::time::timeout(EXCHANGE_TIMEOUT, exchange(tls, request)).await {
                Ok(Ok(response)) => Ok(BytesResponse::from(response)),
                Ok(Err(error)) => Err(instant_acme::Error::Other(error.into())),
                Err(_) => Err(instant_acme::Error::Other(
                    format!("no answer within {EXCHANGE_TIMEOUT:?}").into(),
                )),
            }
        })
    }
}

async fn exchange(
    tls: TlsConnector,
    mut request: Request<BodyWrapper<Bytes>>,
) -> anyhow::Result<Response<Full<Bytes>>> {
    let uri = request.uri().clone();
    let authority = uri
        .authority()
        .ok_or_else(|| anyhow::anyhow!("{uri}: no host"))?;
    let host = authority.host();
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
        .to_owned();
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => anyhow::bail!("{uri}: not an http(s) URL"),
    };
    let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
    request
        .headers_mut()
        .insert(HOST, HeaderValue::from_str(authority.as_str())?);
    *request.uri_mut() = uri.path_and_query().map_or("/", |pq| pq.as_str()).parse()?;
    let tcp = TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect to {host}:{port}: {e}"))?;
    if https {
        let name = ServerName::try_from(host.clone())?;
        let stream = tls
            .connect(name, tcp)
            .await
            .map_err(|e| anyhow::anyhow!("TLS with {host}:{port}: {e}"))?;
        send(stream, request).await
    } else {
        send(tcp, request).await
    }
}

async fn send<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    stream: S,
    request: Request<BodyWrapper<Bytes>>,
) -> anyhow::Result<Response<Full<Bytes>>> {
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let response = sender.send_request(request).await?;
    let (parts, body) = response.into_parts();
    let body = Limited::new(body, MAX_ANSWER_BYTES)
        .collect()
        .await
        .map_err(|e| anyhow::anyhow!("reading the answer: {e}"))?
        .to_bytes();
    Ok(Response::from_parts(parts, Full::new(body)))
}
