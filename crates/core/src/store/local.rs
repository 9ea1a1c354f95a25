//! In-process limits: the slots of a single poller (the embedded store: one poller per file is
//! the whole fleet) and rate windows in memory (tests, and `check-config`, which counts
//! nothing). What the shared stores keep in Redis or PostgreSQL, kept here in a mutex.

use super::{BridgeSlots, Grant, Hit, LimitError, RateWindows};
use futures::future::BoxFuture;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Marks of sent actions kept in memory, at most.
const MAX_MARKS: usize = 100_000;

/// Leases by holder, and markers of actions sent to the bridge.
#[derive(Default)]
pub struct LocalSlots {
    inner: Mutex<LocalInner>,
}

#[derive(Default)]
struct LocalInner {
    leases: HashMap<String, Instant>,
    sent: HashMap<String, Instant>,
}

impl LocalSlots {
    /// Takes a slot (pure bookkeeping at `now`); whether `key` was marked before, if taken.
    fn take(&self, holder: &str, limit: usize, lease: Duration, now: Instant) -> bool {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.leases.retain(|_, until| *until > now);
        if g.leases.len() >= limit && !g.leases.contains_key(holder) {
            return false;
        }
        g.leases.insert(holder.to_owned(), now + lease);
        true
    }

    /// Marks `key` as sent; whether it was marked (and live) before. At most `MAX_MARKS` are
    /// kept: past it, expired marks go, then the ones that expire first, down to half.
    pub fn mark(&self, key: &str, remember: Duration) -> bool {
        let now = Instant::now();
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if g.sent.len() >= MAX_MARKS {
            g.sent.retain(|_, until| *until > now);
            if g.sent.len() >= MAX_MARKS / 2 {
                let mut by_expiry: Vec<(Instant, String)> =
                    g.sent.iter().map(|(k, u)| (*u, k.clone())).collect();
                by_expiry.sort();
                for (_, k) in &by_expiry[..by_expiry.len() - MAX_MARKS / 2] {
                    g.sent.remove(k);
                }
            }
        }
        let earlier = g.sent.get(key).is_some_and(|until| *until > now);
        g.sent.insert(key.to_owned(), now + remember);
        earlier
    }

    /// Whether `key` carries a live mark.
    pub fn marked(&self, key: &str) -> bool {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.sent.get(key).is_some_and(|until| *until > Instant::now())
    }

    pub fn unmark(&self, key: &str) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.sent.remove(key);
    }

    pub fn take_only(&self, holder: &str, limit: usize, lease: Duration) -> bool {
        self.take(holder, limit, lease, Instant::now())
    }

    pub fn renew_now(&self, holder: &str, lease: Duration) -> bool {
        let now = Instant::now();
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        match g.leases.get_mut(holder) {
            Some(until) if *until > now => {
                *until = now + lease;
                true
            }
            _ => false,
        }
    }

    pub fn give_back_now(&self, holder: &str) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.leases.remove(holder);
    }

    pub fn live_holders(&self) -> Vec<String> {
        let now = Instant::now();
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.leases
            .iter()
            .filter(|(_, until)| **until > now)
            .map(|(h, _)| h.clone())
            .collect()
    }
}

impl BridgeSlots for LocalSlots {
    fn try_take<'a>(
        &'a self,
        holder: &'a str,
        limit: usize,
        lease: Duration,
        key: &'a str,
        remember: Duration,
    ) -> BoxFuture<'a, Result<Option<Grant>, LimitError>> {
        Box::pin(async move {
            if !self.take_only(holder, limit, lease) {
                return Ok(None);
            }
            Ok(Some(Grant {
                earlier: self.mark(key, remember),
            }))
        })
    }

    fn renew<'a>(
        &'a self,
        holder: &'a str,
        lease: Duration,
    ) -> BoxFuture<'a, Result<bool, LimitError>> {
        Box::pin(async move { Ok(self.renew_now(holder, lease)) })
    }

    fn give_back<'a>(&'a self, holder: &'a str) -> BoxFuture<'a, Result<(), LimitError>> {
        Box::pin(async move {
            self.give_back_now(holder);
            Ok(())
        })
    }

    fn holders(&self) -> BoxFuture<'_, Result<Vec<String>, LimitError>> {
        Box::pin(async move { Ok(self.live_holders()) })
    }

    fn forget_sent<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), LimitError>> {
        Box::pin(async move {
            self.unmark(key);
            Ok(())
        })
    }

    fn sent<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool, LimitError>> {
        Box::pin(async move { Ok(self.marked(key)) })
    }
}

/// Rate windows in memory: per key, members and when they were counted.
#[derive(Default)]
pub struct MemWindows {
    /// key → (member, counted at Unix milliseconds)
    inner: Mutex<HashMap<String, Vec<(String, u64)>>>,
}

/// The sliding-window rule on one key's events, shared by the in-memory and embedded windows:
/// drops events at or before `cutoff` (now less the window), then counts `member` unless
/// `limit` remain. Times in Unix milliseconds.
pub fn slide(
    events: &mut Vec<(String, u64)>,
    member: &str,
    limit: usize,
    now: u64,
    cutoff: u64,
) -> Hit {
    events.retain(|(_, at)| *at > cutoff);
    if events.iter().any(|(m, _)| m == member) {
        return Hit {
            allowed: true,
            count: events.len(),
        };
    }
    if events.len() >= limit {
        return Hit {
            allowed: false,
            count: events.len(),
        };
    }
    events.push((member.to_owned(), now));
    Hit {
        allowed: true,
        count: events.len(),
    }
}

impl RateWindows for MemWindows {
    fn hit<'a>(
        &'a self,
        key: &'a str,
        member: &'a str,
        limit: usize,
        window: Duration,
    ) -> BoxFuture<'a, Result<Hit, LimitError>> {
        Box::pin(async move {
            let now = crate::store::now_millis();
            let cutoff = now.saturating_sub(window.as_millis() as u64);
            let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            let events = g.entry(key.to_owned()).or_default();
            Ok(slide(events, member, limit, now, cutoff))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_in_memory_stay_bounded_and_keep_the_newest() {
        let slots = LocalSlots::default();
        let long = Duration::from_secs(3600);
        for i in 0..=MAX_MARKS {
            slots.mark(&format!("k{i}"), long);
        }
        let kept = slots.inner.lock().unwrap().sent.len();
        assert!(kept <= MAX_MARKS / 2 + 1, "{kept} marks kept");
        assert!(
            slots.mark(&format!("k{MAX_MARKS}"), long),
            "the newest is kept"
        );
    }

    #[test]
    fn the_window_counts_each_member_once_and_forgets_old_events() {
        let mut ev: Vec<(String, u64)> = Vec::new();
        assert_eq!(slide(&mut ev, "a", 2, 100, 0).count, 1);
        assert!(
            slide(&mut ev, "a", 2, 101, 0).allowed,
            "the same member again"
        );
        assert_eq!(ev.len(), 1);
        assert!(slide(&mut ev, "b", 2, 102, 0).allowed);
        let over = slide(&mut ev, "c", 2, 103, 0);
        assert!(!over.allowed);
        assert_eq!(over.count, 2);
        // A window that starts at 102 holds neither 100 nor 102.
        assert!(slide(&mut ev, "c", 2, 200, 102).allowed);
        assert_eq!(ev.len(), 1);
    }
}
