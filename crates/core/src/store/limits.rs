//! Limits that hold for the whole fleet, not per process: the bridge's concurrency limit (a
//! distributed semaphore with leases) and rate windows (sliding counts per key).
//!
//! In: a bridge call about to start (its action key), or an event to count under a key. Out: a
//! [`SlotGuard`] that renews its lease while the call runs and gives the slot back when dropped
//! (and says whether an earlier attempt already sent this action to the bridge), or a [`Hit`]:
//! counted, or over the limit. The state lives in the shared store (Redis or PostgreSQL), so
//! every replica counts against one number and a restart forgets nothing; with the embedded store
//! (one poller) the slots are in-process and the windows in its file.
//!
//! Fail closed: when the store can't be asked, no slot is granted and no event is allowed.

use super::lease::{Keeper, Renewed, Renewing};
use futures::future::BoxFuture;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    /// The store did not answer (or answered an error): nothing is granted.
    #[error("limits store: {0}")]
    Backend(String),
}

impl LimitError {
    /// Every failure is the store's, and worth asking again later.
    pub fn is_transient(&self) -> bool {
        match self {
            LimitError::Backend(_) => true,
        }
    }
}

impl From<crate::store::StoreError> for LimitError {
    fn from(e: crate::store::StoreError) -> Self {
        LimitError::Backend(e.to_string())
    }
}

/// A slot taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// An earlier attempt (a replica that crashed, lost its claim, or was held by the operator
    /// gate after its call began) already took a slot for this action: this call re-POSTs it,
    /// and only the bridge's dedup keeps it from acting twice.
    pub earlier: bool,
}

/// The boundary to wherever the fleet's bridge slots are kept.
pub trait BridgeSlots: Send + Sync {
    /// Takes one of `limit` slots for `holder` for `lease`, unless `limit` live leases exist
    /// (expired ones are free), and records that `key` went to the bridge (kept for
    /// `remember`). `None`: no slot free.
    fn try_take<'a>(
        &'a self,
        holder: &'a str,
        limit: usize,
        lease: Duration,
        key: &'a str,
        remember: Duration,
    ) -> BoxFuture<'a, Result<Option<Grant>, LimitError>>;
    /// Extends `holder`'s lease by `lease` from now; false when it had expired (and may be
    /// someone else's now).
    fn renew<'a>(
        &'a self,
        holder: &'a str,
        lease: Duration,
    ) -> BoxFuture<'a, Result<bool, LimitError>>;
    /// Gives `holder`'s slot back.
    fn give_back<'a>(&'a self, holder: &'a str) -> BoxFuture<'a, Result<(), LimitError>>;
    /// Drops the mark `try_take` set for `key`: the call never went out (the operator gate
    /// closed after the slot was taken), so a later attempt is not a re-POST.
    fn forget_sent<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), LimitError>>;
    /// Whether `key` is marked sent to the bridge (by `try_take`, and not yet expired or
    /// forgotten): an earlier attempt at this action may have run it.
    fn sent<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool, LimitError>>;
    /// The holders of live leases.
    fn holders(&self) -> BoxFuture<'_, Result<Vec<String>, LimitError>>;
}

/// One event counted, or refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hit {
    /// Counted (or counted before, under the same member): within the limit.
    pub allowed: bool,
    /// Events in the window, this one included when allowed.
    pub count: usize,
}

/// The boundary to wherever rate windows are kept.
pub trait RateWindows: Send + Sync {
    /// Counts `member` under `key` unless `limit` events already fall within the last
    /// `window`. A member counted before (and still in the window) is allowed again without
    /// counting twice, so a command judged twice (redelivered, deferred) spends one event.
    fn hit<'a>(
        &'a self,
        key: &'a str,
        member: &'a str,
        limit: usize,
        window: Duration,
    ) -> BoxFuture<'a, Result<Hit, LimitError>>;

    /// The events counted under `key` within the last `window`, counting nothing (a hit
    /// that may not count, by a member no command's key can be).
    fn count<'a>(
        &'a self,
        key: &'a str,
        window: Duration,
    ) -> BoxFuture<'a, Result<usize, LimitError>> {
        Box::pin(async move { Ok(self.hit(key, "(count)", 0, window).await?.count) })
    }
}

/// The fleet's bridge slots as the pipeline takes them: waits for a free slot (polling the
/// store, woken early when this process gives one back), one waiter per process asking the
/// store at a time.
pub struct Slots {
    store: Arc<dyn BridgeSlots>,
    limit: usize,
    lease: Duration,
    remember: Duration,
    instance: String,
    /// Only the first waiter of this process polls the store; the rest queue behind it.
    turnstile: tokio::sync::Mutex<()>,
    freed: Arc<Notify>,
    /// Renews the leases of the slots this process holds (one task for all of them).
    keeper: Keeper,
}

/// How often a waiter asks the store again when every slot is taken (jittered); a slot given
/// back by this process wakes it at once.
const POLL_MIN: Duration = Duration::from_millis(5);
const POLL_MAX: Duration = Duration::from_millis(25);

impl Slots {
    /// `limit` slots for the fleet, each lease `lease` long (renewed every third of it while a
    /// call runs), markers of sent actions kept for `remember`.
    pub fn new(
        store: Arc<dyn BridgeSlots>,
        limit: usize,
        lease: Duration,
        remember: Duration,
        instance: &str,
    ) -> Self {
        Self {
            store,
            limit,
            lease,
            remember,
            instance: instance.to_owned(),
            turnstile: tokio::sync::Mutex::new(()),
            freed: Arc::new(Notify::new()),
            keeper: Keeper::default(),
        }
    }

    /// The fleet's limit.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Whether an earlier attempt sent the action `key` to the bridge (the mark a slot sets,
    /// kept for `remember`). Takes no slot and sets no mark.
    pub async fn sent(&self, key: &str) -> Result<bool, LimitError> {
        self.store.sent(key).await
    }

    /// Waits for a slot for the action `key`. An error (the store unreachable) grants nothing:
    /// no bridge call starts.
    pub async fn acquire(&self, key: &str) -> Result<SlotGuard, LimitError> {
        let holder = format!("{}/{}", self.instance, uuid::Uuid::new_v4().simple());
        let _turn = self.turnstile.lock().await;
        let mut delay = POLL_MIN;
        loop {
            // Registered before asking, so a slot given back in between still wakes this waiter.
            let freed = self.freed.notified();
            let taken = self
                .store
                .try_take(&holder, self.limit, self.lease, key, self.remember)
                .await?;
            if let Some(grant) = taken {
                return Ok(SlotGuard::new(
                    self.store.clone(),
                    holder,
                    key.to_owned(),
                    grant,
                    (self.lease, &self.keeper),
                    self.freed.clone(),
                ));
            }
            let jitter = Duration::from_micros(fastrand_micros(delay.as_micros() as u64 / 2));
            let _ = tokio::time::timeout(delay + jitter, freed).await;
            delay = (delay * 2).min(POLL_MAX);
        }
    }
}

/// A pseudo-random number below `bound` (jitter only: no need for a generator of quality).
fn fastrand_micros(bound: u64) -> u64 {
    if bound == 0 {
        return 0;
    }
    (uuid::Uuid::new_v4().as_u128() as u64) % bound
}

/// A bridge slot held: renewed in the background while it lives, given back when dropped.
pub struct SlotGuard {
    store: Arc<dyn BridgeSlots>,
    holder: String,
    /// The action the slot was taken for.
    key: String,
    grant: Grant,
    renewing: Option<Renewing>,
    freed: Arc<Notify>,
}

impl SlotGuard {
    fn new(
        store: Arc<dyn BridgeSlots>,
        holder: String,
        key: String,
        grant: Grant,
        (lease, keeper): (Duration, &Keeper),
        freed: Arc<Notify>,
    ) -> Self {
        let (s, h) = (store.clone(), holder.clone());
        let renewing = keeper.keep(lease / 3, move || {
            let (s, h) = (s.clone(), h.clone());
            Box::pin(async move {
                match s.renew(&h, lease).await {
                    Ok(true) => Renewed::Keep,
                    Ok(false) => {
                        tracing::warn!(holder = %h, "bridge slot lease expired while the call ran (the store was unreachable for longer than the lease): the fleet may briefly run one call over its limit");
                        Renewed::Stop
                    }
                    Err(e) => {
                        tracing::warn!(holder = %h, error = %e, "could not renew the bridge slot lease; trying again");
                        Renewed::Keep
                    }
                }
            })
        });
        Self {
            store,
            holder,
            key,
            grant,
            renewing: Some(renewing),
            freed,
        }
    }

    /// Whether an earlier attempt already sent this action to the bridge.
    pub fn earlier(&self) -> bool {
        self.grant.earlier
    }

    /// The call was never sent (the gate closed after the slot was taken): the mark this slot
    /// set goes, so the command's next attempt is not counted a re-POST. A mark an earlier
    /// attempt set stays. Gives the slot back.
    pub async fn not_sent(self) {
        if !self.grant.earlier {
            if let Err(e) = self.store.forget_sent(&self.key).await {
                tracing::warn!(error = %e, "could not drop the mark of an unsent bridge call: its next attempt will count as a re-POST");
            }
        }
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.renewing.take();
        let (store, holder, freed) = (self.store.clone(), self.holder.clone(), self.freed.clone());
        let give_back = async move {
            if let Err(e) = store.give_back(&holder).await {
                tracing::warn!(holder = %holder, error = %e, "could not give the bridge slot back: it frees itself when its lease expires");
            }
            freed.notify_one();
        };
        // Outside a runtime (a test tearing down) the lease expires on its own.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(give_back);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::local::LocalSlots;

    #[tokio::test]
    async fn waiters_get_the_slots_given_back_and_never_more_than_the_limit() {
        let store: Arc<dyn BridgeSlots> = Arc::new(LocalSlots::default());
        let slots = Arc::new(Slots::new(
            store.clone(),
            2,
            Duration::from_secs(5),
            Duration::from_secs(60),
            "t",
        ));
        let a = slots.acquire("k1").await.unwrap();
        let b = slots.acquire("k2").await.unwrap();
        assert!(!a.earlier() && !b.earlier());
        let s = slots.clone();
        let third = tokio::spawn(async move { s.acquire("k1").await.map(|g| g.earlier()) });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!third.is_finished(), "a third call waits while two run");
        assert_eq!(store.holders().await.unwrap().len(), 2);
        drop(a);
        let earlier = tokio::time::timeout(Duration::from_secs(2), third)
            .await
            .expect("the slot given back is taken")
            .unwrap()
            .unwrap();
        assert!(earlier, "k1 went to the bridge before: a re-POST");
    }

    #[tokio::test]
    async fn a_call_never_sent_leaves_no_mark() {
        let store: Arc<dyn BridgeSlots> = Arc::new(LocalSlots::default());
        let slots = Slots::new(
            store,
            1,
            Duration::from_secs(5),
            Duration::from_secs(60),
            "t",
        );
        slots.acquire("k").await.unwrap().not_sent().await;
        let again = slots.acquire("k").await.unwrap();
        assert!(!again.earlier(), "held before its POST: not a re-POST");
        drop(again);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let third = slots.acquire("k").await.unwrap();
        assert!(third.earlier(), "the second attempt was sent");
        third.not_sent().await;
        assert!(
            slots.acquire("k").await.unwrap().earlier(),
            "a mark an earlier attempt set stays"
        );
    }

    #[tokio::test]
    async fn a_dead_holders_slot_comes_back_after_its_lease() {
        let store = LocalSlots::default();
        let lease = Duration::from_millis(200);
        let r = Duration::from_secs(60);
        assert!(store
            .try_take("dead", 1, lease, "a", r)
            .await
            .unwrap()
            .is_some());
        assert!(store
            .try_take("live", 1, lease, "b", r)
            .await
            .unwrap()
            .is_none());
        tokio::time::sleep(lease + Duration::from_millis(50)).await;
        assert!(
            !store.renew("dead", lease).await.unwrap(),
            "an expired lease is not renewed"
        );
        assert!(store
            .try_take("live", 1, lease, "b", r)
            .await
            .unwrap()
            .is_some());
    }
}
