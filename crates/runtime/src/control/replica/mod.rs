//! The replica's side of control: declares the control topology, reads the stored state
//! before anything is consumed, then listens on its own queue for control messages and for
//! the unapproved attempts every replica shares (the trip counts them all).
//!
//! In: control deliveries and the state stream. Out: gate changes, and what [`render`] builds:
//! events (`event.*`) with their audit records, replies to the operator's `reply_to`, alerts
//! (halt, refused levers, trips, an untrusted state) and, on a trip, the new stored state and a
//! `control.pause` for the other replicas.
//!
//! The stored state is the one path by which control state reaches the replica: a lever is
//! answered once the state it enforces shows the change (`levers.rs`), never applied by itself.
//!
//! One file per concern: `stored.rs` (reading, applying and following the stored state),
//! `levers.rs` (operators' levers and what they publish), `trips.rs` (the cross-replica trip),
//! `quarantine.rs` (one agent held out), `cut.rs` (a service revoked or disconnected at the
//! provider, and reconnected), `policy.rs` (the policy reload and its record),
//! [`render`] (every control message, pure); this file holds the replica and its listen loop.

mod cut;
mod grants;
mod levers;
mod policy;
mod quarantine;
pub mod render;
mod stored;
mod trips;

pub use render::{ControlEvent, Names, ReplicaReply};
pub use stored::Follower;

use super::state_log;
use crate::broker::{BrokerError, Publisher};
use crate::outcome::Status;
use crate::policy::shared::SharedPolicy;
use futures::StreamExt;
use lapin::options::BasicAckOptions;
use poller_core::control::gate::{Changed, Gate};
use poller_core::control::trip::TripWire;
use poller_core::control::ControlSettings;
use poller_core::control::ControlState;
use std::sync::{Arc, Mutex};

/// Who may write the stored state, by broker user: operators and the poller's own user.
pub fn state_writer(
    operators: &[String],
    poller_user: &str,
) -> impl Fn(Option<&str>) -> state_log::Writer + Send + Sync + 'static {
    let operators = operators.to_vec();
    let poller_user = poller_user.to_owned();
    move |user| match user {
        Some(u) if operators.iter().any(|o| o == u) => state_log::Writer::Operator,
        Some(u) if u == poller_user => state_log::Writer::Poller,
        _ => state_log::Writer::Untrusted,
    }
}

/// What the replica reports about itself.
pub trait ReplicaStats: Send + Sync {
    /// Counts an audit record the audit exchange refused.
    fn audit_diverted(&self) {}
    /// Counts an automatic trip this replica fired (`fleet` or `agent`).
    fn tripped(&self, _scope: &str) {}
    fn in_flight(&self) -> usize;
    fn processed(&self) -> usize;
    fn recent_results(&self) -> Vec<(String, Status)>;
    /// The digest of the policy now in force (for `/status`).
    fn policy_changed(&self, _digest: &str) {}
    /// The broker node the replica is connected to, password masked.
    fn broker_node(&self) -> Option<String> {
        None
    }
}

pub struct Replica {
    /// Its own section: exchanges, the state stream, operators, trips.
    control: ControlSettings,
    names: Names,
    gate: Arc<Gate>,
    trip: Mutex<TripWire>,
    stats: Arc<dyn ReplicaStats>,
    /// The policy in force, reloaded by the `policy reload` lever and by SIGHUP.
    policy: Arc<SharedPolicy>,
    /// Signalled on SIGHUP: reload the policy (held until a session listens).
    reload: Arc<tokio::sync::Notify>,
    /// Quarantine requests already announced here (the tripping replica announces its own and
    /// then receives its own lever; a lever can be delivered again after a reconnect).
    announced: Mutex<std::collections::VecDeque<String>>,
    /// The offset of the last state entry this replica read: its own entries' `after`.
    state_position: Mutex<Option<u64>>,
    /// Carries a revoke or disconnect out through the bridge.
    cutter: Arc<crate::control::cut::Cutter>,
}

/// What brought a change to the enforced state (for the log line every change writes).
#[derive(Debug, Clone, Copy)]
enum Cause {
    /// The stored state, read before anything is consumed.
    StoredAtStart,
    /// The stored state, followed while running (an operator's lever, another replica's trip).
    StoredFollowed,
    /// The stored state, read afresh because a lever was not shown in time (the follower may
    /// be behind or stuck), or because it could not be read before.
    StoredReread,
    /// A stored state that can't be trusted, held at least paused.
    Untrusted,
    /// This replica's own trip (unapproved attempts, a failed canary).
    Trip,
}

impl Cause {
    fn as_str(self) -> &'static str {
        match self {
            Cause::StoredAtStart => "stored state at start",
            Cause::StoredFollowed => "stored state followed",
            Cause::StoredReread => "stored state read afresh",
            Cause::Untrusted => "untrusted stored state",
            Cause::Trip => "trip",
        }
    }
}

impl Replica {
    /// The one way this replica changes what it enforces (the stored state, a state that can't
    /// be trusted, its own trip; never a lever by itself): `decide` runs on the enforced state under the gate's lock (see [`Gate::enforce`]), and
    /// every change is logged with its cause. The callers announce what changed.
    fn enforce<R>(
        &self,
        cause: Cause,
        decide: impl FnOnce(&ControlState) -> (Option<ControlState>, R),
    ) -> (R, Changed) {
        let (r, changed) = self.gate.enforce(decide);
        if changed != Changed::default() {
            let s = self.gate.state();
            tracing::info!(
                cause = cause.as_str(),
                mode = s.mode.as_str(),
                seq = s.seq,
                mode_changed = changed.mode,
                quarantine_changed = changed.quarantine,
                quarantined = s.quarantined.len(),
                revoked_changed = changed.revoked,
                revoked = s.revoked.len(),
                "enforcing a new control state"
            );
        }
        (r, changed)
    }

    fn set_state_position(&self, p: Option<u64>) {
        *self
            .state_position
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = p;
    }

    /// The `after` of an entry this replica writes.
    fn state_position(&self) -> Option<u64> {
        *self
            .state_position
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    pub fn new(
        control: ControlSettings,
        names: Names,
        gate: Arc<Gate>,
        stats: Arc<dyn ReplicaStats>,
        policy: Arc<SharedPolicy>,
        reload: Arc<tokio::sync::Notify>,
        cutter: Arc<crate::control::cut::Cutter>,
    ) -> Self {
        let trip = Mutex::new(TripWire::new(control.trips.clone()));
        Self {
            control,
            names,
            gate,
            trip,
            stats,
            policy,
            reload,
            announced: Mutex::new(Default::default()),
            state_position: Mutex::new(None),
            cutter,
        }
    }

    /// Handles control deliveries and follows the stored state until either ends. A lever is
    /// answered once the state this replica enforces shows it ([`levers::Pending`]); one not
    /// shown within [`levers::SHOWN_WITHIN`] makes the replica read the stream afresh.
    pub async fn listen(
        self: Arc<Self>,
        mut consumer: lapin::Consumer,
        mut follower: Follower,
        publisher: Publisher,
    ) -> Result<(), BrokerError> {
        let mut pending: Vec<levers::Pending> = Vec::new();
        loop {
            let due = pending.iter().map(|p| p.deadline).min();
            let d = tokio::select! {
                d = consumer.next() => d,
                _ = self.reload.notified() => {
                    self.reload_policy(&publisher, "SIGHUP", "").await?;
                    continue;
                }
                _ = tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)), if due.is_some() => {
                    // The follower did not bring a lever's change in time: it may be behind, or
                    // its consumer stuck. Read the stream afresh, then answer.
                    if !follower.is_open() {
                        tracing::warn!("the control state channel closed; restarting the session");
                        return Ok(());
                    }
                    tracing::warn!(levers = pending.len(), "a lever was not shown by the followed state in time; reading the stored state afresh");
                    self.read_stored(&mut follower, &publisher, Cause::StoredReread).await?;
                    self.answer_shown(&mut pending, &publisher, true).await?;
                    continue;
                }
                folded = follower.changed() => {
                    self.set_state_position(follower.position());
                    match folded {
                        Ok(f) => self.apply_stored(&publisher, f, Cause::StoredFollowed).await?,
                        Err(state_log::ReadError::Broker(e)) => return Err(e),
                        Err(e) => {
                            // The stream consumer is gone: restart the session (and re-read).
                            tracing::warn!(error = %e, "stopped following the control state");
                            return Ok(());
                        }
                    }
                    self.answer_shown(&mut pending, &publisher, false).await?;
                    continue;
                }
            };
            let Some(d) = d else { return Ok(()) };
            let d = d?;
            let user = d.properties.user_id().as_ref().map(|u| u.to_string());
            let reply_to = d.properties.reply_to().as_ref().map(|u| u.to_string());
            let key = d.routing_key.to_string();
            let outcome = if key.starts_with("attempt.") {
                self.on_attempt(&d.data, user.as_deref(), &publisher).await
            } else {
                match self
                    .on_control(&d.data, user.as_deref(), reply_to, &publisher)
                    .await
                {
                    Ok(Some(lever)) => {
                        pending.push(lever);
                        self.answer_shown(&mut pending, &publisher, false).await
                    }
                    Ok(None) => Ok(()),
                    Err(e) => Err(e),
                }
            };
            if let Err(e) = outcome {
                if e.is_connection() {
                    return Err(e);
                }
                tracing::error!(error = %e, "control message handling failed");
            }
            let _ = d.acker.ack(BasicAckOptions::default()).await;
        }
    }
}
