//! Test doubles for the core's ports (judge, bridge, store), in one place, as linkerd2-proxy
//! keeps its `test_util.rs`. Built for the core's own tests and, with the `test-util` feature,
//! for the other members' tests and the benchmark; never in a release build.
//!
//! In: what a test wants the boundary to do. Out: a `Judge`, `Bridge` or `ResultStore` that
//! does exactly that and counts what it was asked.

use crate::bridge::{Admission, Bridge, BridgeAnswer, BridgeError, BridgeRequest};
use crate::judging::{Judge, JudgeError, JudgeRequest, Panel, Verdict};
use crate::store::{Claim, ResultStore, StoreError};
use futures::future::BoxFuture;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What a scripted judge does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Script {
    Approve,
    Deny,
    /// Fails (a transport error): counts as unavailable.
    Fail,
    /// Never answers: the panel's deadline decides.
    Hang,
}

/// A judge that answers per its script after `delay`, counting the requests it gets.
pub struct ScriptedJudge {
    pub name: String,
    pub script: Script,
    pub delay: Duration,
    pub calls: Arc<AtomicUsize>,
}

impl ScriptedJudge {
    pub fn new(name: &str, script: Script, delay: Duration) -> Self {
        Self {
            name: name.to_owned(),
            script,
            delay,
            calls: Arc::default(),
        }
    }
}

impl Judge for ScriptedJudge {
    fn name(&self) -> &str {
        &self.name
    }

    fn evaluate<'a>(&'a self, _r: &'a JudgeRequest) -> BoxFuture<'a, Result<Verdict, JudgeError>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            if !self.delay.is_zero() {
                tokio::time::sleep(self.delay).await;
            }
            match self.script {
                Script::Approve => Ok(Verdict::Approve {
                    reason: format!("{} approves", self.name),
                }),
                Script::Deny => Ok(Verdict::Deny {
                    reason: format!("{} denies", self.name),
                }),
                Script::Fail => Err(JudgeError::Transport("scripted failure".into())),
                Script::Hang => futures::future::pending().await,
            }
        })
    }
}

/// A panel of scripted judges `(name, script, delay in ms)`, each under `timeout`.
pub fn scripted_panel(judges: Vec<(&str, Script, u64)>, timeout: Duration, quorum: usize) -> Panel {
    Panel::new(
        judges
            .into_iter()
            .map(|(n, s, ms)| {
                (
                    Arc::new(ScriptedJudge::new(n, s, Duration::from_millis(ms))) as Arc<dyn Judge>,
                    timeout,
                )
            })
            .collect(),
        quorum,
    )
}

/// A bridge that answers success at once, without HTTP, counting its calls (to prove what
/// never reached it, or to measure what the HTTP exchange costs). Lookups (`lookup: true`) are
/// counted apart, and answered as remembered unless `forgetful`.
#[derive(Default)]
pub struct RecordingBridge {
    /// Calls that asked it to act.
    pub calls: AtomicUsize,
    /// Calls that asked only for a remembered answer.
    pub lookups: AtomicUsize,
    /// Remembers nothing: a lookup is answered "not remembered".
    pub forgetful: std::sync::atomic::AtomicBool,
}

impl RecordingBridge {
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    pub fn lookups(&self) -> usize {
        self.lookups.load(Ordering::SeqCst)
    }
}

impl Bridge for RecordingBridge {
    fn execute<'a>(
        &'a self,
        r: &'a BridgeRequest,
        _admission: &'a dyn Admission,
    ) -> BoxFuture<'a, Result<BridgeAnswer, BridgeError>> {
        let forgot = r.lookup && self.forgetful.load(Ordering::SeqCst);
        if r.lookup {
            self.lookups.fetch_add(1, Ordering::SeqCst);
        } else {
            self.calls.fetch_add(1, Ordering::SeqCst);
        }
        Box::pin(async move {
            if forgot {
                return Err(BridgeError::NotRemembered {
                    error: "no answer remembered for this request".into(),
                });
            }
            Ok(BridgeAnswer {
                tool_result: serde_json::json!({"status": "success", "integration_status": "connected"}),
                attempts: 1,
            })
        })
    }
}

/// A store in memory that keeps the store contract (claims with owners and expiry, `hold`,
/// `complete` refused to a stale owner), to measure what a real store's I/O costs. Results do
/// not expire.
#[derive(Default)]
pub struct MemStore {
    inner: Mutex<MemInner>,
}

#[derive(Default)]
struct MemInner {
    results: HashMap<String, String>,
    claims: HashMap<String, (String, Instant)>,
    /// approval id → (record, open)
    approvals: HashMap<String, (String, bool)>,
}

impl MemInner {
    fn holder(&self, key: &str) -> Option<&str> {
        self.claims
            .get(key)
            .filter(|(_, until)| *until > Instant::now())
            .map(|(o, _)| o.as_str())
    }

    fn hold(&mut self, key: &str, owner: &str, ttl: Duration) -> Claim {
        match self.holder(key) {
            Some(other) if other != owner => Claim::Busy(other.to_owned()),
            _ => {
                self.claims
                    .insert(key.to_owned(), (owner.to_owned(), Instant::now() + ttl));
                Claim::Mine
            }
        }
    }
}

impl ResultStore for MemStore {
    fn claim<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Claim, StoreError>> {
        let mut m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let answer = match m.results.get(key) {
            Some(r) => Claim::Done(r.clone()),
            None => m.hold(key, owner, ttl),
        };
        Box::pin(async move { Ok(answer) })
    }

    fn hold<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Claim, StoreError>> {
        let answer = self
            .inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .hold(key, owner, ttl);
        Box::pin(async move { Ok(answer) })
    }

    fn complete<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
        result_json: &'a str,
        _retention: Duration,
        _durability: crate::store::Durability,
        after: crate::store::ClaimAfter,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let keep_claim = after == crate::store::ClaimAfter::Kept;
        let mut m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let answer = if m.holder(key) != Some(owner) {
            Err(StoreError::NotOwner)
        } else {
            m.results.insert(key.to_owned(), result_json.to_owned());
            if !keep_claim {
                m.claims.remove(key);
            }
            Ok(())
        };
        Box::pin(async move { answer })
    }

    fn release<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let mut m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if m.holder(key) == Some(owner) {
            m.claims.remove(key);
        }
        Box::pin(async { Ok(()) })
    }

    fn result<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<String>, StoreError>> {
        let m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let answer = m.results.get(key).cloned();
        Box::pin(async move { Ok(answer) })
    }

    fn park<'a>(
        &'a self,
        id: &'a str,
        record: &'a str,
        _retention: Duration,
    ) -> BoxFuture<'a, Result<String, StoreError>> {
        let mut m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let stored = m
            .approvals
            .entry(id.to_owned())
            .or_insert_with(|| (record.to_owned(), true))
            .0
            .clone();
        Box::pin(async move { Ok(stored) })
    }

    fn record<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<String>, StoreError>> {
        let m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let answer = m.approvals.get(id).map(|(r, _)| r.clone());
        Box::pin(async move { Ok(answer) })
    }

    fn swap<'a>(
        &'a self,
        id: &'a str,
        expected: &'a str,
        new: &'a str,
        open: bool,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        let mut m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let swapped = match m.approvals.get_mut(id) {
            Some(entry) if entry.0 == expected => {
                *entry = (new.to_owned(), open);
                true
            }
            _ => false,
        };
        Box::pin(async move { Ok(swapped) })
    }

    fn open_records(&self) -> BoxFuture<'_, Result<Vec<String>, StoreError>> {
        let m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let open = m
            .approvals
            .values()
            .filter(|(_, open)| *open)
            .map(|(r, _)| r.clone())
            .collect();
        Box::pin(async move { Ok(open) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_memory_store_keeps_the_store_contract() {
        let s = MemStore::default();
        let ttl = Duration::from_secs(60);
        assert_eq!(s.claim("k", "a", ttl).await.unwrap(), Claim::Mine);
        assert_eq!(
            s.claim("k", "b", ttl).await.unwrap(),
            Claim::Busy("a".into())
        );
        assert!(matches!(
            s.complete(
                "k",
                "b",
                "{}",
                ttl,
                crate::store::Durability::Buffered,
                crate::store::ClaimAfter::Ended
            )
            .await,
            Err(StoreError::NotOwner)
        ));
        s.complete(
            "k",
            "a",
            "{}",
            ttl,
            crate::store::Durability::Buffered,
            crate::store::ClaimAfter::Kept,
        )
        .await
        .unwrap();
        assert_eq!(
            s.hold("k", "b", ttl).await.unwrap(),
            Claim::Busy("a".into())
        );
        s.complete(
            "k",
            "a",
            "{\"done\":1}",
            ttl,
            crate::store::Durability::Buffered,
            crate::store::ClaimAfter::Ended,
        )
        .await
        .unwrap();
        assert_eq!(
            s.claim("k", "b", ttl).await.unwrap(),
            Claim::Done("{\"done\":1}".into())
        );
    }
}
