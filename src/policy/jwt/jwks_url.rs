//! `jwks_url`: the URL checked once at load, and the [`KeySource`] that
//! fetches it — one HTTP/1.1 GET per fetch, the body decoded as a JWKS.
//! `https://` is checked against the system's trusted roots
//! ([`crate::outbound_tls`]); `http://` is for an identity provider on a
//! trusted network.

use bytes::Bytes;
use http::header::{ACCEPT, CONNECTION, HOST, USER_AGENT};
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;

use super::algorithms::AlgSet;
use super::keys::decode_jwks;
use super::remote::{FetchFuture, KeySource};
use super::settings::{JwtConfigError, config_err};

/// Largest JWKS document accepted from `jwks_url`.
const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// A parsed `jwks_url`.
#[derive(Debug, Clone)]
pub(super) struct JwksUrl {
    /// As configured, for logs.
    pub(super) text: String,
    /// The name the server's certificate is checked for; `None` for `http://`.
    tls_name: Option<ServerName<'static>>,
    /// Host to connect to, IPv6 brackets removed.
    host: String,
    port: u16,
    /// `Host` header value.
    authority: String,
    path_and_query: String,
}

pub(super) fn parse_jwks_url(text: &str) -> Result<JwksUrl, JwtConfigError> {
    let bad = |why: &str| config_err("jwks_url", format!("\"{text}\" {why}"));
    let uri: Uri = text.parse().map_err(|_| bad("is not a valid URL"))?;
    let https = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => return Err(bad("must start with https:// or http://")),
    };
    let authority = uri.authority().ok_or_else(|| bad("has no host"))?;
    if authority.as_str().contains('@') {
        return Err(bad("must not contain credentials"));
    }
    let host = authority.host();
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() {
        return Err(bad("has no host"));
    }
    let tls_name = if https {
        let name = ServerName::try_from(host.to_string())
            .map_err(|_| bad("has no host name a certificate can be checked for"))?;
        Some(name)
    } else {
        None
    };
    Ok(JwksUrl {
        text: text.to_string(),
        tls_name,
        host: host.to_string(),
        port: authority.port_u16().unwrap_or(if https { 443 } else { 80 }),
        authority: authority.as_str().to_string(),
        path_and_query: uri
            .path_and_query()
            .map_or_else(|| "/".to_string(), |p| p.as_str().to_string()),
    })
}

/// One HTTP/1.1 GET on a fresh connection. No pool: a fetch happens every few
/// minutes, and a fresh connection keeps the fetch independent of whichever
/// tokio runtime runs it (verify may be called from several).
async fn http_get(url: &JwksUrl, max_bytes: usize) -> Result<Bytes, String> {
    let stream = tokio::net::TcpStream::connect((url.host.as_str(), url.port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    let Some(name) = &url.tls_name else {
        return get_over(stream, url, max_bytes).await;
    };
    let tls = crate::outbound_tls::system_connector()
        .map_err(|e| format!("TLS: {e}"))?
        .connect(name.clone(), stream)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    get_over(tls, url, max_bytes).await
}

async fn get_over<S>(stream: S, url: &JwksUrl, max_bytes: usize) -> Result<Bytes, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let req = Request::get(url.path_and_query.as_str())
        .header(HOST, url.authority.as_str())
        .header(ACCEPT, "application/jwk-set+json, application/json")
        .header(USER_AGENT, "portcullis")
        .header(CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("request: {e}"))?;
    let exchange = async {
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("request: {e}"))?;
        if resp.status() != StatusCode::OK {
            return Err(format!("status {}", resp.status()));
        }
        let body = Limited::new(resp.into_body(), max_bytes)
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?;
        Ok(body.to_bytes())
    };
    tokio::pin!(exchange);
    // The connection future must be polled for the exchange to progress; it
    // may also finish first (server closed after the body), in which case
    // the exchange still completes from what was already read.
    tokio::select! {
        r = &mut exchange => r,
        c = conn => match c {
            Ok(()) => exchange.await,
            Err(e) => Err(format!("connection: {e}")),
        },
    }
}

/// The key source for `jwks_url`.
pub struct HttpJwks {
    url: JwksUrl,
    /// Keys for other algorithms are skipped as the document is decoded.
    allowed: AlgSet,
    max_bytes: usize,
}

impl HttpJwks {
    pub(super) fn new(url: JwksUrl, allowed: AlgSet) -> HttpJwks {
        HttpJwks {
            url,
            allowed,
            max_bytes: MAX_JWKS_BYTES,
        }
    }
}

impl KeySource for HttpJwks {
    fn fetch(&self) -> FetchFuture<'_> {
        Box::pin(async move {
            let body = http_get(&self.url, self.max_bytes).await?;
            decode_jwks(&body, self.allowed, &self.url.text)
        })
    }

    fn name(&self) -> &str {
        &self.url.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::jwt::test_support::*;

    #[test]
    fn url_parts() {
        let url = parse_jwks_url("http://[::1]:4000/.well-known/jwks.json?x=1").unwrap();
        assert_eq!((url.host.as_str(), url.port), ("::1", 4000));
        assert_eq!(url.authority, "[::1]:4000");
        assert_eq!(url.path_and_query, "/.well-known/jwks.json?x=1");

        let url = parse_jwks_url("http://idp.internal").unwrap();
        assert_eq!((url.host.as_str(), url.port), ("idp.internal", 80));
        assert_eq!(url.path_and_query, "/");
    }

    #[test]
    fn url_refusals() {
        let url = parse_jwks_url("https://auth.example.com/jwks.json").unwrap();
        assert_eq!(
            (url.host.as_str(), url.port, url.tls_name.is_some()),
            ("auth.example.com", 443, true)
        );
        for bad in [
            "ftp://x/y",
            "not a url",
            "http:///nohost",
            "http://u:p@host/x",
        ] {
            let e = parse_jwks_url(bad).unwrap_err();
            assert_eq!(e.key, "jwks_url", "{bad}");
            assert!(e.message.contains(bad), "{bad}: {e}");
        }
    }

    /// A key source fetching from `server`, for ES256 keys.
    fn source_for(server: &JwksServer) -> HttpJwks {
        let allowed = AlgSet::of(jsonwebtoken::Algorithm::ES256);
        HttpJwks::new(parse_jwks_url(&server.url).unwrap(), allowed)
    }

    #[tokio::test]
    async fn a_fetch_is_one_get_decoded_as_a_jwks() {
        let server = JwksServer::start(jwks(&[ec_a().jwk("a"), rsa().jwk("r")])).await;
        let set = source_for(&server).fetch().await.unwrap();
        // The RSA key fits no allowed algorithm and is skipped.
        assert_eq!(set.len(), 1);
        assert!(set.has_kid("a"));
        assert_eq!(server.hits(), 1);
    }

    #[tokio::test]
    async fn a_failed_fetch_says_why() {
        let server = JwksServer::start(Vec::new()).await;
        let source = source_for(&server);
        server.answer_with(500, b"oops".to_vec());
        let e = source.fetch().await.err().unwrap();
        assert!(e.contains("status 500"), "{e}");

        server.answer_with(200, b"<html>maintenance</html>".to_vec());
        let e = source.fetch().await.err().unwrap();
        assert!(e.contains("not a JWKS document"), "{e}");

        server.answer_with(200, jwks(&[ec_a().jwk("a")]));
        let small = HttpJwks {
            max_bytes: 64,
            ..source_for(&server)
        };
        let e = small.fetch().await.err().unwrap();
        assert!(e.starts_with("body"), "{e}");
    }

    #[tokio::test]
    async fn nothing_listening_is_a_failed_fetch() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/jwks", listener.local_addr().unwrap());
        drop(listener);
        let source = HttpJwks::new(
            parse_jwks_url(&url).unwrap(),
            AlgSet::of(jsonwebtoken::Algorithm::ES256),
        );
        let e = source.fetch().await.err().unwrap();
        assert!(e.starts_with("connect"), "{e}");
        assert_eq!(source.name(), url);
    }
}
