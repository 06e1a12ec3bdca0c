//! JWT verification for routes with `jwt = true`.
//!
//! A token's way, and the file for each step:
//!
//! - `extract.rs` finds it: `Authorization: Bearer`, else the `token_cookie`.
//! - `verify.rs` checks it — size, shape, header, `alg` in the allow-list,
//!   then key choice, signature and claims — or says why not ([`TokenError`]).
//! - `cache.rs` remembers it per worker thread, so the client's next
//!   request with it skips that work.
//! - `verified.rs` is what it grants ([`VerifiedToken`]): subject, scopes,
//!   claims as headers for the upstream.
//!
//! And where the keys come from:
//!
//! - `settings.rs`: `[jwt]` as read ([`JwtSettings`]) and as validated at
//!   load, every static key decoded ([`VerifierConfig`]).
//! - `algorithms.rs`: algorithm names, and the sets of them a key may serve.
//! - `keys.rs`: PEM and JWKS decoding into a [`KeySet`].
//! - `remote.rs`: keys that change while the proxy runs, fetched at start,
//!   refreshed, refetched on an unknown `kid` ([`RemoteKeys`]), from a
//!   [`KeySource`]; `jwks_url.rs` is the source that fetches `jwks_url`.
//!
//! Minting tokens (`portcullis token`, the demo) is in `cmd/token/`.

mod algorithms;
mod cache;
mod extract;
mod jwks_url;
mod keys;
mod remote;
mod settings;
#[cfg(test)]
pub(crate) mod test_support;
mod verified;
mod verify;

pub use extract::{TokenSource, extract_token};
pub use keys::KeySet;
pub use remote::{
    DEFAULT_MIN_REFETCH_INTERVAL, FetchFuture, FetchOptions, KeyFetcher, KeySource, RemoteKeys,
};
pub use settings::{JwtConfigError, JwtSettings, KeyFile, VerifierConfig};
pub use verified::VerifiedToken;
pub use verify::{JwtVerifier, MAX_TOKEN_BYTES, TokenError};

// What minting (`cmd/token/`) shares with verification.
pub(crate) use algorithms::{alg_name, min_hmac_secret, parse_algorithms};
pub(crate) use keys::{RawJwks, pem_label};
pub(crate) use settings::config_err;
