//! Automatic certificates over ACME (RFC 8555), as `[acme]` asks: the
//! account and certificate kept in `cache_dir`, an order placed when there
//! is no usable certificate or renewal is due, the challenge answered on
//! the HTTP listener (http-01) or in the TLS handshake (tls-alpn-01), and
//! the new certificate swapped in for new connections while those already
//! open finish on the old one.
//!
//! [`AcmeManager`] is the live object: built once in `runtime.rs` (and
//! kept across reloads while `[acme]` is unchanged), it owns the task that
//! talks to the CA, on a thread of its own ([`crate::background`]), and
//! the [`AcmeCerts`] the TLS resolver and the HTTP listener read.

pub mod certs;
mod client;
pub mod http01;
mod order;
pub mod schedule;
mod shared;
mod store;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use instant_acme::{Account, CertificateIdentifier};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

pub use certs::{ACME_TLS_ALPN, AcmeCerts};

use crate::background::Background;
use crate::cert_info::CertInfo;
use crate::config::{Acme, Redis};
use crate::telemetry::{Metrics, ResultLabels};
use client::DirectoryClient;
use order::Obtained;
use shared::{SharedCert, SharedStore};
use store::CacheDir;

/// The longest the task sleeps before looking again: renewal starts within
/// about a minute of being due, whatever the clock did meanwhile.
const RECHECK: Duration = Duration::from_secs(60);
/// How often the CA's renewal information is asked for one certificate.
const ARI_RECHECK: Duration = Duration::from_secs(6 * 3600);
/// Failed attempts at the renewal lock before ordering without it.
const LOCK_ATTEMPTS: u32 = 3;
/// While another instance holds the renewal lock, how often to look for
/// the certificate it is getting.
const LOCK_POLL: Duration = Duration::from_secs(2);

pub struct AcmeManager {
    pub certs: Arc<AcmeCerts>,
    settings: Acme,
    redis: Option<Redis>,
    _task: Background,
}

impl AcmeManager {
    /// Makes `cache_dir`, serves the cached certificate if it is usable
    /// (else a temporary self-signed one), and starts the task.
    /// With `redis`, the state is shared with every instance using it.
    pub fn start(
        settings: &Acme,
        redis: Option<&Redis>,
        metrics: &Metrics,
    ) -> anyhow::Result<Arc<AcmeManager>> {
        let shared = redis
            .map(|redis| SharedStore::new(redis, settings).map(Arc::new))
            .transpose()?;
        let cache = CacheDir::new(&settings.cache_dir);
        cache.create().with_context(|| {
            format!(
                "acme.cache_dir: cannot create {}",
                settings.cache_dir.display()
            )
        })?;
        let temporary = order::temporary_cert(&settings.domains)
            .context("acme: cannot make the temporary certificate")?;
        let certs = Arc::new(AcmeCerts::new(settings.domains.clone(), temporary, shared));
        match order::cached(settings, &cache) {
            Some((key, info)) => {
                tracing::info!(
                    domains = %settings.domains.join(","),
                    serial = %info.serial_hex(),
                    not_after = %info.not_after_text(),
                    "acme: using the cached certificate"
                );
                certs.install(key, info);
            }
            None => tracing::info!(
                domains = %settings.domains.join(","),
                "acme: no usable certificate in {} yet: serving a temporary self-signed one until the CA issues one",
                settings.cache_dir.display()
            ),
        }
        let client = DirectoryClient::new(&settings.directory_ca)
            .context("acme: cannot set up the connection to the directory")?;
        let task = Renewal {
            settings: settings.clone(),
            certs: certs.clone(),
            cache,
            client,
            renewals: metrics.acme_renewals.clone(),
        };
        let background = Background::start("acme", move || task.run())
            .context("acme: cannot start the renewal task")?;
        Ok(Arc::new(AcmeManager {
            certs,
            settings: settings.clone(),
            redis: redis.cloned(),
            _task: background,
        }))
    }

    pub fn settings(&self) -> &Acme {
        &self.settings
    }

    /// Whether this manager was started for these settings (a reload keeps
    /// it then).
    pub fn started_for(&self, settings: &Acme, redis: Option<&Redis>) -> bool {
        self.settings == *settings && self.redis.as_ref() == redis
    }
}

/// The cached certificate's details, read without creating anything (for
/// `check`).
pub fn cached_info(settings: &Acme) -> Option<CertInfo> {
    order::cached(settings, &CacheDir::new(&settings.cache_dir)).map(|(_, info)| info)
}

/// The task: sleeps until renewal is due, orders, installs, and retries
/// with back-off when the CA fails.
struct Renewal {
    settings: Acme,
    certs: Arc<AcmeCerts>,
    cache: CacheDir,
    client: DirectoryClient,
    renewals: Family<ResultLabels, Counter>,
}

impl Renewal {
    async fn run(self) {
        let mut account: Option<Account> = None;
        let mut failures = 0u32;
        let mut obtained_at: Option<SystemTime> = None;
        let mut ari: Option<AskedAri> = None;
        let mut shared_checked: Option<Instant> = None;
        loop {
            let served = self.certs.current();
            let due = match &served.info {
                None => SystemTime::UNIX_EPOCH,
                Some(info) => {
                    let window = ari
                        .as_ref()
                        .filter(|(serial, _, _)| *serial == info.serial)
                        .and_then(|(_, _, window)| *window);
                    schedule::renew_at(info, self.settings.renew_before, obtained_at, window)
                }
            };
            // Another instance may have renewed first: take its certificate.
            let look_at_shared = served.info.is_none()
                || due <= SystemTime::now()
                || shared_checked.is_none_or(|at| at.elapsed() >= RECHECK);
            if look_at_shared && self.certs.shared().is_some() {
                shared_checked = Some(Instant::now());
                if self.adopt_shared().await {
                    obtained_at = Some(SystemTime::now());
                    continue;
                }
            }
            let now = SystemTime::now();
            if let Ok(wait) = due.duration_since(now)
                && !wait.is_zero()
            {
                if let Some(info) = &served.info {
                    let stale = ari.as_ref().is_none_or(|(serial, asked, _)| {
                        *serial != info.serial || asked.elapsed() >= ARI_RECHECK
                    });
                    if stale {
                        // A process that started with a cached certificate
                        // has no account loaded yet; ARI (a revocation, a
                        // CA incident) matters most for exactly that one.
                        if account.is_none() {
                            account = self.load_account().await;
                        }
                        let window = match &account {
                            Some(account) => renewal_window(account, info).await,
                            None => None,
                        };
                        if let Some((start, end)) = window
                            && schedule::renew_at(info, self.settings.renew_before, None, window)
                                < schedule::renew_at(info, self.settings.renew_before, None, None)
                        {
                            tracing::info!(
                                serial = %info.serial_hex(),
                                window_start = %humantime::format_rfc3339_seconds(start),
                                window_end = %humantime::format_rfc3339_seconds(end),
                                "acme: the CA suggests renewing early (ARI)"
                            );
                        }
                        ari = Some((info.serial.clone(), Instant::now(), window));
                        continue;
                    }
                }
                tokio::time::sleep(wait.min(RECHECK)).await;
                continue;
            }
            let lock = match self.certs.shared() {
                None => None,
                Some(shared) => match shared.try_lock().await {
                    Ok(Some(lock)) => Some(lock),
                    Ok(None) => {
                        // Another instance is ordering; its certificate
                        // will be in the shared store.
                        tokio::time::sleep(LOCK_POLL).await;
                        continue;
                    }
                    Err(error) if failures < LOCK_ATTEMPTS => {
                        back_off(
                            &mut failures,
                            &error,
                            "cannot take the renewal lock in Redis",
                        )
                        .await;
                        continue;
                    }
                    Err(error) => {
                        // A certificate without the lock beats none: at
                        // worst each instance orders its own.
                        tracing::warn!(
                            error = %format!("{error:#}"),
                            "acme: Redis is still unreachable; ordering without the shared lock"
                        );
                        None
                    }
                },
            };
            // The holder before us may have just finished.
            if lock.is_some() && self.adopt_shared().await {
                obtained_at = Some(SystemTime::now());
                self.unlock(lock).await;
                continue;
            }
            let result = self.order(&mut account).await;
            if let (Ok(obtained), Some(shared)) = (&result, self.certs.shared()) {
                let put = shared
                    .put_cert(&SharedCert {
                        chain: obtained.chain_pem.clone(),
                        key: obtained.key_pem.clone(),
                    })
                    .await;
                if let Err(error) = put {
                    tracing::warn!(error = %format!("{error:#}"), "acme: cannot share the new certificate through Redis");
                }
            }
            self.unlock(lock).await;
            match result {
                Ok(obtained) => {
                    failures = 0;
                    obtained_at = Some(SystemTime::now());
                    self.renewals
                        .get_or_create(&ResultLabels { result: "success" })
                        .inc();
                    let info = &obtained.info;
                    tracing::info!(
                        domains = %self.settings.domains.join(","),
                        serial = %info.serial_hex(),
                        not_after = %info.not_after_text(),
                        "acme: certificate obtained"
                    );
                    if self.settings.renew_before >= info.lifetime() {
                        tracing::warn!(
                            "acme: renew_before ({:?}) is not shorter than the certificate's life ({:?}): it is renewed every {:?}",
                            self.settings.renew_before,
                            info.lifetime(),
                            schedule::min_interval(info.lifetime())
                        );
                    }
                    self.certs.install(obtained.key, obtained.info);
                }
                Err(error) => {
                    account = None;
                    self.renewals
                        .get_or_create(&ResultLabels { result: "failure" })
                        .inc();
                    back_off(&mut failures, &error, "order failed").await;
                }
            }
        }
    }

    /// Installs the shared certificate if it is newer than the one served;
    /// true if it did.
    async fn adopt_shared(&self) -> bool {
        let Some(shared) = self.certs.shared() else {
            return false;
        };
        let found = match shared.cert().await {
            Ok(found) => found,
            Err(error) => {
                tracing::debug!(error = %format!("{error:#}"), "acme: cannot read the shared certificate");
                return false;
            }
        };
        let served = self.certs.current();
        let Some(obtained) = found.and_then(|f| order::adopt(&self.settings, &self.cache, &f))
        else {
            return false;
        };
        let newer = served.info.as_ref().is_none_or(|info| {
            info.serial != obtained.info.serial && obtained.info.not_after > info.not_after
        });
        if !newer {
            return false;
        }
        tracing::info!(
            domains = %self.settings.domains.join(","),
            serial = %obtained.info.serial_hex(),
            not_after = %obtained.info.not_after_text(),
            "acme: using the certificate another instance obtained"
        );
        self.certs.install(obtained.key, obtained.info);
        true
    }

    async fn unlock(&self, lock: Option<shared::Lock>) {
        if let (Some(lock), Some(shared)) = (lock, self.certs.shared())
            && let Err(error) = shared.unlock(lock).await
        {
            tracing::warn!(error = %format!("{error:#}"), "acme: cannot release the renewal lock (it expires by itself)");
        }
    }

    /// The account, for asking the CA's renewal information; `None` (and
    /// asked again after [`ARI_RECHECK`]) while the CA cannot be reached.
    async fn load_account(&self) -> Option<Account> {
        match self.account().await {
            Ok(account) => Some(account),
            Err(error) => {
                tracing::debug!(error = %format!("{error:#}"), "acme: no account for renewal information");
                None
            }
        }
    }

    async fn account(&self) -> anyhow::Result<Account> {
        let (account, created) = order::account(
            &self.settings,
            &self.cache,
            &self.client,
            self.certs.shared(),
        )
        .await?;
        if created {
            tracing::info!(directory = %self.settings.directory, "acme: account created");
        }
        Ok(account)
    }

    async fn order(&self, account: &mut Option<Account>) -> anyhow::Result<Obtained> {
        if account.is_none() {
            *account = Some(self.account().await?);
        }
        let Some(account) = account.as_ref() else {
            anyhow::bail!("no ACME account");
        };
        order::obtain(&self.settings, account, &self.certs, &self.cache).await
    }
}

/// Counts one more failure in a row, says so, and waits before the next
/// try (1 s, doubling, at most a minute).
async fn back_off(failures: &mut u32, error: &anyhow::Error, what: &str) {
    *failures = failures.saturating_add(1);
    let retry = schedule::retry_after(*failures);
    tracing::warn!(
        error = %format!("{error:#}"),
        retry_in_secs = retry.as_secs(),
        "acme: {what}; retrying"
    );
    tokio::time::sleep(retry).await;
}

/// The CA's suggested window for the served certificate: its serial, when
/// it was asked, and the window if the CA offers one.
type AskedAri = (Vec<u8>, Instant, Option<(SystemTime, SystemTime)>);

/// The CA's suggested renewal window (ARI), when it offers one.
async fn renewal_window(account: &Account, info: &CertInfo) -> Option<(SystemTime, SystemTime)> {
    let aki = info.authority_key_id.as_deref()?;
    let id = CertificateIdentifier::new(aki.into(), info.serial.as_slice().into());
    match account.renewal_info(&id).await {
        Ok((renewal, _)) => {
            let at = |seconds: i64| {
                SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(seconds).unwrap_or(0))
            };
            Some((
                at(renewal.suggested_window.start.unix_timestamp()),
                at(renewal.suggested_window.end.unix_timestamp()),
            ))
        }
        Err(instant_acme::Error::Unsupported(_)) => None,
        Err(error) => {
            tracing::debug!(error = %error, "acme: no renewal information from the CA");
            None
        }
    }
}
