//! Leases kept alive by one task per keeper, not by a task per lease.
//!
//! In: leases to renew, each a renewal function and how often it is due. Out: a [`Renewing`]
//! per lease; dropping it (or [`Renewing::stop`]) ends the renewals. One task per [`Keeper`]
//! runs every lease's renewal when it falls due, several at once, so a command's claim and its
//! bridge slot cost an entry in a map while they live, not a spawned task and a timer each
//! (which every command paid for, though almost none lives long enough to be renewed).

use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// What a renewal found: keep renewing, or stop (the lease is gone for good).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewed {
    Keep,
    Stop,
}

/// One renewal of a lease.
type Renew = Arc<dyn Fn() -> BoxFuture<'static, Renewed> + Send + Sync>;

/// Renews the leases given to it, from one task (started on the first lease, in the runtime
/// of whoever gave it; started again there if that runtime has gone).
#[derive(Clone, Default)]
pub struct Keeper {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    registry: Mutex<Registry>,
    /// Woken when a lease is added to an empty keeper (the task sleeps without a deadline).
    /// Apart from the rest, so the waiting task doesn't keep the keeper alive.
    added: Arc<Notify>,
}

#[derive(Default)]
struct Registry {
    next_id: u64,
    leases: HashMap<u64, Lease>,
    task: Option<tokio::task::JoinHandle<()>>,
}

struct Lease {
    every: Duration,
    due: Instant,
    /// A renewal of it is running now (it is not started again until that one ends).
    running: bool,
    renew: Renew,
}

/// A lease being renewed; dropping it ends the renewals (a renewal running then finishes).
pub struct Renewing {
    id: u64,
    keeper: Weak<Inner>,
}

impl Keeper {
    /// Renews with `renew` every `every` (the first time `every` from now) until the
    /// [`Renewing`] is dropped or a renewal says [`Renewed::Stop`].
    pub fn keep(
        &self,
        every: Duration,
        renew: impl Fn() -> BoxFuture<'static, Renewed> + Send + Sync + 'static,
    ) -> Renewing {
        let mut reg = lock(&self.inner.registry);
        let id = reg.next_id;
        reg.next_id += 1;
        let was_empty = reg.leases.is_empty();
        reg.leases.insert(
            id,
            Lease {
                every,
                due: Instant::now() + every,
                running: false,
                renew: Arc::new(renew),
            },
        );
        if reg.task.as_ref().is_none_or(|t| t.is_finished()) {
            reg.task = Some(tokio::spawn(run(
                Arc::downgrade(&self.inner),
                self.inner.added.clone(),
            )));
        }
        drop(reg);
        if was_empty {
            self.inner.added.notify_one();
        }
        Renewing {
            id,
            keeper: Arc::downgrade(&self.inner),
        }
    }

    /// How many leases are being renewed.
    pub fn len(&self) -> usize {
        lock(&self.inner.registry).leases.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Renewing {
    /// Ends the renewals now.
    pub fn stop(self) {}
}

impl Drop for Renewing {
    fn drop(&mut self) {
        if let Some(inner) = self.keeper.upgrade() {
            lock(&inner.registry).leases.remove(&self.id);
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(t) = lock(&self.registry).task.take() {
            t.abort();
        }
    }
}

/// The keeper's task: starts the renewals that are due, and sleeps until the next one is (or
/// a lease arrives, or a renewal ends). Ends with the keeper.
async fn run(inner: Weak<Inner>, added: Arc<Notify>) {
    let mut running: FuturesUnordered<BoxFuture<'static, (u64, Renewed)>> = FuturesUnordered::new();
    loop {
        let woken = added.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        let next = {
            let Some(inner) = inner.upgrade() else { return };
            let now = Instant::now();
            let mut reg = lock(&inner.registry);
            for (&id, lease) in reg.leases.iter_mut() {
                if !lease.running && lease.due <= now {
                    lease.running = true;
                    let renew = lease.renew.clone();
                    running.push(Box::pin(async move { (id, renew().await) }));
                }
            }
            reg.leases
                .values()
                .filter(|l| !l.running)
                .map(|l| l.due)
                .min()
        };
        tokio::select! {
            Some((id, renewed)) = running.next(), if !running.is_empty() => {
                let Some(inner) = inner.upgrade() else { return };
                let mut reg = lock(&inner.registry);
                match renewed {
                    Renewed::Stop => {
                        reg.leases.remove(&id);
                    }
                    Renewed::Keep => {
                        if let Some(lease) = reg.leases.get_mut(&id) {
                            lease.running = false;
                            lease.due = Instant::now() + lease.every;
                        }
                    }
                }
            }
            _ = sleep_until(next) => {}
            _ = woken => {}
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn counting(n: &Arc<AtomicUsize>, answer: Renewed) -> impl Fn() -> BoxFuture<'static, Renewed> {
        let n = n.clone();
        move || {
            let n = n.clone();
            Box::pin(async move {
                n.fetch_add(1, Ordering::SeqCst);
                answer
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_is_renewed_every_period_until_it_is_dropped() {
        let keeper = Keeper::default();
        let n = Arc::new(AtomicUsize::new(0));
        let lease = keeper.keep(Duration::from_secs(5), counting(&n, Renewed::Keep));
        tokio::time::sleep(Duration::from_millis(4_900)).await;
        assert_eq!(n.load(Ordering::SeqCst), 0, "not before it is due");
        tokio::time::sleep(Duration::from_millis(10_200)).await;
        assert_eq!(n.load(Ordering::SeqCst), 3, "at 5, 10 and 15 s");
        drop(lease);
        assert!(keeper.is_empty());
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(n.load(Ordering::SeqCst), 3, "never after it was dropped");
    }

    #[tokio::test(start_paused = true)]
    async fn a_renewal_that_says_stop_is_not_run_again() {
        let keeper = Keeper::default();
        let n = Arc::new(AtomicUsize::new(0));
        let _lease = keeper.keep(Duration::from_secs(1), counting(&n, Renewed::Stop));
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(n.load(Ordering::SeqCst), 1);
        assert!(keeper.is_empty());
    }

    /// A renewal that hangs (a store that doesn't answer) holds back no other lease.
    #[tokio::test(start_paused = true)]
    async fn a_hung_renewal_holds_back_no_other() {
        let keeper = Keeper::default();
        let _stuck = keeper.keep(Duration::from_secs(1), || {
            Box::pin(std::future::pending::<Renewed>())
        });
        let n = Arc::new(AtomicUsize::new(0));
        let _lease = keeper.keep(Duration::from_secs(2), counting(&n, Renewed::Keep));
        tokio::time::sleep(Duration::from_millis(10_500)).await;
        assert_eq!(n.load(Ordering::SeqCst), 5);
    }

    /// A lease added to an idle keeper (whose task sleeps without a deadline) is renewed on
    /// time; leases of different periods each keep their own.
    #[tokio::test(start_paused = true)]
    async fn leases_added_later_and_of_other_periods_keep_their_own_times() {
        let keeper = Keeper::default();
        let first = keeper.keep(Duration::from_secs(60), || {
            Box::pin(async { Renewed::Keep })
        });
        drop(first);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (fast, slow) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let _a = keeper.keep(Duration::from_secs(3), counting(&slow, Renewed::Keep));
        let _b = keeper.keep(Duration::from_secs(1), counting(&fast, Renewed::Keep));
        tokio::time::sleep(Duration::from_millis(6_500)).await;
        assert_eq!(fast.load(Ordering::SeqCst), 6);
        assert_eq!(slow.load(Ordering::SeqCst), 2);
        assert_eq!(keeper.len(), 2);
    }

    /// The task ends with the keeper.
    #[tokio::test(start_paused = true)]
    async fn the_task_ends_when_the_keeper_goes() {
        let keeper = Keeper::default();
        let lease = keeper.keep(Duration::from_secs(1), || Box::pin(async { Renewed::Keep }));
        let task = lock(&keeper.inner.registry).task.take().unwrap();
        lock(&keeper.inner.registry).task = None;
        drop(keeper);
        drop(lease);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("ended")
            .ok();
    }
}
