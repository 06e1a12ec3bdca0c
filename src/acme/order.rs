//! One trip to the CA: the account (from the cache, else created and
//! cached), an order for every domain, each authorization's challenge
//! published where the CA's validator will look, then the certificate.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, ExternalAccountKey,
    Identifier, NewAccount, NewOrder, OrderStatus, RetryPolicy,
};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::certs::AcmeCerts;
use super::client::DirectoryClient;
use super::shared::{SharedCert, SharedStore};
use super::store::{ACCOUNT_FILE, CERT_FILE, CacheDir, KEY_FILE, StoredAccount};
use crate::cert_info::CertInfo;
use crate::config::{Acme, AcmeChallenge};

/// How long the CA may take to validate and to issue.
const ORDER_PATIENCE: Duration = Duration::from_secs(120);

/// The account for `settings.directory`: the shared one (with `[redis]`),
/// else the cached one, else a new one, stored before it is used. `created`
/// says whether it is new.
pub async fn account(
    settings: &Acme,
    cache: &CacheDir,
    client: &DirectoryClient,
    shared: Option<&SharedStore>,
) -> anyhow::Result<(Account, bool)> {
    let from_shared = match shared {
        Some(shared) => shared
            .account()
            .await
            .context("cannot read the shared account from Redis")?,
        None => None,
    };
    let local = cache
        .read(ACCOUNT_FILE)
        .context("cannot read the cached account")?
        .and_then(|bytes| String::from_utf8(bytes).ok());
    let stored = from_shared
        .iter()
        .chain(local.iter())
        .filter_map(|text| serde_json::from_str::<StoredAccount>(text).ok())
        .find(|stored| stored.directory == settings.directory);
    if let Some(stored) = stored {
        let credentials: AccountCredentials = serde_json::from_value(stored.credentials.clone())
            .context("the stored account cannot be read back")?;
        let account = Account::builder_with_http(Box::new(client.clone()))
            .from_credentials(credentials)
            .await
            .context("cannot reach the ACME directory")?;
        let text = serde_json::to_string_pretty(&stored)?;
        if let Some(shared) = shared
            && from_shared.is_none()
        {
            // This instance's cached account becomes everyone's.
            shared.put_account(&text).await?;
        }
        if local.as_deref() != Some(text.as_str()) {
            cache.write(ACCOUNT_FILE, text.as_bytes())?;
        }
        return Ok((account, false));
    }
    let contact = settings
        .email
        .as_ref()
        .map(|email| format!("mailto:{email}"));
    let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
    let external = settings
        .eab
        .as_ref()
        .map(|eab| ExternalAccountKey::new(eab.kid.clone(), &eab.hmac_key));
    let (account, credentials) = Account::builder_with_http(Box::new(client.clone()))
        .create(
            &NewAccount {
                contact: &contacts,
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            settings.directory.clone(),
            external.as_ref(),
        )
        .await
        .context("cannot create the ACME account")?;
    let stored = StoredAccount {
        directory: settings.directory.clone(),
        credentials: serde_json::to_value(&credentials)?,
    };
    let text = serde_json::to_string_pretty(&stored)?;
    cache
        .write(ACCOUNT_FILE, text.as_bytes())
        .context("cannot cache the ACME account")?;
    if let Some(shared) = shared {
        shared.put_account(&text).await?;
    }
    Ok((account, true))
}

/// Orders a certificate for every domain and caches it with its key.
pub async fn obtain(
    settings: &Acme,
    account: &Account,
    certs: &AcmeCerts,
    cache: &CacheDir,
) -> anyhow::Result<Obtained> {
    let identifiers: Vec<Identifier> = settings
        .domains
        .iter()
        .map(|d| Identifier::Dns(d.clone()))
        .collect();
    let mut order = account
        .new_order(&NewOrder::new(&identifiers))
        .await
        .context("the CA refused the order")?;
    let mut published = Published {
        certs,
        http_tokens: Vec::new(),
        alpn_domains: Vec::new(),
    };
    let kind = match settings.challenge {
        AcmeChallenge::Http01 => ChallengeType::Http01,
        AcmeChallenge::TlsAlpn01 => ChallengeType::TlsAlpn01,
    };
    let mut authorizations = order.authorizations();
    while let Some(authorization) = authorizations.next().await {
        let mut authorization = authorization.context("cannot read an authorization")?;
        match authorization.status {
            AuthorizationStatus::Pending => {}
            AuthorizationStatus::Valid => continue,
            other => bail!("an authorization is {other:?}"),
        }
        let mut challenge = authorization
            .challenge(kind.clone())
            .ok_or_else(|| anyhow!("the CA offers no {} challenge", settings.challenge.as_str()))?;
        let key_authorization = challenge.key_authorization();
        match settings.challenge {
            AcmeChallenge::Http01 => {
                certs.publish_http(&challenge.token, key_authorization.as_str());
                published.http_tokens.push(challenge.token.clone());
                if let Some(shared) = certs.shared()
                    && let Err(error) = shared
                        .publish_http(&challenge.token, key_authorization.as_str())
                        .await
                {
                    // This instance still answers; others cannot.
                    tracing::warn!(error = %format!("{error:#}"), "acme: cannot publish the http-01 answer in Redis");
                }
            }
            AcmeChallenge::TlsAlpn01 => {
                let domain = challenge.identifier().to_string();
                let cert = alpn_challenge_cert(&domain, key_authorization.digest().as_ref())?;
                certs.publish_alpn(&domain, cert);
                published.alpn_domains.push(domain);
            }
        }
        challenge
            .set_ready()
            .await
            .context("cannot tell the CA the challenge is ready")?;
    }
    let patience = RetryPolicy::new().timeout(ORDER_PATIENCE);
    let status = order
        .poll_ready(&patience)
        .await
        .context("the order did not become ready")?;
    if let Some(shared) = certs.shared() {
        for token in &published.http_tokens {
            // Best effort: the answers expire by themselves.
            let _ = shared.withdraw_http(token).await;
        }
    }
    drop(published);
    if status != OrderStatus::Ready {
        let state = order.state();
        let why = state
            .authorizations
            .iter()
            .filter_map(|a| a.state.as_ref())
            .flat_map(|a| a.challenges.iter())
            .filter_map(|c| c.error.as_ref())
            .map(|e| e.to_string())
            .next()
            .unwrap_or_default();
        bail!("the order is {status:?}: {why}");
    }
    let key_pem = order
        .finalize()
        .await
        .context("cannot finalize the order")?;
    let chain_pem = order
        .poll_certificate(&patience)
        .await
        .context("the certificate was not issued")?;
    let (key, info) = certified_key(chain_pem.as_bytes(), key_pem.as_bytes())
        .context("the CA's certificate cannot be used")?;
    if !info.covers(&settings.domains) {
        bail!(
            "the CA's certificate names {:?}, not every domain asked for",
            info.names
        );
    }
    // The key first: a crash between the two leaves a certificate that does
    // not match its key, which `cached` refuses, and not the reverse.
    cache.write(KEY_FILE, key_pem.as_bytes())?;
    cache.write(CERT_FILE, chain_pem.as_bytes())?;
    Ok(Obtained {
        key,
        info,
        chain_pem,
        key_pem,
    })
}

/// A certificate ready to serve, with the PEM it was read from.
pub struct Obtained {
    pub key: Arc<CertifiedKey>,
    pub info: CertInfo,
    pub chain_pem: String,
    pub key_pem: String,
}

/// A certificate another instance put in the shared store, if it covers
/// every domain and has not expired; cached here too.
pub fn adopt(settings: &Acme, cache: &CacheDir, shared: &SharedCert) -> Option<Obtained> {
    let (key, info) = certified_key(shared.chain.as_bytes(), shared.key.as_bytes()).ok()?;
    let fresh = info.not_after > std::time::SystemTime::now();
    if !(fresh && info.covers(&settings.domains)) {
        return None;
    }
    // A cache that cannot be written costs a restart's head start, no more.
    let _ = cache.write(KEY_FILE, shared.key.as_bytes());
    let _ = cache.write(CERT_FILE, shared.chain.as_bytes());
    Some(Obtained {
        key,
        info,
        chain_pem: shared.chain.clone(),
        key_pem: shared.key.clone(),
    })
}

/// The cached certificate, if it covers every domain and has not expired.
pub fn cached(settings: &Acme, cache: &CacheDir) -> Option<(Arc<CertifiedKey>, CertInfo)> {
    let chain = cache.read(CERT_FILE).ok()??;
    let key = cache.read(KEY_FILE).ok()??;
    let (certified, info) = certified_key(&chain, &key).ok()?;
    let fresh = info.not_after > std::time::SystemTime::now();
    (fresh && info.covers(&settings.domains)).then_some((certified, info))
}

/// A PEM chain and its key, checked to match, with what the leaf says.
pub fn certified_key(
    chain_pem: &[u8],
    key_pem: &[u8],
) -> anyhow::Result<(Arc<CertifiedKey>, CertInfo)> {
    let chain = CertificateDer::pem_slice_iter(chain_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow!("not a PEM certificate chain: {e}"))?;
    let leaf = chain
        .first()
        .ok_or_else(|| anyhow!("no certificate in the chain"))?;
    let info = CertInfo::read(leaf).ok_or_else(|| anyhow!("the certificate is not X.509"))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| anyhow!("not a PEM key: {e}"))?;
    let signing_key = rustls::crypto::aws_lc_rs::default_provider()
        .key_provider
        .load_private_key(key)?;
    let certified = CertifiedKey::new(chain, signing_key);
    certified
        .keys_match()
        .map_err(|_| anyhow!("the key does not match the certificate"))?;
    Ok((Arc::new(certified), info))
}

/// The self-signed certificate served for the ACME domains until the first
/// real one arrives: a client sees a certificate error, not a refused
/// connection, and plain-HTTP redirects and challenges keep working.
pub fn temporary_cert(domains: &[String]) -> anyhow::Result<Arc<CertifiedKey>> {
    let mut params = rcgen::CertificateParams::new(domains.to_vec())?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        "portcullis temporary certificate (ACME pending)",
    );
    let key = rcgen::KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    signed(cert.der().clone(), &key)
}

/// The tls-alpn-01 answer (RFC 8737 §3): a self-signed certificate for the
/// domain carrying the SHA-256 of the key authorization in a critical
/// acmeIdentifier extension.
fn alpn_challenge_cert(domain: &str, digest: &[u8]) -> anyhow::Result<Arc<CertifiedKey>> {
    let mut params = rcgen::CertificateParams::new(vec![domain.to_owned()])?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let key = rcgen::KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    signed(cert.der().clone(), &key)
}

fn signed(
    cert: CertificateDer<'static>,
    key: &rcgen::KeyPair,
) -> anyhow::Result<Arc<CertifiedKey>> {
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signing_key = rustls::crypto::aws_lc_rs::default_provider()
        .key_provider
        .load_private_key(key_der)?;
    Ok(Arc::new(CertifiedKey::new(vec![cert], signing_key)))
}

/// The challenges this order published, withdrawn when it is done with
/// them, whether it succeeded, failed or was dropped.
struct Published<'a> {
    certs: &'a AcmeCerts,
    http_tokens: Vec<String>,
    alpn_domains: Vec<String>,
}

impl Drop for Published<'_> {
    fn drop(&mut self) {
        for token in &self.http_tokens {
            self.certs.withdraw_http(token);
        }
        for domain in &self.alpn_domains {
            self.certs.withdraw_alpn(domain);
        }
    }
}
