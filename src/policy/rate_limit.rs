//! STUB
use std::time::Duration;
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub per: Duration,
}
impl std::str::FromStr for Rate {
    type Err = String;
    fn from_str(_s: &str) -> Result<Self, String> {
        Ok(Rate {
            count: 1,
            per: Duration::from_secs(1),
        })
    }
}
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    Ip,
    Sub,
    Header(http::HeaderName),
}
impl std::str::FromStr for KeySource {
    type Err = String;
    fn from_str(_s: &str) -> Result<Self, String> {
        Ok(KeySource::Ip)
    }
}
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitSpec {
    pub rate: Rate,
    pub burst: u32,
    pub key: KeySource,
}
pub struct RouteLimiter {
    spec: RateLimitSpec,
}
impl RouteLimiter {
    pub fn new(spec: RateLimitSpec) -> Self {
        RouteLimiter { spec }
    }
    pub fn spec(&self) -> &RateLimitSpec {
        &self.spec
    }
    pub fn check(&self, _k: &LimitKey) -> Result<RateLimitInfo, RateLimited> {
        Ok(RateLimitInfo)
    }
    pub fn sweep(&self) {}
}
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LimitKey {
    Ip(std::net::IpAddr),
    Sub(Box<str>),
    Header(Box<[u8]>),
}
pub fn limit_key(
    _s: &KeySource,
    ip: std::net::IpAddr,
    _h: &http::HeaderMap,
    _sub: Option<&str>,
) -> LimitKey {
    LimitKey::Ip(ip)
}
pub fn client_ip(
    peer: std::net::IpAddr,
    _h: &http::HeaderMap,
    _t: &[ipnet::IpNet],
) -> std::net::IpAddr {
    peer
}
#[derive(Debug, Clone)]
pub struct RateLimitInfo;
impl RateLimitInfo {
    pub fn header_values(&self) -> [(http::HeaderName, http::HeaderValue); 2] {
        [
            (
                http::HeaderName::from_static("ratelimit"),
                http::HeaderValue::from_static(""),
            ),
            (
                http::HeaderName::from_static("ratelimit-policy"),
                http::HeaderValue::from_static(""),
            ),
        ]
    }
}
#[derive(Debug)]
pub struct RateLimited {
    pub retry_after_secs: u64,
    pub info: RateLimitInfo,
}
