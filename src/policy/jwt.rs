//! STUB
use std::sync::Arc;
use std::time::Duration;
#[derive(Clone, Debug)]
pub struct JwtSettings {
    pub algorithms: Vec<String>,
    pub secret: Option<Vec<u8>>,
    pub secret_env: Option<String>,
    pub public_key_pem: Option<Vec<u8>>,
    pub jwks_json: Option<Vec<u8>>,
    pub jwks_url: Option<String>,
    pub jwks_refresh: Duration,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub leeway: Duration,
}
#[derive(Debug, thiserror::Error)]
#[error("{key}: {message}")]
pub struct JwtConfigError {
    pub key: &'static str,
    pub message: String,
}
pub struct JwtVerifier;
impl JwtVerifier {
    pub fn new(_s: JwtSettings) -> Result<Self, JwtConfigError> {
        Ok(JwtVerifier)
    }
    pub fn start_background(self: &Arc<Self>) {}
    pub async fn verify(&self, _t: &str) -> Result<VerifiedToken, TokenError> {
        Err(TokenError::Malformed)
    }
}
pub struct VerifiedToken {
    pub claims: serde_json::Map<String, serde_json::Value>,
}
impl VerifiedToken {
    pub fn subject(&self) -> Option<&str> {
        None
    }
    pub fn scopes(&self) -> Vec<&str> {
        vec![]
    }
    pub fn claim_as_header_value(&self, _n: &str) -> Option<String> {
        None
    }
}
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenError {
    Malformed,
}
impl TokenError {
    pub fn detail(&self) -> &'static str {
        "malformed"
    }
}
pub struct MintRequest {
    pub subject: String,
    pub scope: Option<String>,
    pub ttl: Duration,
    pub extra_claims: Vec<(String, serde_json::Value)>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
}
pub fn mint(
    _s: &JwtSettings,
    _k: Option<&[u8]>,
    _r: &MintRequest,
) -> Result<String, JwtConfigError> {
    Ok(String::new())
}
pub enum TokenSource<'a> {
    Found(&'a str),
    Missing,
    Invalid,
}
pub fn extract_token<'a>(_h: &'a http::HeaderMap, _c: Option<&str>) -> TokenSource<'a> {
    TokenSource::Missing
}
