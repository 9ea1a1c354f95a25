//! Idempotency: an action that already has a final result is not judged or executed again.
//!
//! In: a key (`<agent>/<action_id>`, so one agent can't pre-empt another's ids) and the
//! processing replica. Out: a [`Claim`]: go ahead, here is the stored result (replay it), or
//! another replica is on it (wait, then requeue). The store is a real boundary with three
//! backends: embedded (redb, one poller, survives restarts), Redis and PostgreSQL (shared by
//! replicas). Entries expire after the configured retention.

mod claim;
mod lease;
mod limits;
pub mod local;

pub use claim::{ClaimGuard, Claims, StoredOutcome, Taken, Unsealed, WaitPermit, Waiters};
pub use lease::{Keeper, Renewed, Renewing};
pub use limits::*;

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
    /// A `complete` from an owner whose claim has expired or been taken over: refused, so a
    /// stale replica can't overwrite what the current holder decides.
    #[error("idempotency store: the claim on this action is no longer held by this delivery (expired or taken over)")]
    NotOwner,
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
    /// Holds `key` for `owner` for another `ttl` (renewing its claim, or taking it when no live
    /// claim exists), whatever result is stored: [`Claim::Mine`], or [`Claim::Busy`] with the
    /// live holder. Renews a claim through storing and publishing, and lets a replica republish
    /// a stored result that was never confirmed published.
    fn hold<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Claim, StoreError>>;
    /// Stores the final result (kept for `retention`), only while `owner` holds a live claim on
    /// `key` ([`StoreError::NotOwner`] otherwise, and nothing is written). `durability`: whether
    /// it is on disk before this returns; `after`: whether the claim stays (see their types).
    fn complete<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
        result_json: &'a str,
        retention: Duration,
        durability: Durability,
        after: ClaimAfter,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
    /// Drops `owner`'s claim without a result (the command went back to the queue).
    fn release<'a>(&'a self, key: &'a str, owner: &'a str)
        -> BoxFuture<'a, Result<(), StoreError>>;
    /// The stored result of `key` (as `complete` stored it), if any; takes no claim.
    fn result<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<String>, StoreError>>;

    // Parked approvals (`crate::approval`): sealed records under an approval id, changed
    // only by compare-and-set, so two replicas deciding at once can't both win.

    /// Parks `record` under `id` (kept for `retention`, listed as open) unless a record is
    /// there already; returns the stored record (this one, or the one parked before).
    fn park<'a>(
        &'a self,
        id: &'a str,
        record: &'a str,
        retention: Duration,
    ) -> BoxFuture<'a, Result<String, StoreError>>;
    /// The record under `id`.
    fn record<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<String>, StoreError>>;
    /// Replaces the record under `id` with `new` only if it is still `expected`; `open`: whether
    /// it stays listed by `open_records`. False when it changed in between (nothing written).
    fn swap<'a>(
        &'a self,
        id: &'a str,
        expected: &'a str,
        new: &'a str,
        open: bool,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;
    /// Every open record (parked, not yet finalized).
    fn open_records(&self) -> BoxFuture<'_, Result<Vec<String>, StoreError>>;
}

/// Whether a stored result is on disk before [`ResultStore::complete`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// On disk first: the result is stored before it is published, so a crash in between
    /// publishes it instead of redoing the action.
    Synced,
    /// The embedded store may skip the fsync (losing the write costs a replay, not a redo);
    /// the shared stores always persist.
    Buffered,
}

/// Whether the claim outlives [`ResultStore::complete`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimAfter {
    /// The claim stays: the result is stored before it is published, and a second `complete`
    /// ends the claim once it is.
    Kept,
    /// The claim ends with the write.
    Ended,
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
    /// A PEM file of CA certificates to trust, besides the Mozilla roots, for `rediss://` and
    /// PostgreSQL's `sslmode=require` (a private CA). The server's certificate is always verified.
    #[serde(default)]
    pub ca_file: Option<std::path::PathBuf>,
    /// PostgreSQL connections at most (a pool: a dropped connection is replaced on next use).
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    /// Environment variable holding the key that seals stored outcomes (HMAC); required with
    /// the shared backends, the same on every replica. Never logged.
    pub key_env: String,
    /// Let `run` use the embedded store under `APP_ENVIRONMENT=production` (one poller per
    /// file: only for a single replica on a volume of its own).
    #[serde(default)]
    pub allow_embedded_in_production: bool,
    /// How long final results are kept and replayed (`retention_secs`).
    #[serde(rename = "retention_secs", deserialize_with = "crate::clock::de::secs")]
    pub retention: Duration,
    /// How long a claim holds without being renewed (`claim_ttl_secs`); the working replica
    /// renews it every third of this, so only a crashed replica's claim expires. At least 3 s.
    #[serde(rename = "claim_ttl_secs", deserialize_with = "crate::clock::de::secs")]
    pub claim_ttl: Duration,
    /// How long a duplicate waits for the in-flight original before going back to the queue
    /// (`wait_for_in_flight_ms`); more than the claim TTL, so a dead claim expires within one
    /// wait.
    #[serde(
        rename = "wait_for_in_flight_ms",
        deserialize_with = "crate::clock::de::millis"
    )]
    pub wait_for_in_flight: Duration,
    /// How many copies of in-flight actions one agent may have waiting on a replica
    /// (`max_waiting_duplicates_per_agent`, at least 1); a copy beyond it goes to the
    /// dead-letter queue at once instead of holding a delivery slot.
    #[serde(default = "default_max_waiting_duplicates")]
    pub max_waiting_duplicates_per_agent: usize,
}

fn default_max_waiting_duplicates() -> usize {
    2
}

fn default_pool_size() -> usize {
    16
}

/// One backend behind each of its boundaries: the results, the fleet's bridge slots and its
/// rate windows (`crate::limits`).
#[derive(Clone)]
pub struct Stores {
    pub results: Arc<dyn ResultStore>,
    pub slots: Arc<dyn crate::store::BridgeSlots>,
    pub windows: Arc<dyn crate::store::RateWindows>,
}

impl Stores {
    /// The three boundaries of one backend.
    pub fn of<S>(store: Arc<S>) -> Self
    where
        S: ResultStore + crate::store::BridgeSlots + crate::store::RateWindows + 'static,
    {
        Self {
            results: store.clone(),
            slots: store.clone(),
            windows: store,
        }
    }

    /// `results`, with slots and windows of this process only (tests that inject a result
    /// store and run one poller).
    pub fn local(results: Arc<dyn ResultStore>) -> Self {
        Self {
            results,
            slots: Arc::new(crate::store::local::LocalSlots::default()),
            windows: Arc::new(crate::store::local::MemWindows::default()),
        }
    }
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
/// broker verified it), action_id, command type, service, declared severity and its
/// justification when it gave one (what approvers bind to). Stored with the
/// result, so a reused action_id with a different command is refused instead of replaying
/// another command's result.
pub fn command_digest(agent: &crate::intake::Agent, cmd: &crate::intake::Command) -> String {
    use sha2::{Digest, Sha256};
    let mut canonical = serde_json::json!([
        "command/v1",
        agent.id.as_str(),
        agent.verified,
        cmd.action_id.as_str(),
        cmd.command_type,
        cmd.service.as_str(),
        cmd.severity,
    ]);
    // Only when given, so a command without one keeps the digest it always had.
    if let (Some(j), Some(parts)) = (&cmd.justification, canonical.as_array_mut()) {
        parts.push(serde_json::json!({ "justification": j }));
    }
    hex::encode(Sha256::digest(canonical.to_string().as_bytes()))
}

/// A stored outcome as kept in the store: the outcome's JSON and an HMAC over it with the
/// store key, so a value planted in Redis or PostgreSQL by someone without the key is refused
/// instead of replayed as a result.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Sealed {
    mac: String,
    outcome: String,
}

/// Seals `outcome_json` for the store.
pub fn seal(key: &crate::bridge::signing::Secret, outcome_json: &str) -> String {
    serde_json::to_string(&Sealed {
        mac: crate::bridge::signing::mac(key, outcome_json.as_bytes()),
        outcome: outcome_json.to_owned(),
    })
    .expect("serializes")
}

/// The outcome JSON of a stored value, if its HMAC holds.
pub fn unseal(key: &crate::bridge::signing::Secret, stored: &str) -> Result<String, String> {
    let sealed: Sealed = serde_json::from_str(stored)
        .map_err(|e| format!("not a sealed outcome ({e}): written by something other than a poller with the store key"))?;
    if crate::bridge::signing::verify_mac(key, sealed.outcome.as_bytes(), &sealed.mac) {
        Ok(sealed.outcome)
    } else {
        Err("its HMAC does not match: altered, or written without the store key".into())
    }
}

/// The key that seals stored outcomes: the environment variable `idempotency.key_env` names
/// (the same on every replica sharing a store). Without it, the embedded store (one poller per
/// file) keeps a random key in `<path>.key` (mode 0600); the shared stores refuse to start, as a
/// planted value could otherwise be replayed as a result.
pub fn store_key(
    s: &IdempotencySettings,
    from_env: Option<crate::bridge::signing::Secret>,
) -> Result<crate::bridge::signing::Secret, StoreError> {
    use crate::bridge::signing::Secret;
    if let Some(k) = from_env {
        k.check_strong(&s.key_env).map_err(StoreError::Backend)?;
        return Ok(k);
    }
    if s.backend != Backend::Embedded {
        return Err(StoreError::Backend(format!(
            "idempotency.key_env: the environment variable {} is not set; the {:?} store is shared, so every replica needs the same key to seal and check stored outcomes",
            s.key_env, s.backend
        )));
    }
    let path = {
        let mut p = s.path.clone().into_os_string();
        p.push(".key");
        std::path::PathBuf::from(p)
    };
    match std::fs::read_to_string(&path) {
        Ok(k) if !k.trim().is_empty() => return Ok(Secret::new(k.trim().to_owned())),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(StoreError::Backend(format!(
                "idempotency store key {}: {e}",
                path.display()
            )))
        }
    }
    let key = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::Backend(format!("{}: {e}", dir.display())))?;
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    match opts.open(&path) {
        Ok(mut f) => {
            std::io::Write::write_all(&mut f, key.as_bytes())
                .map_err(|e| StoreError::Backend(format!("{}: {e}", path.display())))?;
            Ok(Secret::new(key))
        }
        // Another process created it first: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let k = std::fs::read_to_string(&path)
                .map_err(|e| StoreError::Backend(format!("{}: {e}", path.display())))?;
            Ok(Secret::new(k.trim().to_owned()))
        }
        Err(e) => Err(StoreError::Backend(format!("{}: {e}", path.display()))),
    }
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub fn now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bridge::signing::Secret;
    use crate::intake::{ActionId, Agent, AgentId};

    #[test]
    fn a_planted_or_altered_outcome_is_refused() {
        let key = Secret::new("k");
        let sealed = seal(&key, r#"{"published":true}"#);
        assert_eq!(unseal(&key, &sealed).unwrap(), r#"{"published":true}"#);
        assert!(unseal(&Secret::new("other"), &sealed).is_err());
        let altered = sealed.replace("true", "false");
        assert!(unseal(&key, &altered).is_err());
        // What someone with write access to Redis would plant: a bare outcome.
        assert!(unseal(&key, r#"{"published":true,"result":{}}"#).is_err());
    }

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

    /// A justification is part of what approvers bind to; a command without one keeps the
    /// digest it always had.
    #[test]
    fn a_justification_changes_the_command_digest_and_its_absence_does_not() {
        use crate::intake::{ActionId, Agent, AgentId, Command, CommandType, Service, Severity};
        let agent = Agent {
            id: AgentId::parse("agent-7").unwrap(),
            verified: true,
        };
        let mut cmd = Command {
            action_id: ActionId::parse("a-1").unwrap(),
            command_type: CommandType::RefreshToken,
            service: Service::parse("google").unwrap(),
            severity: Severity::Medium,
            claimed_agent: None,
            justification: None,
        };
        let before = command_digest(&agent, &cmd);
        let canonical = serde_json::json!([
            "command/v1",
            "agent-7",
            true,
            "a-1",
            "REFRESH_TOKEN",
            "google",
            "MEDIUM"
        ]);
        use sha2::{Digest, Sha256};
        assert_eq!(
            before,
            hex::encode(Sha256::digest(canonical.to_string().as_bytes()))
        );
        cmd.justification = Some("why".into());
        let with = command_digest(&agent, &cmd);
        assert_ne!(with, before);
        cmd.justification = Some("why not".into());
        assert_ne!(command_digest(&agent, &cmd), with);
    }
}
