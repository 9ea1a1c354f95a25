//! Live state of a running poller, shared with the health server, `/status` and the control
//! plane: connected, store reachable, in flight, processed, recent results, the gate, metrics.

use crate::control::replica::ReplicaStats;
use crate::metrics::Metrics;
use crate::outcome::Status;
use poller_core::control::gate::Gate;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Live state, for health, status and the control plane.
#[derive(Default)]
pub struct PollerState {
    pub in_flight: AtomicUsize,
    /// Connected, topology declared, control state applied, consumer attached.
    pub connected: AtomicBool,
    /// The idempotency store answered the last probe (a claim and its release): without it no
    /// command is processed (fail closed), so the replica is not ready either.
    pub store_ok: AtomicBool,
    pub processed: AtomicUsize,
    /// The operator gate (running / paused / halted).
    pub gate: Arc<Gate>,
    pub metrics: Metrics,
    recent: Mutex<VecDeque<(String, Status)>>,
    /// Notified on SIGHUP: the control plane reloads the policy (a permit is kept until a
    /// session listens).
    pub reload: Arc<tokio::sync::Notify>,
    /// The SHA-256 of the policy in force, for `/status`.
    pub policy_sha256: Mutex<String>,
    /// The broker node the session is connected to (URL, password masked), for `/status`.
    pub broker_node: Mutex<Option<String>>,
}

impl PollerState {
    const RECENT: usize = 20;

    pub(crate) fn record(&self, action_id: Option<&str>, status: Status) {
        let mut r = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        r.push_back((action_id.unwrap_or("-").to_owned(), status));
        while r.len() > Self::RECENT {
            r.pop_front();
        }
    }
}

impl ReplicaStats for PollerState {
    fn audit_diverted(&self) {
        self.metrics.audit_diverted();
    }
    fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }
    fn processed(&self) -> usize {
        self.processed.load(Ordering::SeqCst)
    }
    fn policy_changed(&self, digest: &str) {
        *self.policy_sha256.lock().unwrap_or_else(|p| p.into_inner()) = digest.to_owned();
    }
    fn broker_node(&self) -> Option<String> {
        self.broker_node
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
    fn recent_results(&self) -> Vec<(String, Status)> {
        self.recent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}

/// Counts a command in flight for as long as it lives.
pub(crate) struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    pub(crate) fn enter(n: &'a AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::SeqCst);
        InFlight(n)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}
