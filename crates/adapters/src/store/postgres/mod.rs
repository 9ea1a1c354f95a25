//! The PostgreSQL store, shared by replicas: table `command_poller_results` (result, expiry),
//! `command_poller_claims` (owner, expiry) and `command_poller_approvals` (sealed record,
//! expiry, whether open), created if missing. A claim is an upsert that
//! only takes over an expired or own row.
//!
//! Connections come from a pool (deadpool-postgres) that replaces a dropped connection on the
//! next use, so a restarted server or a killed backend fails the operations in flight, not every
//! operation until the poller restarts. `sslmode=require` in the URL speaks TLS (rustls),
//! verifying the server's certificate against the Mozilla roots or `idempotency.ca_file`; without
//! it (or with `prefer`, libpq's encrypt-without-verifying default) the connection is plain.

pub(crate) mod limits;

use crate::store::{Claim, IdempotencySettings, ResultStore, StoreError};
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use futures::future::BoxFuture;
use std::time::Duration;

pub struct PostgresStore {
    pub(crate) pool: Pool,
    pub(crate) prefix: String,
    /// Bridge slot rows known to exist (`crate::limits`).
    pub(crate) slot_rows: std::sync::atomic::AtomicUsize,
}

pub(crate) fn err(e: tokio_postgres::Error) -> StoreError {
    StoreError::Backend(format!("postgres: {e}"))
}

/// How long a connection (TCP, TLS and authentication) may take, and how long an operation
/// waits for a pooled connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The `application_name` the store's connections carry (`pg_stat_activity` shows it).
pub const APPLICATION_NAME: &str = "command-poller";

impl PostgresStore {
    pub async fn connect(s: &IdempotencySettings) -> Result<Self, StoreError> {
        let mut config: tokio_postgres::Config = s.url.parse().map_err(|e| {
            StoreError::Backend(format!("idempotency.url: not a PostgreSQL URL ({e})"))
        })?;
        // TLS only when the URL asks for it (`sslmode=require`), and then verified. libpq's
        // default, `prefer`, encrypts without checking who answers; here it means plain TCP, so
        // a server with a self-signed certificate (Debian's default) still works without TLS.
        if config.get_ssl_mode() == tokio_postgres::config::SslMode::Prefer {
            config.ssl_mode(tokio_postgres::config::SslMode::Disable);
        }
        if config.get_application_name().is_none() {
            config.application_name(APPLICATION_NAME);
        }
        config.connect_timeout(CONNECT_TIMEOUT);
        config.keepalives_idle(Duration::from_secs(30));
        let tls = tokio_postgres_rustls::MakeRustlsConnect::new(
            crate::tls::client_config(s.ca_file.as_deref())
                .map_err(|e| StoreError::Backend(format!("idempotency.ca_file: {e}")))?,
        );
        let manager = Manager::from_config(
            config,
            tls,
            ManagerConfig {
                // A closed connection (server restarted, backend terminated) is dropped when it
                // comes back to the pool, and the next operation gets a fresh one.
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(s.pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(CONNECT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| StoreError::Backend(format!("postgres pool: {e}")))?;
        let store = Self {
            pool,
            prefix: s.key_prefix.clone(),
            slot_rows: Default::default(),
        };
        store
            .client()
            .await?
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS command_poller_results (
                     key text PRIMARY KEY, result text NOT NULL, expires_at timestamptz NOT NULL);
                 CREATE TABLE IF NOT EXISTS command_poller_claims (
                     key text PRIMARY KEY, owner text NOT NULL, expires_at timestamptz NOT NULL);
                 CREATE TABLE IF NOT EXISTS command_poller_approvals (
                     key text PRIMARY KEY, record text NOT NULL, expires_at timestamptz NOT NULL,
                     open boolean NOT NULL);",
            )
            .await
            .map_err(err)?;
        store
            .client()
            .await?
            .batch_execute(limits::TABLES)
            .await
            .map_err(err)?;
        Ok(store)
    }

    /// A pooled connection (a new one when the pool has none idle or its last one closed).
    pub(crate) async fn client(&self) -> Result<Object, StoreError> {
        self.pool.get().await.map_err(|e| match e {
            deadpool_postgres::PoolError::Backend(e) => err(e),
            other => StoreError::Backend(format!("postgres: no connection: {other}")),
        })
    }

    fn key(&self, key: &str) -> String {
        format!("{}/{key}", self.prefix)
    }

    async fn done(&self, key: &str) -> Result<Option<String>, StoreError> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT result FROM command_poller_results WHERE key = $1 AND expires_at > now()",
                &[&key],
            )
            .await
            .map_err(err)?;
        Ok(row.map(|r| r.get(0)))
    }
}

impl PostgresStore {
    async fn live_record(&self, id: &str) -> Result<Option<String>, StoreError> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT record FROM command_poller_approvals WHERE key = $1 AND expires_at > now()",
                &[&id],
            )
            .await
            .map_err(err)?;
        Ok(row.map(|r| r.get(0)))
    }

    /// Takes or renews `owner`'s claim on `key` (already prefixed) unless another owner's is
    /// live.
    async fn take_or_renew(
        &self,
        key: &str,
        owner: &str,
        ttl: Duration,
    ) -> Result<Claim, StoreError> {
        let ms = ttl.as_millis() as f64;
        let taken = self
            .client()
            .await?
            .query_opt(
                "INSERT INTO command_poller_claims (key, owner, expires_at)
                 VALUES ($1, $2, now() + $3 * interval '1 millisecond')
                 ON CONFLICT (key) DO UPDATE SET owner = EXCLUDED.owner, expires_at = EXCLUDED.expires_at
                   WHERE command_poller_claims.expires_at < now() OR command_poller_claims.owner = EXCLUDED.owner
                 RETURNING owner",
                &[&key, &owner, &ms],
            )
            .await
            .map_err(err)?;
        if taken.is_some() {
            return Ok(Claim::Mine);
        }
        let holder = self
            .client()
            .await?
            .query_opt(
                "SELECT owner FROM command_poller_claims WHERE key = $1",
                &[&key],
            )
            .await
            .map_err(err)?
            .map(|r| r.get::<_, String>(0))
            .unwrap_or_default();
        Ok(Claim::Busy(holder))
    }
}

impl ResultStore for PostgresStore {
    fn result<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<String>, StoreError>> {
        Box::pin(async move { self.done(&self.key(key)).await })
    }

    fn park<'a>(
        &'a self,
        id: &'a str,
        record: &'a str,
        retention: Duration,
    ) -> BoxFuture<'a, Result<String, StoreError>> {
        Box::pin(async move {
            let id = self.key(id);
            let secs = retention.as_secs() as f64;
            // An expired row is replaced; a live one is kept and returned.
            self.client()
                .await?
                .execute(
                    "INSERT INTO command_poller_approvals (key, record, expires_at, open)
                     VALUES ($1, $2, now() + $3 * interval '1 second', true)
                     ON CONFLICT (key) DO UPDATE SET record = EXCLUDED.record,
                       expires_at = EXCLUDED.expires_at, open = true
                       WHERE command_poller_approvals.expires_at <= now()",
                    &[&id, &record, &secs],
                )
                .await
                .map_err(err)?;
            self.live_record(&id)
                .await?
                .ok_or_else(|| StoreError::Backend("postgres: the parked record vanished".into()))
        })
    }

    fn record<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<String>, StoreError>> {
        Box::pin(async move { self.live_record(&self.key(id)).await })
    }

    fn swap<'a>(
        &'a self,
        id: &'a str,
        expected: &'a str,
        new: &'a str,
        open: bool,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let n = self
                .client()
                .await?
                .execute(
                    "UPDATE command_poller_approvals SET record = $3, open = $4
                     WHERE key = $1 AND record = $2 AND expires_at > now()",
                    &[&self.key(id), &expected, &new, &open],
                )
                .await
                .map_err(err)?;
            Ok(n == 1)
        })
    }

    fn open_records(&self) -> BoxFuture<'_, Result<Vec<String>, StoreError>> {
        Box::pin(async move {
            let like = format!("{}/%", self.prefix.replace('%', "\\%").replace('_', "\\_"));
            let rows = self
                .client()
                .await?
                .query(
                    "SELECT record FROM command_poller_approvals
                     WHERE open AND expires_at > now() AND key LIKE $1",
                    &[&like],
                )
                .await
                .map_err(err)?;
            Ok(rows.into_iter().map(|r| r.get(0)).collect())
        })
    }

    fn claim<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Claim, StoreError>> {
        Box::pin(async move {
            let key = self.key(key);
            if let Some(r) = self.done(&key).await? {
                return Ok(Claim::Done(r));
            }
            if let Claim::Busy(holder) = self.take_or_renew(&key, owner, ttl).await? {
                return Ok(Claim::Busy(holder));
            }
            if let Some(r) = self.done(&key).await? {
                self.client()
                    .await?
                    .execute(
                        "DELETE FROM command_poller_claims WHERE key = $1 AND owner = $2",
                        &[&key, &owner],
                    )
                    .await
                    .map_err(err)?;
                return Ok(Claim::Done(r));
            }
            Ok(Claim::Mine)
        })
    }

    fn hold<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Claim, StoreError>> {
        Box::pin(async move {
            let key = self.key(key);
            self.take_or_renew(&key, owner, ttl).await
        })
    }

    fn complete<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
        result_json: &'a str,
        retention: Duration,
        _durability: crate::store::Durability,
        after: crate::store::ClaimAfter,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let keep_claim = after == crate::store::ClaimAfter::Kept;
        Box::pin(async move {
            let key = self.key(key);
            let secs = retention.as_secs() as f64;
            // Written only while this owner's claim is live (locked for the statement), and
            // the claim dropped in the same statement unless it is kept.
            let written = self
                .client()
                .await?
                .query_one(
                    "WITH mine AS (
                         SELECT key FROM command_poller_claims
                         WHERE key = $1 AND owner = $2 AND expires_at > now() FOR UPDATE),
                     stored AS (
                         INSERT INTO command_poller_results (key, result, expires_at)
                         SELECT $1, $3, now() + $4 * interval '1 second' WHERE EXISTS (SELECT 1 FROM mine)
                         ON CONFLICT (key) DO UPDATE SET result = EXCLUDED.result, expires_at = EXCLUDED.expires_at
                         RETURNING key),
                     _dropped AS (
                         DELETE FROM command_poller_claims
                         WHERE NOT $5 AND key IN (SELECT key FROM stored) AND owner = $2
                         RETURNING key)
                     SELECT count(*) FROM stored",
                    &[&key, &owner, &result_json, &secs, &keep_claim],
                )
                .await
                .map_err(err)?;
            if written.get::<_, i64>(0) == 0 {
                return Err(StoreError::NotOwner);
            }
            // Expired rows go lazily, a few at a time.
            self
                .client()
                .await?
                .execute("DELETE FROM command_poller_results WHERE key IN (SELECT key FROM command_poller_results WHERE expires_at < now() LIMIT 100)", &[])
                .await
                .map_err(err)?;
            Ok(())
        })
    }

    fn release<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let key = self.key(key);
            self.client()
                .await?
                .execute(
                    "DELETE FROM command_poller_claims WHERE key = $1 AND owner = $2",
                    &[&key, &owner],
                )
                .await
                .map_err(err)?;
            Ok(())
        })
    }
}
