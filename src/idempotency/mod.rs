//! Idempotency: an action that already has a final result is not judged or executed again.
//!
//! In: a key (`<agent>/<action_id>`, so one agent can't pre-empt another's ids) and the
//! processing replica. Out: a [`Claim`]: go ahead, here is the stored result (replay it), or
//! another replica is on it (wait, then requeue). The store is a real boundary with three
//! backends: embedded (redb, one poller, survives restarts), Redis and PostgreSQL (shared by
//! replicas). Entries expire after the configured retention.

mod embedded;
mod postgres;
mod redis_store;

pub use embedded::EmbeddedStore;
pub use postgres::PostgresStore;
pub use redis_store::RedisStore;

use futures::future::BoxFuture;
use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;

/// The outcome of asking to process an action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// Nobody has a result or a live claim: this replica may process it.
    Mine,
    /// A final result exists (its JSON): replay it.
    Done(String),
    /// Another live claim holds it (the owner's instance).
    Busy(String),
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("idempotency store: {0}")]
    Backend(String),
}

/// The boundary to wherever final results are kept.
pub trait ResultStore: Send + Sync {
    /// Claims `key` for `owner` for `ttl`, unless a result or another live claim exists.
    /// Claiming again with the same owner renews the claim for another `ttl`.
    fn claim<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Claim, StoreError>>;
    /// Stores the final result (kept for `retention`) and drops the claim. `durable`: on disk
    /// before returning (the embedded store skips the fsync otherwise; shared stores always
    /// persist).
    fn complete<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
        result_json: &'a str,
        retention: Duration,
        durable: bool,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
    /// Drops `owner`'s claim without a result (the command went back to the queue).
    fn release<'a>(&'a self, key: &'a str, owner: &'a str)
        -> BoxFuture<'a, Result<(), StoreError>>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    Embedded,
    Redis,
    Postgres,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdempotencySettings {
    /// embedded | redis | postgres.
    pub backend: Backend,
    /// The embedded store's file (one poller per file).
    pub path: std::path::PathBuf,
    /// `redis://127.0.0.1:6379` or `postgres://user@host/db` (may hold a password: set it with
    /// POLLER__IDEMPOTENCY__URL; never logged).
    pub url: String,
    /// Prefix of every key (lets several systems share one Redis or table).
    pub key_prefix: String,
    /// How long final results are kept and replayed.
    pub retention_secs: u64,
    /// How long a claim holds without being renewed; the working replica renews it every third
    /// of this, so only a crashed replica's claim expires. At least 3.
    pub claim_ttl_secs: u64,
    /// How long a duplicate waits for the in-flight original before going back to the queue;
    /// more than `claim_ttl_secs`, so a dead claim expires within one wait.
    pub wait_for_in_flight_ms: u64,
}

/// Opens the configured store.
pub async fn open(s: &IdempotencySettings) -> Result<Arc<dyn ResultStore>, StoreError> {
    Ok(match s.backend {
        Backend::Embedded => Arc::new(EmbeddedStore::open(&s.path, &s.key_prefix)?),
        Backend::Redis => Arc::new(RedisStore::connect(&s.url, &s.key_prefix).await?),
        Backend::Postgres => Arc::new(PostgresStore::connect(&s.url, &s.key_prefix).await?),
    })
}

pub(crate) fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub(crate) fn now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
