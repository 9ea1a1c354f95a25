//! The claim on an action as an owned guard.
//!
//! In: a store, an action key and how long to wait for an in-flight duplicate. Out: [`Taken`]:
//! a [`ClaimGuard`] (this delivery processes the action), the stored outcome (replay it), or the
//! live holder (defer). The guard renews the claim every third of its TTL for as long as it
//! lives (through the [`Keeper`] it was given: one task for every claim, not one each),
//! through storing and publishing the result, and is finished by [`ClaimGuard::complete`] or
//! [`ClaimGuard::release`]; dropped unfinished, it stops renewing and releases the claim.

use super::lease::{Keeper, Renewed, Renewing};
use super::{Claim, ClaimAfter, Durability, ResultStore, StoreError};
use crate::bridge::signing::Secret;
use crate::outcome::ResultMessage;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the store keeps per action: the result, and whether it was confirmed published (with
/// its alerts). An unpublished one is published in full on the next delivery.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct StoredOutcome {
    pub published: bool,
    pub result: ResultMessage,
    /// The digest of the command that produced it ([`super::command_digest`]): a reused
    /// action_id with a different command is refused, never answered with this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_digest: Option<String>,
}

impl StoredOutcome {
    /// The sealed JSON the store keeps ([`super::seal`]).
    pub fn seal(&self, key: &Secret) -> String {
        let json = serde_json::to_string(self).expect("a stored outcome serializes");
        super::seal(key, &json)
    }

    /// The outcome in a stored value: `Err` says why it can't be trusted or read.
    pub fn unseal(key: &Secret, stored: &str) -> Result<Self, Unsealed> {
        let json = super::unseal(key, stored).map_err(Unsealed::Tampered)?;
        serde_json::from_str(&json).map_err(|e| Unsealed::Unreadable(e.to_string()))
    }
}

/// Why a stored value can't be replayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unsealed {
    /// Its HMAC fails: planted or altered.
    Tampered(String),
    /// Sealed by a poller, but not an outcome this version reads.
    Unreadable(String),
}

/// The answer to taking a claim.
pub enum Taken {
    /// This delivery processes the action.
    Mine(ClaimGuard),
    /// A final outcome is stored (sealed JSON): replay it.
    Done(String),
    /// Another delivery still holds it after the wait (its owner).
    Busy(String),
}

/// A live claim on one action, renewed until it is completed, released or dropped.
pub struct ClaimGuard {
    store: Arc<dyn ResultStore>,
    key: String,
    owner: String,
    retention: Duration,
    renewal: Option<Renewing>,
    finished: bool,
}

/// How a replica takes claims: its store, its name (claims' owners are `<instance>#<random>`),
/// how long a claim lives unrenewed, how long results are kept, and the keeper that renews its
/// live claims.
#[derive(Clone)]
pub struct Claims {
    pub store: Arc<dyn ResultStore>,
    pub instance: String,
    pub ttl: Duration,
    pub retention: Duration,
    pub keeper: Keeper,
}

impl Claims {
    /// Claims `key` ([`ClaimGuard::take`]).
    pub async fn take(&self, key: String, wait: Duration) -> Result<Taken, StoreError> {
        ClaimGuard::take(self, key, wait).await
    }

    /// Holds `key` whatever is stored under it ([`ClaimGuard::hold`]).
    pub async fn hold(&self, key: String) -> Result<Option<ClaimGuard>, StoreError> {
        ClaimGuard::hold(self, key).await
    }
}

/// Copies of in-flight actions waiting on this replica, counted per agent and capped: each
/// waiting copy holds a delivery slot, so a flood of copies of one slow action would otherwise
/// take every slot and make every other agent's commands wait.
#[derive(Debug, Clone)]
pub struct Waiters {
    cap: usize,
    by_agent: Arc<Mutex<HashMap<String, usize>>>,
}

/// One copy's place among its agent's waiting copies; dropping it frees the place.
#[derive(Debug)]
pub struct WaitPermit {
    agent: String,
    by_agent: Arc<Mutex<HashMap<String, usize>>>,
}

impl Waiters {
    /// At most `cap` waiting copies per agent (at least one).
    pub fn new(cap: usize) -> Self {
        Self {
            cap: cap.max(1),
            by_agent: Arc::default(),
        }
    }

    /// A place for one more of `agent`'s copies to wait, or `None` when `cap` already wait.
    pub fn enter(&self, agent: &str) -> Option<WaitPermit> {
        let mut map = self.by_agent.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(agent.to_owned()).or_default();
        if *n >= self.cap {
            return None;
        }
        *n += 1;
        Some(WaitPermit {
            agent: agent.to_owned(),
            by_agent: self.by_agent.clone(),
        })
    }

    /// How many of `agent`'s copies wait now.
    #[cfg(test)]
    fn waiting(&self, agent: &str) -> usize {
        let map = self.by_agent.lock().unwrap_or_else(|p| p.into_inner());
        map.get(agent).copied().unwrap_or(0)
    }

    /// The cap per agent.
    pub fn cap(&self) -> usize {
        self.cap
    }
}

impl Drop for WaitPermit {
    fn drop(&mut self) {
        let mut map = self.by_agent.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.agent) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.agent);
            }
        }
    }
}

/// How long [`ClaimGuard::take`] sleeps between asking again while another delivery holds it.
const BUSY_POLL: Duration = Duration::from_millis(100);

impl ClaimGuard {
    /// Claims `key` for a fresh owner (`<instance>#<random>`, unique per delivery), waiting up
    /// to `wait` for an in-flight duplicate to conclude.
    pub async fn take(claims: &Claims, key: String, wait: Duration) -> Result<Taken, StoreError> {
        let owner = new_owner(&claims.instance);
        let deadline = Instant::now() + wait;
        let mut logged = false;
        loop {
            match claims.store.claim(&key, &owner, claims.ttl).await? {
                Claim::Mine => return Ok(Taken::Mine(Self::start(claims, key, owner))),
                Claim::Done(stored) => return Ok(Taken::Done(stored)),
                Claim::Busy(holder) if Instant::now() >= deadline => {
                    return Ok(Taken::Busy(holder))
                }
                Claim::Busy(holder) => {
                    if !logged {
                        tracing::info!(owner = %holder, "duplicate of an action in flight; waiting for its result");
                        logged = true;
                    }
                    tokio::time::sleep(BUSY_POLL).await;
                }
            }
        }
    }

    /// Holds `key` whatever is stored under it (to republish a stored outcome never confirmed
    /// published); `None` when another delivery holds it.
    pub async fn hold(claims: &Claims, key: String) -> Result<Option<Self>, StoreError> {
        let owner = new_owner(&claims.instance);
        Ok(match claims.store.hold(&key, &owner, claims.ttl).await? {
            Claim::Mine => Some(Self::start(claims, key, owner)),
            _ => None,
        })
    }

    fn start(claims: &Claims, key: String, owner: String) -> Self {
        let ttl = claims.ttl;
        let renewal = {
            let (store, key, owner) = (claims.store.clone(), key.clone(), owner.clone());
            let span = tracing::Span::current();
            claims.keeper.keep(ttl / 3, move || {
                let (store, key, owner, span) =
                    (store.clone(), key.clone(), owner.clone(), span.clone());
                Box::pin(async move {
                    match store.hold(&key, &owner, ttl).await {
                        Ok(Claim::Mine) => {}
                        // Someone else holds it now (renewals failed for a whole TTL): the
                        // result can't be stored under it; the bridge's dedup keeps a parallel
                        // run from acting twice.
                        Ok(other) => {
                            tracing::warn!(parent: &span, now = ?other, "idempotency claim lost while in flight")
                        }
                        Err(e) => {
                            tracing::warn!(parent: &span, error = %e, "could not renew the idempotency claim; retrying")
                        }
                    }
                    Renewed::Keep
                })
            })
        };
        Self {
            store: claims.store.clone(),
            key,
            owner,
            retention: claims.retention,
            renewal: Some(renewal),
            finished: false,
        }
    }

    /// The action's store key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Stores `outcome` (sealed) and keeps the claim: done before publishing, durably, so a
    /// crash in between publishes the stored outcome instead of redoing the action.
    pub async fn store(&self, outcome: &StoredOutcome, seal: &Secret) -> Result<(), StoreError> {
        self.store
            .complete(
                &self.key,
                &self.owner,
                &outcome.seal(seal),
                self.retention,
                Durability::Synced,
                ClaimAfter::Kept,
            )
            .await
    }

    /// Stores `outcome` (sealed) and ends the claim. Not made durable at once: losing this write
    /// in a crash costs a replay, not a redo.
    pub async fn complete(self, outcome: &StoredOutcome, seal: &Secret) -> Result<(), StoreError> {
        self.end_with(&outcome.seal(seal), Durability::Buffered)
            .await
    }

    /// Stores `json` (sealed), something other than a command's outcome (a lever's report), and
    /// ends the claim, durably.
    pub async fn complete_json(self, json: &str, seal: &Secret) -> Result<(), StoreError> {
        self.end_with(&super::seal(seal, json), Durability::Synced)
            .await
    }

    /// Writes `sealed` under the claim and ends it.
    async fn end_with(mut self, sealed: &str, durability: Durability) -> Result<(), StoreError> {
        self.renewal.take();
        let done = self
            .store
            .complete(
                &self.key,
                &self.owner,
                sealed,
                self.retention,
                durability,
                ClaimAfter::Ended,
            )
            .await;
        self.finished = done.is_ok();
        done
    }

    /// Ends the claim without a result (the command goes back to the queue).
    pub async fn release(mut self) -> Result<(), StoreError> {
        self.renewal.take();
        self.finished = true;
        self.store.release(&self.key, &self.owner).await
    }
}

impl std::fmt::Debug for ClaimGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClaimGuard")
            .field("key", &self.key)
            .field("owner", &self.owner)
            .finish_non_exhaustive()
    }
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        self.renewal.take();
        if self.finished {
            return;
        }
        // Unfinished (a task aborted, a failed store): free it rather than let it wait out its
        // TTL. Best effort; the TTL remains the backstop.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let (store, key, owner) = (self.store.clone(), self.key.clone(), self.owner.clone());
            rt.spawn(async move {
                let _ = store.release(&key, &owner).await;
            });
        }
    }
}

fn new_owner(instance: &str) -> String {
    format!("{instance}#{}", uuid::Uuid::new_v4().simple())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::MemStore;

    async fn take(store: &Arc<dyn ResultStore>, instance: &str) -> Taken {
        let claims = Claims {
            store: store.clone(),
            instance: instance.into(),
            ttl: Duration::from_secs(60),
            retention: Duration::from_secs(60),
            keeper: Keeper::default(),
        };
        claims
            .take("agent/a-1".into(), Duration::ZERO)
            .await
            .unwrap()
    }

    /// An agent's waiting copies are capped, each agent on its own, and a place is freed when
    /// its copy stops waiting (the map forgets an agent with none).
    #[test]
    fn waiting_copies_are_capped_per_agent_and_freed_on_drop() {
        let w = Waiters::new(2);
        let a1 = w.enter("a").unwrap();
        let _a2 = w.enter("a").unwrap();
        assert!(w.enter("a").is_none(), "a third copy of agent a waits");
        let _b = w.enter("b").expect("agent b is not held back by agent a");
        assert_eq!(w.waiting("a"), 2);
        drop(a1);
        assert_eq!(w.waiting("a"), 1);
        let _a3 = w.enter("a").expect("the freed place is taken again");
        drop(_a3);
        drop(_a2);
        assert_eq!(w.waiting("a"), 0);
        assert!(w.by_agent.lock().unwrap().get("a").is_none());
        assert_eq!(Waiters::new(0).cap(), 1);
    }

    /// A guard dropped unfinished (its task aborted at shutdown, say) frees the action for the
    /// redelivered copy instead of leaving it to wait out the TTL.
    #[tokio::test]
    async fn a_guard_dropped_unfinished_releases_its_claim() {
        let store: Arc<dyn ResultStore> = Arc::new(MemStore::default());
        let Taken::Mine(guard) = take(&store, "first").await else {
            panic!("the key is free")
        };
        assert!(matches!(take(&store, "second").await, Taken::Busy(_)));
        drop(guard);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Taken::Mine(_) = take(&store, "second").await {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the dropped claim was never released"
            );
            tokio::task::yield_now().await;
        }
    }

    /// A completed guard leaves the outcome for every later delivery, and its claim gone.
    #[tokio::test]
    async fn a_completed_guard_leaves_the_outcome_to_replay() {
        let store: Arc<dyn ResultStore> = Arc::new(MemStore::default());
        let Taken::Mine(guard) = take(&store, "first").await else {
            panic!("the key is free")
        };
        let outcome: StoredOutcome = serde_json::from_value(serde_json::json!({
            "published": true,
            "result": {"action_id": "a-1", "command_type": null, "service": null, "agent": null,
                       "status": "SUCCESS", "rationale": "ok", "received_at": "t",
                       "completed_at": "t", "poller_instance": "first"}
        }))
        .unwrap();
        let key = Secret::new("k");
        guard.complete(&outcome, &key).await.unwrap();
        match take(&store, "second").await {
            Taken::Done(sealed) => {
                assert!(StoredOutcome::unseal(&key, &sealed).unwrap().published)
            }
            _ => panic!("the outcome should be stored"),
        }
    }
}
