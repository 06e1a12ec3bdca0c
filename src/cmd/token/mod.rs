//! `portcullis token`: a signed JWT that the configured `[jwt]` verifier
//! accepts, for trying protected routes with curl. With the HS* secret's
//! variable unset, it signs with the secret `portcullis demo` keeps in
//! `certs/demo-jwt-secret.key`, so a token minted in a second terminal is
//! accepted by a running demo. The signing itself is in `mint.rs`.

mod mint;

use std::path::Path;

pub use mint::{MintRequest, mint, mint_with_kid};

use super::Failure;

pub fn token(
    config_path: &Path,
    sub: &str,
    scope: Option<String>,
    ttl: &str,
    claims: &[String],
    key: Option<&Path>,
) -> Result<(), Failure> {
    let ttl = crate::config::units::parse_duration(ttl)
        .map_err(|e| Failure::Usage(format!("--ttl: {e}")))?;
    let extra_claims = claims
        .iter()
        .map(|claim| {
            let (name, value) = claim
                .split_once('=')
                .ok_or_else(|| Failure::Usage(format!("--claim: expected k=v, got \"{claim}\"")))?;
            let value = serde_json::from_str(value)
                .unwrap_or_else(|_| serde_json::Value::String(value.to_string()));
            Ok((name.to_string(), value))
        })
        .collect::<Result<Vec<_>, Failure>>()?;
    use_demo_secret(config_path)?;
    let config = crate::config::load(config_path)?;
    let jwt = config.jwt.as_ref().ok_or_else(|| {
        Failure::Usage(format!(
            "{}: there is no [jwt] section to sign for",
            config_path.display()
        ))
    })?;
    let private_key = key
        .map(|path| {
            std::fs::read(path)
                .map_err(|e| Failure::Usage(format!("--key {}: {e}", path.display())))
        })
        .transpose()?;
    let request = MintRequest {
        subject: sub.to_string(),
        scope,
        ttl,
        extra_claims,
        issuer: jwt.settings.issuer.clone(),
        audience: jwt.settings.audience.clone(),
    };
    let token = mint(&jwt.settings, private_key.as_deref(), &request)
        .map_err(|e| Failure::Usage(format!("jwt.{e}")))?;
    println!("{token}");
    Ok(())
}

/// Exports the demo's secret under the configured variable when that
/// variable is unset and the demo's file exists; otherwise changes nothing,
/// and `config::load` names the missing variable as usual.
pub(crate) fn use_demo_secret(config_path: &Path) -> Result<(), Failure> {
    let Some(var) = super::demo::hmac_secret_env(config_path) else {
        return Ok(());
    };
    if std::env::var_os(&var).is_some() {
        return Ok(());
    }
    let path = super::demo::secret_path(config_path);
    if let Some(secret) = super::demo::read_secret(&path)? {
        eprintln!(
            "token: {var} is unset; using the demo's secret from {}",
            path.display()
        );
        // SAFETY: single-threaded: `token` starts no runtime or thread, and
        // the variable is set before anything reads the environment.
        unsafe { std::env::set_var(&var, secret) };
    }
    Ok(())
}
