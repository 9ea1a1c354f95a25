//! The pipeline for one command, as named stages: intake → identity → admission → claim →
//! policy → panel → bridge → past → conclude.
//!
//! In: an [`Inbound`] message (payload and the AMQP properties that matter). Out: a
//! [`Disposition`]: defer it, dead-letter it, conclude it, replay its stored result, or answer a
//! lookup. Each stage is a method of its own file that returns what the next stage needs or
//! the disposition that ends the command there; [`Pipeline::process`] strings them together.
//! No broker I/O happens here; the worker carries the disposition out and only then acks.

mod approved;
mod bridge;
mod claim;
mod conclude;
mod disposition;
mod draft;
mod intake;
mod panel;
mod past;
mod policy;
mod replay;
pub mod settings;

pub use disposition::{Concluded, DeadLetter, DeadLetterBody, Disposition, Publication};

use crate::bridge::signing::Secret;
use crate::bridge::{Bridge, BridgeParams, BridgeRequest};
use crate::intake::{
    decode, identify, reply_target, salvage_action_id, ActionId, Agent, AgentId, Command,
    CommandType, DecodeLimits, ReplyTarget, Service,
};
use crate::judging::history::AttemptHistory;
use crate::judging::{JudgeRequest, Panel, PanelOutcome, PanelReport};
use crate::outcome::PanelSummary;
use crate::outcome::{
    alerts_for, AgentView, BridgeSummary, JudgeVote, ResultMessage, SeverityView, Status,
};
use crate::policy::shared::SharedPolicy;
use crate::policy::{Decision, Facts, Handling, Policy};
use crate::store::{
    ClaimGuard, Claims, Keeper, ResultStore, Slots, StoredOutcome, Taken, Unsealed, Waiters,
};
use draft::{
    approvers, deferred, lenient_reply, panel_rationale, quarantine_reason, rejected_event, Draft,
    Trace,
};
use poller_core::approval::Parked;
use poller_core::audit::AuditEvent;
use poller_core::control::gate::{Gate, Held};
use poller_core::control::trip::UnapprovedAttempt;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::Instrument;

/// What the pipeline needs of a delivery.
#[derive(Debug, Clone, Default)]
pub struct Inbound {
    pub payload: Vec<u8>,
    /// The broker-validated publishing user.
    pub user_id: Option<String>,
    pub reply_to: Option<String>,
    pub content_type: Option<String>,
    pub routing_key: String,
    pub redelivered: bool,
    /// The AMQP `type` ([`crate::broker::names::message_type::LOOKUP`] marks a lookup).
    pub message_type: Option<String>,
}

/// One command's way through the stages. Built once per replica with [`Pipeline::new`]; its
/// parts are private to the stages.
pub struct Pipeline {
    limits: DecodeLimits,
    allow_unverified: bool,
    /// Per-agent admission, counted for the fleet in the shared store; `None`: off.
    admission: Option<Admission>,
    /// The policy in force; each command takes one snapshot and is decided by it alone.
    policy: Arc<SharedPolicy>,
    panel: Panel,
    /// Where the uses of scoped grants are counted (the shared store's rate windows).
    grant_uses: Arc<dyn crate::store::RateWindows>,
    bridge: Arc<dyn Bridge>,
    instance: String,
    /// Recent attempts per agent and type: context for the judges.
    history: AttemptHistory,
    /// The operator gate: consulted before the judges and before every bridge call.
    gate: Arc<Gate>,
    /// The fleet's bridge slots (Apps Script allows 30 simultaneous executions per user, for
    /// every replica together); the gate is checked after a slot is taken, so a pause also holds
    /// back queued calls.
    bridge_slots: Slots,
    /// Final results by `<agent>/<action_id>`.
    store: Arc<dyn ResultStore>,
    /// How this replica takes claims (the store, the TTL, the keeper renewing live ones).
    claims: Claims,
    wait_for_in_flight: Duration,
    /// Copies of in-flight actions waiting on this replica, capped per agent.
    waiting: Waiters,
    /// How long final results are kept and replayed.
    retention: Duration,
    /// Seals stored outcomes (HMAC), so a planted value is refused, not replayed.
    store_key: Secret,
}

/// What the first stages need: intake's limits, identity's rule on unverified agents, and
/// the per-agent admission (`None`: off).
pub struct IntakeParts {
    pub limits: DecodeLimits,
    pub allow_unverified: bool,
    pub admission: Option<Admission>,
}

/// What decides: the policy in force, the judges' panel, and where the uses of scoped grants
/// (which stand in for a human's approval) are counted for the fleet.
pub struct Deciders {
    pub policy: Arc<SharedPolicy>,
    pub panel: Panel,
    pub grant_uses: Arc<dyn crate::store::RateWindows>,
}

/// What carries an approved command out: the bridge, the operator gate in front of it, and
/// the fleet's bridge slots.
pub struct Execution {
    pub bridge: Arc<dyn Bridge>,
    pub gate: Arc<Gate>,
    pub slots: Slots,
}

/// Where claims and final results are kept, and how long.
pub struct Keeping {
    pub store: Arc<dyn ResultStore>,
    /// Seals stored outcomes (HMAC).
    pub store_key: Secret,
    pub claim_ttl: Duration,
    /// How long a copy of an in-flight action waits for it.
    pub wait_for_in_flight: Duration,
    /// Fresh copies of in-flight actions one agent may have waiting on this replica.
    pub max_waiting_per_agent: usize,
    /// How long final results are kept and replayed.
    pub retention: Duration,
}

/// Per-agent admission at intake: at most `limit.count` commands per agent within
/// `limit.window`, for the whole fleet.
pub struct Admission {
    pub windows: Arc<dyn crate::store::RateWindows>,
    pub limit: crate::pipeline::settings::AdmissionLimit,
}

/// A stage ending the command here, with its disposition (boxed: the stages' `Ok` values are
/// small).
type Stop = Box<Disposition>;

/// Why a command went back to the queue.
struct Deferred(String);

/// How long a command waits before going back to the queue when the store can't be asked (for
/// its claim or a bridge slot): each requeue spends one of its deliveries.
const STORE_DOWN_PAUSE: Duration = Duration::from_secs(1);

use crate::clock::now_rfc3339;

impl Pipeline {
    /// A replica's pipeline (`instance` names the replica in results and claims).
    pub fn new(
        instance: impl Into<String>,
        intake: IntakeParts,
        deciders: Deciders,
        execution: Execution,
        keeping: Keeping,
    ) -> Self {
        let instance = instance.into();
        Self {
            claims: Claims {
                store: keeping.store.clone(),
                instance: instance.clone(),
                ttl: keeping.claim_ttl,
                retention: keeping.retention,
                keeper: Keeper::default(),
            },
            limits: intake.limits,
            allow_unverified: intake.allow_unverified,
            admission: intake.admission,
            policy: deciders.policy,
            panel: deciders.panel,
            grant_uses: deciders.grant_uses,
            bridge: execution.bridge,
            instance,
            history: AttemptHistory::default(),
            gate: execution.gate,
            bridge_slots: execution.slots,
            store: keeping.store,
            wait_for_in_flight: keeping.wait_for_in_flight,
            waiting: Waiters::new(keeping.max_waiting_per_agent),
            retention: keeping.retention,
            store_key: keeping.store_key,
        }
    }

    /// The policy in force (shared with the approval desk, reloaded by the control plane).
    /// What the control side carries a revoke or disconnect out with: this replica's bridge,
    /// and its result store for the lever's claim and report.
    pub fn cutter(&self) -> crate::control::cut::Cutter {
        let claims = Claims {
            store: self.store.clone(),
            instance: self.instance.clone(),
            ttl: self.claims.ttl,
            retention: self.retention,
            keeper: self.claims.keeper.clone(),
        };
        crate::control::cut::Cutter::new(self.bridge.clone(), claims, self.store_key.clone())
    }

    pub fn policy(&self) -> &Arc<SharedPolicy> {
        &self.policy
    }

    /// Where the uses of scoped grants are counted (the approval desk lists them).
    pub fn grant_uses(&self) -> &Arc<dyn crate::store::RateWindows> {
        &self.grant_uses
    }

    /// The judges' panel (the canaries convene it too).
    pub fn panel(&self) -> &Panel {
        &self.panel
    }

    /// Where claims and final results are kept.
    pub fn store(&self) -> &Arc<dyn ResultStore> {
        &self.store
    }

    /// The key that seals stored outcomes.
    pub fn store_key(&self) -> &Secret {
        &self.store_key
    }

    /// Processes one message. Never fails: every outcome is a disposition.
    pub async fn process(&self, msg: &Inbound) -> Disposition {
        let span = tracing::info_span!(
            "command",
            action_id = tracing::field::Empty,
            agent = tracing::field::Empty,
            command_type = tracing::field::Empty,
            redelivered = msg.redelivered,
        );
        async {
            let mut t = self.trace(msg);
            match self.stages(msg, &mut t).await {
                Ok(d) => d,
                Err(stop) => *stop,
            }
        }
        .instrument(span)
        .await
    }

    /// The stages in order; each `?` is a stage ending the command with its disposition.
    async fn stages(&self, msg: &Inbound, t: &mut Trace) -> Result<Disposition, Stop> {
        let cmd = self.intake(msg, t)?;
        let (agent, reply) = self.identity(msg, &cmd, t)?;
        if msg.message_type.as_deref() == Some(crate::broker::names::message_type::LOOKUP) {
            let draft = t.draft();
            return Ok(self.lookup(&agent, &cmd, reply, t.trail(), draft).await);
        }
        self.admission(&agent, &cmd, &reply, t).await?;
        let claimed = self.claim(msg, &agent, &cmd, &reply, t).await?;
        let subject = draft::Subject {
            msg,
            agent: &agent,
            cmd: &cmd,
        };
        if let Some(refusal) = self.lever_refusal(&agent, &cmd, t) {
            return Ok(self.refuse(subject, reply, claimed, refusal, t).await);
        }
        let (policy, decision) = self.decide(&agent, &cmd, t);
        let result = match self.act(&cmd, &agent, &decision, t).await {
            Ok(r) => r,
            Err(Deferred(why)) => return Ok(deferred(why, Some(claimed.guard), t.trail())),
        };
        // Ending without a bridge call of its own: an earlier attempt's call may decide it.
        let result = match self.past(&cmd, &agent, &result).await {
            Ok(past::Past::None) => result,
            Ok(past::Past::Sent(r)) => *r,
            Err(Deferred(why)) => return Ok(deferred(why, Some(claimed.guard), t.trail())),
        };
        Ok(self
            .finish(subject, reply, &policy, claimed, result, t)
            .await)
    }

    /// A new command's trace: received, with the agent as far as the broker vouches for it.
    fn trace(&self, msg: &Inbound) -> Trace {
        let span = tracing::Span::current();
        let trail = vec![AuditEvent::Received {
            at: now_rfc3339(),
            payload_sha256: hex::encode(Sha256::digest(&msg.payload)),
            payload_bytes: msg.payload.len(),
            routing_key: msg.routing_key.clone(),
            redelivered: msg.redelivered,
        }];
        let mut draft = Draft {
            received_at: now_rfc3339(),
            instance: self.instance.clone(),
            ..Draft::default()
        };
        // Identity as far as the broker vouches for it, for replies to rejected messages.
        let broker_agent = msg
            .user_id
            .as_deref()
            .and_then(|u| AgentId::parse(u).ok())
            .map(|id| Agent { id, verified: true });
        if let Some(a) = &broker_agent {
            span.record("agent", a.id.as_str());
            draft.agent = Some(AgentView::from(a));
        }
        Trace {
            span,
            trail,
            draft,
            broker_agent,
        }
    }
}

#[cfg(test)]
mod tests;
