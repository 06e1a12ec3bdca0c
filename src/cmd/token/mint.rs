//! Minting: a signed token the configured `[jwt]` verifier accepts, for
//! `portcullis token` and the demo's hints. Only the command line signs;
//! the proxy itself never does.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk};
use jsonwebtoken::{Algorithm, AlgorithmFamily, EncodingKey, Header};
use serde_json::{Map, Value};

use crate::policy::jwt::{
    JwtConfigError, JwtSettings, RawJwks, alg_name, config_err, min_hmac_secret, parse_algorithms,
    pem_label,
};

/// What `portcullis token` asks for.
#[derive(Debug, Clone)]
pub struct MintRequest {
    pub subject: String,
    /// Space-separated, put in the `scope` claim.
    pub scope: Option<String>,
    pub ttl: Duration,
    /// Added last, so they can override anything (e.g. `exp`, to test an
    /// expired token).
    pub extra_claims: Vec<(String, Value)>,
    /// Default: the settings' `issuer`.
    pub issuer: Option<String>,
    /// Default: the settings' `audience`.
    pub audience: Option<String>,
}

/// Mints a token the configured verifier accepts: with no private key, an
/// HS* token from `settings.secret`, using the first listed HS* algorithm;
/// with `private_key_pem` (PKCS#8, or PKCS#1 for RSA), the first listed
/// asymmetric algorithm that key can sign. With a private key, the header's
/// `kid` is that of the matching key in the `jwks` file, if there is one.
pub fn mint(
    settings: &JwtSettings,
    private_key_pem: Option<&[u8]>,
    req: &MintRequest,
) -> Result<String, JwtConfigError> {
    mint_with_kid(settings, private_key_pem, req, None)
}

/// [`mint`] with an explicit header `kid` (e.g. for a `jwks_url` key set,
/// which `mint` cannot look into).
pub fn mint_with_kid(
    settings: &JwtSettings,
    private_key_pem: Option<&[u8]>,
    req: &MintRequest,
    kid: Option<&str>,
) -> Result<String, JwtConfigError> {
    let order = parse_algorithms(&settings.algorithms)?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let mut claims = Map::new();
    claims.insert("sub".into(), Value::from(req.subject.as_str()));
    claims.insert("iat".into(), Value::from(now));
    claims.insert(
        "exp".into(),
        Value::from(now.saturating_add(req.ttl.as_secs())),
    );
    if let Some(scope) = &req.scope {
        claims.insert("scope".into(), Value::from(scope.as_str()));
    }
    if let Some(iss) = req.issuer.as_ref().or(settings.issuer.as_ref()) {
        claims.insert("iss".into(), Value::from(iss.as_str()));
    }
    if let Some(aud) = req.audience.as_ref().or(settings.audience.as_ref()) {
        claims.insert("aud".into(), Value::from(aud.as_str()));
    }
    for (k, v) in &req.extra_claims {
        claims.insert(k.clone(), v.clone());
    }

    let Some(pem) = private_key_pem else {
        let Some(&alg) = order.iter().find(|a| a.family() == AlgorithmFamily::Hmac) else {
            return Err(config_err(
                "key",
                "algorithms lists no HS* algorithm; give the private key (--key) for the listed ones",
            ));
        };
        let var = settings.secret_env.as_deref().unwrap_or("secret_env");
        let secret = match &settings.secret {
            Some(s) if !s.is_empty() => s,
            _ => {
                return Err(config_err(
                    "secret_env",
                    format!(
                        "environment variable {var} is not set; {} needs the shared secret",
                        alg_name(alg)
                    ),
                ));
            }
        };
        if secret.len() < min_hmac_secret(alg) {
            return Err(config_err(
                "secret_env",
                format!(
                    "the secret in {var} is {} bytes; {} needs at least {}",
                    secret.len(),
                    alg_name(alg),
                    min_hmac_secret(alg)
                ),
            ));
        }
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_string);
        return jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(secret))
            .map_err(|e| config_err("secret_env", format!("signing failed: {e}")));
    };

    if pem_label(pem).is_some_and(|l| !l.contains("PRIVATE")) {
        return Err(config_err(
            "key",
            "is not a private key (expected a PEM block labelled PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY)",
        ));
    }
    let mut tried = Vec::new();
    for &alg in order.iter().filter(|a| a.family() != AlgorithmFamily::Hmac) {
        let key = match alg.family() {
            AlgorithmFamily::Rsa => EncodingKey::from_rsa_pem(pem),
            AlgorithmFamily::Ec => EncodingKey::from_ec_pem(pem),
            _ => EncodingKey::from_ed_pem(pem),
        };
        let Ok(key) = key else {
            tried.push(alg_name(alg));
            continue;
        };
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_string).or_else(|| {
            settings
                .jwks
                .as_ref()
                .and_then(|jwks| kid_for_private_key(&jwks.contents, &key, alg))
        });
        // Signing is the real test of fit (an EC key on the wrong curve for
        // ES256 fails here), so a failure just moves on to the next alg.
        match jsonwebtoken::encode(&header, &claims, &key) {
            Ok(token) => return Ok(token),
            Err(_) => tried.push(alg_name(alg)),
        }
    }
    Err(config_err(
        "key",
        if tried.is_empty() {
            "algorithms lists no RS*, PS*, ES* or EdDSA algorithm for a private key".to_string()
        } else {
            format!(
                "the private key cannot sign any listed algorithm (tried {})",
                tried.join(", ")
            )
        },
    ))
}

/// The `kid` of the JWK in the `jwks` file whose public key matches `key`.
fn kid_for_private_key(jwks_json: &[u8], key: &EncodingKey, alg: Algorithm) -> Option<String> {
    let ours = Jwk::from_encoding_key(key, alg).ok()?.algorithm;
    let raw: RawJwks = serde_json::from_slice(jwks_json).ok()?;
    raw.keys.into_iter().find_map(|v| {
        let jwk: Jwk = serde_json::from_value(v).ok()?;
        same_public_key(&ours, &jwk.algorithm)
            .then_some(jwk.common.key_id)
            .flatten()
    })
}

/// Compares public key material by value (base64url spellings of integers
/// may differ in leading zeros).
fn same_public_key(a: &AlgorithmParameters, b: &AlgorithmParameters) -> bool {
    let int = |s: &str| -> Option<Vec<u8>> {
        let v = URL_SAFE_NO_PAD.decode(s).ok()?;
        Some(v.into_iter().skip_while(|b| *b == 0).collect())
    };
    let eq = |x: &str, y: &str| matches!((int(x), int(y)), (Some(p), Some(q)) if p == q);
    match (a, b) {
        (AlgorithmParameters::RSA(p), AlgorithmParameters::RSA(q)) => {
            eq(&p.n, &q.n) && eq(&p.e, &q.e)
        }
        (AlgorithmParameters::EllipticCurve(p), AlgorithmParameters::EllipticCurve(q)) => {
            p.curve == q.curve && eq(&p.x, &q.x) && eq(&p.y, &q.y)
        }
        (AlgorithmParameters::OctetKeyPair(p), AlgorithmParameters::OctetKeyPair(q)) => {
            p.curve == q.curve && eq(&p.x, &q.x)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::jwt::TokenError;
    use crate::policy::jwt::test_support::*;

    fn mint_req() -> MintRequest {
        MintRequest {
            subject: "alice".into(),
            scope: Some("orders:read admin".into()),
            ttl: Duration::from_secs(900),
            extra_claims: vec![("tenant".into(), Value::from("acme"))],
            issuer: None,
            audience: None,
        }
    }

    #[tokio::test]
    async fn mint_hs_roundtrip() {
        let mut s = hs_settings();
        s.issuer = Some("https://auth.example.com".into());
        s.audience = Some("orders-api".into());
        let token = mint(&s, None, &mint_req()).unwrap();
        let t = verifier(s).verify(&token).await.unwrap();
        assert_eq!(t.subject(), Some("alice"));
        assert_eq!(t.scopes(), ["orders:read", "admin"]);
        assert_eq!(t.claims["tenant"], "acme");
        assert_eq!(t.claims["iss"], "https://auth.example.com");
        let exp = t.claims["exp"].as_i64().unwrap();
        assert!((exp - now() - 900).abs() <= 2);
    }

    #[tokio::test]
    async fn mint_extra_claims_override() {
        let mut req = mint_req();
        req.extra_claims = vec![("exp".into(), Value::from(now() - 3600))];
        let token = mint(&hs_settings(), None, &req).unwrap();
        assert_eq!(
            verifier(hs_settings()).verify(&token).await,
            Err(TokenError::Expired)
        );
    }

    #[tokio::test]
    async fn mint_with_private_key_and_jwks_kid() {
        let mut s = settings(&["HS256", "ES256", "RS256"]);
        s.secret = Some(SECRET.to_vec());
        s.jwks = key_file("keys.json", jwks(&[ec_a().jwk("ec-a"), rsa().jwk("rsa-1")]));
        let token = mint(&s, Some(rsa().private_pem.as_bytes()), &mint_req()).unwrap();
        let header = jsonwebtoken::decode_header(&token).unwrap();
        assert_eq!(header.alg, Algorithm::RS256);
        assert_eq!(header.kid.as_deref(), Some("rsa-1"));
        assert!(verifier(s.clone()).verify(&token).await.is_ok());

        let token = mint(&s, Some(ec_a().private_pem.as_bytes()), &mint_req()).unwrap();
        let header = jsonwebtoken::decode_header(&token).unwrap();
        assert_eq!(
            (header.alg, header.kid.as_deref()),
            (Algorithm::ES256, Some("ec-a"))
        );
        assert!(verifier(s).verify(&token).await.is_ok());
    }

    #[tokio::test]
    async fn mint_eddsa_with_explicit_kid() {
        let mut s = settings(&["EdDSA"]);
        s.jwks = key_file("keys.json", jwks(&[ed().jwk("ed-1")]));
        let token = mint_with_kid(
            &s,
            Some(ed().private_pem.as_bytes()),
            &mint_req(),
            Some("ed-1"),
        )
        .unwrap();
        assert_eq!(
            jsonwebtoken::decode_header(&token).unwrap().kid.as_deref(),
            Some("ed-1")
        );
        assert!(verifier(s).verify(&token).await.is_ok());
    }

    #[test]
    fn mint_errors() {
        // Key that fits no listed algorithm (P-256 key, only ES384 listed).
        let mut s = settings(&["ES384"]);
        s.public_key = key_file("key.pem", ec384().public_pem.clone().into_bytes());
        let e = mint(&s, Some(ec_a().private_pem.as_bytes()), &mint_req()).unwrap_err();
        assert_eq!(e.key, "key");
        assert!(e.message.contains("ES384"), "{e}");
        // A public key given as --key.
        let e = mint(&s, Some(ec384().public_pem.as_bytes()), &mint_req()).unwrap_err();
        assert!(e.message.contains("not a private key"), "{e}");
        // Asymmetric only, no key.
        assert_eq!(mint(&s, None, &mint_req()).unwrap_err().key, "key");
        // HS without a secret.
        let e = mint(&settings(&["HS256"]), None, &mint_req()).unwrap_err();
        assert_eq!(e.key, "secret_env");
        assert!(e.message.contains("JWT_SECRET"), "{e}");
        // "none" is refused here too.
        assert_eq!(
            mint(&settings(&["none"]), None, &mint_req())
                .unwrap_err()
                .key,
            "algorithms"
        );
    }
}
