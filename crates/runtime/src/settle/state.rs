//! Live state of a running poller, shared with the health server, `/status` and the control
//! plane: connected, store reachable, in flight, processed, recent results, the gate, metrics.

use crate::control::replica::ReplicaStats;
use crate::metrics::Metrics;
use crate::outcome::Status;
use poller_core::control::gate::Gate;
use serde::Serialize;
use std::collections::{BTreeMap, VecDeque};
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
    /// How each of the worker's components is doing (`/status`, `/readyz`).
    pub components: Arc<Components>,
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
    fn tripped(&self, scope: &str) {
        self.metrics.tripped(scope);
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

/// The worker's components, as `/status` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Component {
    /// The commands consumer (the session loop).
    Consumer,
    /// The control listener: levers, the state stream, trips.
    ControlReplica,
    /// Approval decisions from the approvals queue.
    ApprovalDesk,
    /// Parked approvals: expired, executed, finalized.
    ApprovalSweeper,
    /// The known-bad and known-good questions to the panel.
    Canary,
    /// The idempotency store's readiness probe.
    StoreProbe,
}

impl Component {
    /// The name `/status` and the logs use (serde's spelling too).
    pub fn name(self) -> &'static str {
        match self {
            Component::Consumer => "consumer",
            Component::ControlReplica => "control_replica",
            Component::ApprovalDesk => "approval_desk",
            Component::ApprovalSweeper => "approval_sweeper",
            Component::Canary => "canary",
            Component::StoreProbe => "store_probe",
        }
    }
}

/// How a component is doing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Health {
    Running,
    /// Up, but holding back on purpose (the consumer while paused or halted).
    Waiting {
        why: String,
    },
    /// Stopped by the supervisor (shutdown, or the end of its session).
    Stopped,
    /// Ended on its own, or answered wrong (the store probe): `error` says how.
    Failed {
        error: String,
    },
}

/// Every component's health: one view, shared by the process and its sessions.
#[derive(Debug, Default)]
pub struct Components(Mutex<BTreeMap<Component, Health>>);

impl Components {
    pub fn set(&self, c: Component, h: Health) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(c, h);
    }

    /// What each component reported last (those never hosted are absent).
    pub fn snapshot(&self) -> BTreeMap<Component, Health> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}
