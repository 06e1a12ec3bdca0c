//! JWT test fixtures shared by the unit tests under `src/policy/jwt/`
//! (`test_support.rs` includes this file by path) and by `tests/jwt.rs`:
//! key pairs of each family, signing tokens with them, and a JWKS server
//! on a loopback port.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, EncodingKey, Header};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An asymmetric key pair generated for this test run.
pub struct TestKey {
    pub alg: Algorithm,
    pub enc: EncodingKey,
    pub public_pem: String,
    pub private_pem: String,
}

impl TestKey {
    pub fn generate(rc: &'static rcgen::SignatureAlgorithm, alg: Algorithm) -> TestKey {
        let kp = rcgen::KeyPair::generate_for(rc).unwrap();
        let private_pem = kp.serialize_pem();
        let enc = match alg.family() {
            AlgorithmFamily::Rsa => EncodingKey::from_rsa_pem(private_pem.as_bytes()),
            AlgorithmFamily::Ec => EncodingKey::from_ec_pem(private_pem.as_bytes()),
            _ => EncodingKey::from_ed_pem(private_pem.as_bytes()),
        }
        .unwrap();
        TestKey {
            alg,
            enc,
            public_pem: kp.public_key_pem(),
            private_pem,
        }
    }

    pub fn rsa() -> TestKey {
        Self::generate(&rcgen::PKCS_RSA_SHA256, Algorithm::RS256)
    }

    pub fn p256() -> TestKey {
        Self::generate(&rcgen::PKCS_ECDSA_P256_SHA256, Algorithm::ES256)
    }

    pub fn ed25519() -> TestKey {
        Self::generate(&rcgen::PKCS_ED25519, Algorithm::EdDSA)
    }

    pub fn decoding(&self) -> DecodingKey {
        let pem = self.public_pem.as_bytes();
        match self.alg.family() {
            AlgorithmFamily::Rsa => DecodingKey::from_rsa_pem(pem),
            AlgorithmFamily::Ec => DecodingKey::from_ec_pem(pem),
            _ => DecodingKey::from_ed_pem(pem),
        }
        .unwrap()
    }

    /// The public JWK, with `alg` set and the given `kid`.
    pub fn jwk(&self, kid: &str) -> Value {
        let mut jwk = Jwk::from_decoding_key(&self.decoding(), Some(self.alg)).unwrap();
        jwk.common.key_id = Some(kid.to_string());
        serde_json::to_value(jwk).unwrap()
    }

    pub fn token(&self, kid: Option<&str>, claims: &Value) -> String {
        let mut header = Header::new(self.alg);
        header.kid = kid.map(str::to_string);
        jsonwebtoken::encode(&header, claims, &self.enc).unwrap()
    }
}

/// A JWKS server on 127.0.0.1:0: every GET of `/.well-known/jwks.json` gets
/// the status and document last set (200 and the start document at first)
/// and is counted; anything else gets a 404. Dropping it, or `stop`,
/// closes the listener (connections are then refused).
pub struct JwksServer {
    pub url: String,
    answer: Arc<Mutex<(u16, Vec<u8>)>>,
    hits: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl JwksServer {
    pub async fn start(document: Vec<u8>) -> JwksServer {
        Self::start_with(document, None).await
    }

    /// The same over TLS with `tls` (its certificate names `localhost`):
    /// the URL is `https://localhost:PORT/...`.
    pub async fn start_tls(document: Vec<u8>, tls: tokio_rustls::TlsAcceptor) -> JwksServer {
        Self::start_with(document, Some(tls)).await
    }

    async fn start_with(document: Vec<u8>, tls: Option<tokio_rustls::TlsAcceptor>) -> JwksServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let url = match tls {
            Some(_) => format!("https://localhost:{port}/.well-known/jwks.json"),
            None => format!("http://127.0.0.1:{port}/.well-known/jwks.json"),
        };
        let answer = Arc::new(Mutex::new((200u16, document)));
        let hits = Arc::new(AtomicUsize::new(0));
        let (shared_answer, counter) = (answer.clone(), hits.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    return;
                };
                let (shared_answer, counter) = (shared_answer.clone(), counter.clone());
                let tls = tls.clone();
                tokio::spawn(async move {
                    match tls {
                        None => answer_one(sock, &shared_answer, &counter).await,
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(sock).await {
                                answer_one(stream, &shared_answer, &counter).await;
                            }
                        }
                    }
                });
            }
        });
        JwksServer {
            url,
            answer,
            hits,
            task,
        }
    }

    /// From now on, answer 200 with `document`.
    pub fn serve(&self, document: Vec<u8>) {
        self.answer_with(200, document);
    }

    /// From now on, answer `status` with `body`.
    pub fn answer_with(&self, status: u16, body: Vec<u8>) {
        *self.answer.lock().unwrap() = (status, body);
    }

    /// GETs of the JWKS path so far.
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    pub async fn stop(mut self) {
        self.task.abort();
        // The listener goes with the task; waiting for it makes the
        // refusal certain once this returns.
        let _ = (&mut self.task).await;
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads one request head and answers it: the JWKS path with the current
/// answer (counted), anything else with 404.
async fn answer_one<S>(mut sock: S, answer: &Mutex<(u16, Vec<u8>)>, hits: &AtomicUsize)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        match sock.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }
    let (status, body) = if request.starts_with(b"GET /.well-known/jwks.json HTTP/1.1\r\n") {
        hits.fetch_add(1, Ordering::SeqCst);
        answer.lock().unwrap().clone()
    } else {
        (404, b"{}".to_vec())
    };
    let head = format!(
        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let _ = sock.write_all(head.as_bytes()).await;
    let _ = sock.write_all(&body).await;
    let _ = sock.shutdown().await;
}
