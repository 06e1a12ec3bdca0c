//! The `[jwt]` section: [`JwtSettings`] as the config layer read it, and
//! [`VerifierConfig`], the same settings checked once with every static key
//! decoded — plain data, so a bad key is a config error at load and the
//! request path never parses PEM or JWK. The live parts (the `jwks_url`
//! fetcher, the verifier's cache) are built from it by the runtime.

use std::fmt;
use std::time::Duration;

use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};

use super::algorithms::{ALGS, AlgSet, alg_name, min_hmac_secret, parse_algorithms};
use super::jwks_url::{JwksUrl, parse_jwks_url};
use super::keys::{KeySet, VerifyKey, decode_jwks, decode_public_key};

/// Largest `leeway` accepted.
const MAX_LEEWAY: Duration = Duration::from_secs(3600);

/// The `[jwt]` section as the config layer read it (files and the secret's
/// environment variable already read; nothing decoded yet).
#[derive(Clone)]
pub struct JwtSettings {
    /// As written, e.g. `["HS256", "RS256"]`.
    pub algorithms: Vec<String>,
    /// The HS* secret, read from the variable named by `secret_env`; `None`
    /// when unset.
    pub secret: Option<Vec<u8>>,
    /// The variable's name, for error messages only.
    pub secret_env: Option<String>,
    /// The `public_key` file (PEM).
    pub public_key: Option<KeyFile>,
    /// The `jwks` file (a JWKS document).
    pub jwks: Option<KeyFile>,
    pub jwks_url: Option<String>,
    /// Default 10 minutes.
    pub jwks_refresh: Duration,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    /// Default 30 seconds; applied to `exp` and `nbf`.
    pub leeway: Duration,
}

impl Default for JwtSettings {
    /// The SPEC's defaults: `algorithms = ["HS256"]`, `secret_env =
    /// "JWT_SECRET"` (not read here), `jwks_refresh = "10m"`, `leeway = "30s"`.
    fn default() -> Self {
        JwtSettings {
            algorithms: vec!["HS256".to_string()],
            secret: None,
            secret_env: Some("JWT_SECRET".to_string()),
            public_key: None,
            jwks: None,
            jwks_url: None,
            jwks_refresh: Duration::from_secs(600),
            issuer: None,
            audience: None,
            leeway: Duration::from_secs(30),
        }
    }
}

impl fmt::Debug for JwtSettings {
    // Hand-written so the secret can never reach a log through `{:?}`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtSettings")
            .field("algorithms", &self.algorithms)
            .field("secret", &self.secret.as_ref().map(|_| "[redacted]"))
            .field("secret_env", &self.secret_env)
            .field("public_key", &self.public_key)
            .field("jwks", &self.jwks)
            .field("jwks_url", &self.jwks_url)
            .field("jwks_refresh", &self.jwks_refresh)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("leeway", &self.leeway)
            .finish()
    }
}

/// A key file named in `[jwt]`, read: its name as written, so that an
/// error about its contents can name it the way `routes[N].json_schema`
/// errors do (`jwt.jwks: certs/keys.json: not a JWKS document (...)`).
#[derive(Clone)]
pub struct KeyFile {
    pub name: String,
    pub contents: Vec<u8>,
}

impl fmt::Debug for KeyFile {
    // The name and the size: the contents are no use in a log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({} bytes)", self.name, self.contents.len())
    }
}

/// A settings error: `key` is the `[jwt]` key at fault (`"algorithms"`,
/// `"secret_env"`, `"public_key"`, `"jwks"`, `"jwks_url"`, `"jwks_refresh"`,
/// `"leeway"`, or `"key"` for the private key given to
/// [`crate::cmd::token::mint`]) and `message` a sentence.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {message}")]
pub struct JwtConfigError {
    pub key: &'static str,
    pub message: String,
}

pub(crate) fn config_err(key: &'static str, message: impl Into<String>) -> JwtConfigError {
    JwtConfigError {
        key,
        message: message.into(),
    }
}

/// The `[jwt]` settings validated, every static key decoded: what a
/// [`super::JwtVerifier`] is built from.
#[derive(Clone)]
pub struct VerifierConfig {
    /// Listed algorithms, in the order written.
    pub(super) order: Vec<Algorithm>,
    pub(super) allowed: AlgSet,
    /// One [`Validation`] per listed algorithm (jsonwebtoken requires every
    /// algorithm of a `Validation` to share the key's family).
    pub(super) validations: [Option<Validation>; 12],
    pub(super) issuer: Option<String>,
    pub(super) hmac: Option<DecodingKey>,
    /// Where the HS* secret came from, for [`VerifierConfig::summary`].
    pub(super) secret_env: Option<String>,
    pub(super) public_key: Option<VerifyKey>,
    pub(super) file_keys: KeySet,
    pub(super) jwks_url: Option<JwksUrl>,
    pub(super) jwks_refresh: Duration,
    pub(super) leeway_secs: u64,
}

impl VerifierConfig {
    /// Decodes every key now. Rules: `"none"` can never be listed; unknown
    /// names and ES512 are rejected; an HS* algorithm needs the secret (a
    /// missing variable is named; a secret shorter than the hash output — 32,
    /// 48, 64 bytes for HS256/384/512 — is refused); an asymmetric algorithm
    /// needs `public_key`, `jwks` or `jwks_url`; HS* and asymmetric
    /// algorithms may be mixed only when both kinds of key are configured;
    /// `public_key`, `jwks` or `jwks_url` with no asymmetric algorithm
    /// listed, a public key that fits no listed algorithm, a `jwks` file with
    /// no usable key, and an `https://` `jwks_url` are errors. An unused
    /// `secret_env` is ignored (it has a default).
    pub fn new(settings: JwtSettings) -> Result<Self, JwtConfigError> {
        let order = parse_algorithms(&settings.algorithms)?;
        let allowed = order
            .iter()
            .fold(AlgSet::default(), |s, a| s.or(AlgSet::of(*a)));
        let hmac_algs: Vec<Algorithm> = order
            .iter()
            .copied()
            .filter(|a| a.family() == AlgorithmFamily::Hmac)
            .collect();
        let asym_listed = order.iter().any(|a| a.family() != AlgorithmFamily::Hmac);

        let hmac = if let Some(&first) = hmac_algs.first() {
            let env = settings.secret_env.as_deref();
            let secret = match (&settings.secret, env) {
                (Some(s), _) if !s.is_empty() => s,
                (Some(_), Some(var)) => {
                    return Err(config_err(
                        "secret_env",
                        format!(
                            "environment variable {var} is empty; {} needs the shared secret",
                            alg_name(first)
                        ),
                    ));
                }
                (None, Some(var)) => {
                    return Err(config_err(
                        "secret_env",
                        format!(
                            "environment variable {var} is not set; {} needs the shared secret",
                            alg_name(first)
                        ),
                    ));
                }
                (_, None) => {
                    return Err(config_err(
                        "secret_env",
                        format!(
                            "{} is listed in algorithms but no secret_env names the variable holding the secret",
                            alg_name(first)
                        ),
                    ));
                }
            };
            let strictest = hmac_algs
                .iter()
                .copied()
                .max_by_key(|a| min_hmac_secret(*a))
                .unwrap_or(first);
            let need = min_hmac_secret(strictest);
            if secret.len() < need {
                return Err(config_err(
                    "secret_env",
                    format!(
                        "the secret in {} is {} bytes; {} needs at least {need} (its hash output size)",
                        env.unwrap_or("the environment"),
                        secret.len(),
                        alg_name(strictest)
                    ),
                ));
            }
            Some(DecodingKey::from_secret(secret))
        } else {
            None
        };

        let any_public =
            settings.public_key.is_some() || settings.jwks.is_some() || settings.jwks_url.is_some();
        if asym_listed && !any_public {
            let names = allowed.asymmetric().names();
            return Err(config_err(
                "algorithms",
                format!("{names} need a public_key, jwks or jwks_url"),
            ));
        }
        if !asym_listed && any_public {
            let key = if settings.public_key.is_some() {
                "public_key"
            } else if settings.jwks.is_some() {
                "jwks"
            } else {
                "jwks_url"
            };
            return Err(config_err(
                key,
                "is set but algorithms lists no RS*, PS*, ES* or EdDSA algorithm to use it with",
            ));
        }

        let public_key = settings
            .public_key
            .as_ref()
            .map(|file| {
                decode_public_key(&file.contents, allowed)
                    .map_err(|why| config_err("public_key", format!("{}: {why}", file.name)))
            })
            .transpose()?;

        let file_keys = match &settings.jwks {
            Some(file) => {
                let in_file = |why: String| config_err("jwks", format!("{}: {why}", file.name));
                let set = decode_jwks(&file.contents, allowed, &file.name).map_err(in_file)?;
                if set.is_empty() {
                    return Err(in_file(format!(
                        "holds no key usable with the listed algorithms ({}); \
                         keys with \"use\": \"enc\", another \"alg\", or an unsupported type are skipped",
                        allowed.asymmetric().names()
                    )));
                }
                set
            }
            None => KeySet::default(),
        };

        let jwks_url = match settings.jwks_url.as_deref() {
            Some(text) => {
                let url = parse_jwks_url(text)?;
                if settings.jwks_refresh < Duration::from_secs(1) {
                    return Err(config_err("jwks_refresh", "must be at least 1s"));
                }
                Some(url)
            }
            None => None,
        };

        // Leeway is for clock skew; an hour already defeats most of `exp`.
        // (Also keeps jsonwebtoken's `now - leeway` far from underflow.)
        if settings.leeway > MAX_LEEWAY {
            return Err(config_err("leeway", "must be at most 1h"));
        }
        let leeway = settings.leeway.as_secs();
        let validations = std::array::from_fn(|i| {
            allowed.has(i).then(|| {
                let mut v = Validation::new(ALGS[i]);
                v.leeway = leeway;
                v.validate_exp = true;
                // jsonwebtoken leaves nbf unchecked by default.
                v.validate_nbf = true;
                let mut required = vec!["exp"];
                if let Some(iss) = &settings.issuer {
                    v.set_issuer(&[iss]);
                    required.push("iss");
                }
                match &settings.audience {
                    Some(aud) => {
                        v.set_audience(&[aud]);
                        required.push("aud");
                    }
                    // Without a configured audience jsonwebtoken would refuse
                    // every token that carries an `aud`; we ignore it instead.
                    None => v.validate_aud = false,
                }
                v.set_required_spec_claims(&required);
                v
            })
        });

        Ok(VerifierConfig {
            order,
            allowed,
            validations,
            issuer: settings.issuer,
            hmac,
            secret_env: settings.secret_env,
            public_key,
            file_keys,
            jwks_url,
            jwks_refresh: settings.jwks_refresh,
            leeway_secs: leeway,
        })
    }

    /// One line describing what this verifier accepts, for `portcullis
    /// check` and logs. Holds no secret.
    pub fn summary(&self) -> String {
        let mut parts = vec![format!(
            "algorithms {}",
            self.order
                .iter()
                .map(|a| alg_name(*a))
                .collect::<Vec<_>>()
                .join(", ")
        )];
        if self.hmac.is_some() {
            parts.push(format!(
                "HS* secret from {}",
                self.secret_env.as_deref().unwrap_or("settings")
            ));
        }
        if let Some(k) = &self.public_key {
            parts.push(format!("public_key for {}", k.algs.names()));
        }
        if !self.file_keys.is_empty() {
            parts.push(format!("jwks file with {} key(s)", self.file_keys.len()));
        }
        if let Some(url) = &self.jwks_url {
            parts.push(format!(
                "jwks_url {} every {:?}",
                url.text, self.jwks_refresh
            ));
        }
        parts.join("; ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::jwt::test_support::*;

    fn config_error(s: JwtSettings) -> JwtConfigError {
        match VerifierConfig::new(s) {
            Ok(_) => panic!("expected a config error"),
            Err(e) => e,
        }
    }

    /// `s` is refused at `key` with a message that starts with `start`.
    fn assert_refused(s: JwtSettings, key: &str, start: &str) {
        let e = config_error(s);
        assert_eq!(e.key, key);
        assert!(e.message.starts_with(start), "{e}");
    }

    #[test]
    fn config_hmac_secret_rules() {
        let mut s = settings(&["HS256"]);
        s.secret_env = Some("PORTCULLIS_TEST_SECRET".into());
        let e = config_error(s.clone());
        assert_eq!(e.key, "secret_env");
        assert!(
            e.message.contains("PORTCULLIS_TEST_SECRET is not set"),
            "{e}"
        );

        s.secret = Some(vec![]);
        assert!(config_error(s.clone()).message.contains("is empty"));

        s.secret = Some(vec![b'k'; 31]);
        let e = config_error(s.clone());
        assert!(
            e.message.contains("31 bytes") && e.message.contains("at least 32"),
            "{e}"
        );

        s.secret = Some(vec![b'k'; 32]);
        assert!(VerifierConfig::new(s.clone()).is_ok());

        // The strictest listed HS* sets the minimum.
        s.algorithms = vec!["HS256".into(), "HS512".into()];
        let e = config_error(s.clone());
        assert!(e.message.contains("HS512 needs at least 64"), "{e}");
        s.secret = Some(vec![b'k'; 64]);
        assert!(VerifierConfig::new(s.clone()).is_ok());

        s.secret_env = None;
        s.secret = None;
        assert_eq!(config_error(s).key, "secret_env");
    }

    #[test]
    fn config_unused_secret_env_is_ignored() {
        let mut s = settings(&["RS256"]);
        s.secret_env = Some("UNSET_AND_UNUSED".into());
        s.public_key = key_file("key.pem", rsa().public_pem.clone().into_bytes());
        assert!(VerifierConfig::new(s).is_ok());
    }

    #[test]
    fn config_asymmetric_needs_public_keys() {
        let e = config_error(settings(&["RS256"]));
        assert_eq!(e.key, "algorithms");
        assert!(
            e.message
                .contains("RS256 need a public_key, jwks or jwks_url"),
            "{e}"
        );

        // Mixed list with only the secret.
        let mut s = settings(&["HS256", "ES256"]);
        s.secret = Some(SECRET.to_vec());
        assert_eq!(config_error(s).key, "algorithms");

        // Mixed list with only a public key.
        let mut s = settings(&["HS256", "RS256"]);
        s.secret_env = Some("NOT_SET_PORTCULLIS".into());
        s.public_key = key_file("key.pem", rsa().public_pem.clone().into_bytes());
        assert_eq!(config_error(s).key, "secret_env");
    }

    #[test]
    fn config_public_key_without_asymmetric_alg() {
        let mut s = hs_settings();
        s.public_key = key_file("key.pem", rsa().public_pem.clone().into_bytes());
        assert_eq!(config_error(s).key, "public_key");
        let mut s = hs_settings();
        s.jwks_url = Some("http://127.0.0.1:1/jwks.json".into());
        assert_eq!(config_error(s).key, "jwks_url");
    }

    #[test]
    fn config_public_key_type_must_fit() {
        let mut s = settings(&["RS256"]);
        s.public_key = key_file("key.pem", ec_a().public_pem.clone().into_bytes());
        let e = config_error(s);
        assert_eq!(e.key, "public_key");
        assert!(
            e.message.contains("EC P-256") && e.message.contains("ES256"),
            "{e}"
        );

        let mut s = settings(&["ES384"]);
        s.public_key = key_file("key.pem", ec_a().public_pem.clone().into_bytes());
        assert_eq!(config_error(s).key, "public_key");

        let mut s = settings(&["ES256"]);
        s.public_key = key_file("key.pem", ed().public_pem.clone().into_bytes());
        assert_eq!(config_error(s).key, "public_key");
    }

    #[test]
    fn config_public_key_bad_inputs() {
        let mut s = settings(&["RS256"]);
        s.public_key = key_file("key.pem", rsa().private_pem.clone().into_bytes());
        let e = config_error(s);
        assert!(e.message.contains("private key"), "{e}");

        let mut s = settings(&["RS256"]);
        s.public_key = key_file("certs/key.pem", b"hello".to_vec());
        assert_refused(s, "public_key", "certs/key.pem: is not a PEM file");

        let mut s = settings(&["RS256"]);
        s.public_key = key_file(
            "key.pem",
            b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n".to_vec(),
        );
        assert_eq!(config_error(s).key, "public_key");

        let p521 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P521_SHA512).unwrap();
        let mut s = settings(&["ES256"]);
        s.public_key = key_file("key.pem", p521.public_key_pem().into_bytes());
        let e = config_error(s);
        assert!(e.message.contains("P-521"), "{e}");
    }

    #[test]
    fn config_jwks_file_rules() {
        let mut s = settings(&["ES256"]);
        s.jwks = key_file("keys.json", b"{\"not\":\"a jwks\"}".to_vec());
        assert_refused(s, "jwks", "keys.json: not a JWKS document (");

        // Only keys for algorithms not listed.
        let mut s = settings(&["ES256"]);
        s.jwks = key_file("keys.json", jwks(&[rsa().jwk("r")]));
        assert_refused(s, "jwks", "keys.json: holds no key usable");
    }

    #[test]
    fn config_jwks_url_rules() {
        // Which URLs are refused is jwks_url.rs's to test.
        let mut s = settings(&["RS256"]);
        s.jwks_url = Some("ftp://auth.example.com/jwks.json".into());
        assert_refused(
            s,
            "jwks_url",
            "\"ftp://auth.example.com/jwks.json\" must start with",
        );

        let mut s = settings(&["RS256"]);
        s.jwks_url = Some("http://[::1]:4000/.well-known/jwks.json?x=1".into());
        let summary = VerifierConfig::new(s).unwrap().summary();
        assert!(
            summary.contains("jwks_url http://[::1]:4000/.well-known/jwks.json?x=1 every 600s"),
            "{summary}"
        );

        let mut s = settings(&["RS256"]);
        s.jwks_url = Some("http://idp.internal".into());
        s.jwks_refresh = Duration::from_millis(10);
        assert_eq!(config_error(s).key, "jwks_refresh");
    }

    #[test]
    fn config_leeway_is_bounded() {
        let mut s = hs_settings();
        s.leeway = Duration::from_secs(100 * 365 * 86400);
        assert_eq!(config_error(s).key, "leeway");
    }

    #[test]
    fn settings_debug_and_summary_hold_no_secret() {
        let text = format!("{:?}", hs_settings());
        assert!(!text.contains("0123456789abcdef"), "{text}");
        assert!(text.contains("[redacted]"));
        let summary = VerifierConfig::new(hs_settings()).unwrap().summary();
        assert!(!summary.contains("0123456789abcdef"), "{summary}");
        assert!(summary.contains("HS256"), "{summary}");
    }
}
