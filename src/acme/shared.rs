//! ACME state shared through `[redis]` by every instance behind one load
//! balancer, as Caddy does with shared storage: the account, the
//! certificate with its key, the pending http-01 answers, and a renewal
//! lock, so that N instances place one order between them and any of them
//! can answer the CA's validation request.
//!
//! Keys, under `KEY_PREFIX:acme:` (values are never logged: the key is a
//! secret, and so, until it is used, is a key authorization):
//! - `account:DIR` — the account for directory hash `DIR` (JSON);
//! - `cert:ID` — `{"chain": PEM, "key": PEM}` for the directory and domain
//!   set hashed as `ID`;
//! - `lock:ID` — held by the instance ordering `ID`, with an expiry, so a
//!   crashed holder frees it by itself;
//! - `http01:TOKEN` — the key authorization, expiring with the order.
//!
//! Each runtime that talks to Redis (the ACME task's, the HTTP listener's)
//! keeps its own connection: a multiplexed connection's driver lives on the
//! runtime that opened it.

use std::sync::Mutex;
use std::time::Duration;

use anyhow::Context as _;
use redis::aio::MultiplexedConnection;
use serde::{Deserialize, Serialize};

use crate::config::{Acme, Redis};

/// Every Redis operation of ACME's; none is on a request's path but the
/// http-01 lookup, which the CA waits seconds for.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(2);
/// Longer than an order can take (account, order, two polls of two minutes).
const LOCK_TTL: Duration = Duration::from_secs(600);
/// A published answer outlives any order that waits on it.
const HTTP01_TTL: Duration = Duration::from_secs(900);

const RELEASE_SCRIPT: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

#[derive(Serialize, Deserialize)]
pub struct SharedCert {
    pub chain: String,
    pub key: String,
}

/// Which runtime a connection belongs to.
#[derive(Clone, Copy)]
pub enum Side {
    /// The ACME task's thread.
    Task,
    /// The HTTP listener (the control thread).
    Listener,
}

pub struct SharedStore {
    client: redis::Client,
    prefix: String,
    account_key: String,
    cert_key: String,
    lock_key: String,
    task: Mutex<Option<MultiplexedConnection>>,
    listener: Mutex<Option<MultiplexedConnection>>,
    release: redis::Script,
}

/// A held renewal lock; [`SharedStore::unlock`] gives it back.
pub struct Lock {
    token: String,
}

impl SharedStore {
    /// Contacts nobody: connections are opened on first use.
    pub fn new(redis: &Redis, acme: &Acme) -> anyhow::Result<Self> {
        let client = redis::Client::open(redis.url.as_str())
            .with_context(|| format!("redis.url: cannot be used ({})", redis.display_url()))?;
        let prefix = format!("{}:acme:", redis.key_prefix);
        let mut domains = acme.domains.clone();
        domains.sort();
        let id = short_hash(&format!("{}\n{}", acme.directory, domains.join(",")));
        Ok(SharedStore {
            client,
            account_key: format!("{prefix}account:{}", short_hash(&acme.directory)),
            cert_key: format!("{prefix}cert:{id}"),
            lock_key: format!("{prefix}lock:{id}"),
            prefix,
            task: Mutex::default(),
            listener: Mutex::default(),
            release: redis::Script::new(RELEASE_SCRIPT),
        })
    }

    async fn connection(&self, side: Side) -> anyhow::Result<MultiplexedConnection> {
        let slot = match side {
            Side::Task => &self.task,
            Side::Listener => &self.listener,
        };
        if let Some(connection) = lock(slot).clone() {
            return Ok(connection);
        }
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(OPERATION_TIMEOUT))
            .set_response_timeout(Some(OPERATION_TIMEOUT));
        let connection = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .context("cannot connect to Redis")?;
        *lock(slot) = Some(connection.clone());
        Ok(connection)
    }

    /// Runs `command`; a failure drops the connection, so the next
    /// operation opens a new one (Redis restarted, or vanished).
    async fn query<T: redis::FromRedisValue>(
        &self,
        side: Side,
        command: &redis::Cmd,
    ) -> anyhow::Result<T> {
        let mut connection = self.connection(side).await?;
        let result = tokio::time::timeout(OPERATION_TIMEOUT, command.query_async(&mut connection))
            .await
            .map_err(|_| anyhow::anyhow!("Redis did not answer within {OPERATION_TIMEOUT:?}"))
            .and_then(|r| r.context("Redis refused"));
        if result.is_err() {
            let slot = match side {
                Side::Task => &self.task,
                Side::Listener => &self.listener,
            };
            *lock(slot) = None;
        }
        result
    }

    pub async fn account(&self) -> anyhow::Result<Option<String>> {
        self.query(Side::Task, redis::cmd("GET").arg(&self.account_key))
            .await
    }

    pub async fn put_account(&self, json: &str) -> anyhow::Result<()> {
        self.query(
            Side::Task,
            redis::cmd("SET").arg(&self.account_key).arg(json),
        )
        .await
    }

    pub async fn cert(&self) -> anyhow::Result<Option<SharedCert>> {
        let text: Option<String> = self
            .query(Side::Task, redis::cmd("GET").arg(&self.cert_key))
            .await?;
        Ok(text.and_then(|t| serde_json::from_str(&t).ok()))
    }

    pub async fn put_cert(&self, cert: &SharedCert) -> anyhow::Result<()> {
        let json = serde_json::to_string(cert)?;
        self.query(Side::Task, redis::cmd("SET").arg(&self.cert_key).arg(json))
            .await
    }

    /// The renewal lock, or `None` while another instance holds it.
    pub async fn try_lock(&self) -> anyhow::Result<Option<Lock>> {
        let token = format!(
            "{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos()
        );
        let set: Option<String> = self
            .query(
                Side::Task,
                redis::cmd("SET")
                    .arg(&self.lock_key)
                    .arg(&token)
                    .arg("NX")
                    .arg("PX")
                    .arg(u64::try_from(LOCK_TTL.as_millis()).unwrap_or(u64::MAX)),
            )
            .await?;
        Ok(set.map(|_| Lock { token }))
    }

    /// Gives the lock back if it is still ours (it may have expired and
    /// been taken by another instance meanwhile).
    pub async fn unlock(&self, lock: Lock) -> anyhow::Result<()> {
        let mut connection = self.connection(Side::Task).await?;
        let mut invocation = self.release.key(&self.lock_key);
        invocation.arg(&lock.token);
        tokio::time::timeout(
            OPERATION_TIMEOUT,
            invocation.invoke_async::<i64>(&mut connection),
        )
        .await
        .map_err(|_| anyhow::anyhow!("Redis did not answer within {OPERATION_TIMEOUT:?}"))??;
        Ok(())
    }

    pub async fn publish_http(&self, token: &str, key_authorization: &str) -> anyhow::Result<()> {
        self.query(
            Side::Task,
            redis::cmd("SET")
                .arg(format!("{}http01:{token}", self.prefix))
                .arg(key_authorization)
                .arg("EX")
                .arg(HTTP01_TTL.as_secs()),
        )
        .await
    }

    pub async fn withdraw_http(&self, token: &str) -> anyhow::Result<()> {
        self.query::<i64>(
            Side::Task,
            redis::cmd("DEL").arg(format!("{}http01:{token}", self.prefix)),
        )
        .await
        .map(|_| ())
    }

    /// Another instance's http-01 answer, for the CA's request that the
    /// load balancer sent here.
    pub async fn http_answer(&self, token: &str) -> anyhow::Result<Option<String>> {
        self.query(
            Side::Listener,
            redis::cmd("GET").arg(format!("{}http01:{token}", self.prefix)),
        )
        .await
    }
}

/// The first 16 hex digits of SHA-256: short keys, no name in clear.
fn short_hash(text: &str) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, text.as_bytes());
    digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
