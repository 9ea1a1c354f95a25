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

/// The store key of an action: `<agent>/<action_id>` for broker-verified agents, and
/// `~unverified/<agent>/<action_id>` for agents that only claimed a name (where config allows
/// them), so an unverified sender can neither read a verified agent's results nor pre-empt its
/// ids. No verified key can look like that: `~` and `/` are not allowed in agent names.
pub fn action_key(agent: &crate::intake::Agent, action_id: &crate::intake::ActionId) -> String {
    if agent.verified {
        format!("{}/{}", agent.id, action_id)
    } else {
        format!("~unverified/{}/{}", agent.id, action_id)
    }
}

/// SHA-256 (hex) over the canonical command as this agent sent it: agent (and whether the
/// broker verified it), action_id, command type, service and declared severity. Stored with the
/// result, so a reused action_id with a different command is refused instead of replaying
/// another command's result.
pub fn command_digest(agent: &crate::intake::Agent, cmd: &crate::intake::Command) -> String {
    use sha2::{Digest, Sha256};
    let canonical = serde_json::json!([
        "command/v1",
        agent.id.as_str(),
        agent.verified,
        cmd.action_id.as_str(),
        cmd.command_type,
        cmd.service.as_str(),
        cmd.severity,
    ]);
    hex::encode(Sha256::digest(canonical.to_string().as_bytes()))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intake::{ActionId, Agent, AgentId};

    #[test]
    fn unverified_agents_have_a_key_space_of_their_own() {
        let id = ActionId::parse("token-refresh-google-456").unwrap();
        let verified = Agent {
            id: AgentId::parse("agent-7").unwrap(),
            verified: true,
        };
        let claimed = Agent {
            verified: false,
            ..verified.clone()
        };
        assert_eq!(
            action_key(&verified, &id),
            "agent-7/token-refresh-google-456"
        );
        assert_ne!(action_key(&verified, &id), action_key(&claimed, &id));
        // A verified agent can't be named so that its key looks unverified.
        assert!(AgentId::parse("~unverified").is_err());
        assert!(AgentId::parse("a/b").is_err());
    }
}
