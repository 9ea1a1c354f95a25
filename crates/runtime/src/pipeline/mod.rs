//! The pipeline for one command: intake → policy → judging → bridge → outcome.
//!
//! In: an [`Inbound`] message (payload and the AMQP properties that matter). Out: a
//! [`Disposition`]: defer it, dead-letter it, conclude it, or replay its stored result. No
//! broker I/O happens here; the worker carries the disposition out and only then acks.

mod disposition;

pub use disposition::{Concluded, DeadLetter, DeadLetterBody, Disposition, Publication};

use crate::bridge::{Bridge, BridgeParams, BridgeRequest};
use crate::intake::{
    self, decode, identify, reply_target, salvage_action_id, ActionId, Agent, AgentId, Command,
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
use crate::store::{ClaimGuard, ResultStore, StoredOutcome, Taken, Unsealed};
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

pub struct Pipeline {
    pub limits: DecodeLimits,
    pub allow_unverified: bool,
    /// Per-agent admission, counted for the fleet in the shared store; `None`: off.
    pub admission: Option<Admission>,
    /// The policy in force; each command takes one snapshot and is decided by it alone.
    pub policy: Arc<SharedPolicy>,
    pub panel: Panel,
    pub bridge: Arc<dyn Bridge>,
    pub instance: String,
    /// Recent attempts per agent and type: context for the judges.
    pub history: AttemptHistory,
    /// The operator gate: consulted before the judges and before every bridge call.
    pub gate: Arc<Gate>,
    /// The fleet's bridge slots (Apps Script allows 30 simultaneous executions per user, for
    /// every replica together); the gate is checked after a slot is taken, so a pause also holds
    /// back queued calls.
    pub bridge_slots: crate::store::Slots,
    /// Final results by `<agent>/<action_id>`.
    pub store: Arc<dyn ResultStore>,
    pub claim_ttl: Duration,
    pub wait_for_in_flight: Duration,
    /// Copies of in-flight actions waiting on this replica, capped per agent.
    pub waiting: crate::store::Waiters,
    /// How long final results are kept and replayed.
    pub retention: Duration,
    /// Seals stored outcomes (HMAC), so a planted value is refused, not replayed.
    pub store_key: crate::bridge::signing::Secret,
}

/// Per-agent admission at intake: at most `limit.count` commands per agent within
/// `limit.window`, for the whole fleet.
pub struct Admission {
    pub windows: Arc<dyn crate::store::RateWindows>,
    pub limit: crate::settings::AdmissionLimit,
}

/// Why a command went back to the queue.
struct Deferred(String);

/// How long a command waits before going back to the queue when the store can't be asked (for
/// its claim or a bridge slot): each requeue spends one of its deliveries.
const STORE_DOWN_PAUSE: Duration = Duration::from_secs(1);

use crate::clock::now_rfc3339;

/// Fields known so far, to build a result at whatever stage the command stops.
struct Draft {
    received_at: String,
    instance: String,
    action_id: Option<ActionId>,
    command_type: Option<CommandType>,
    service: Option<Service>,
    agent: Option<AgentView>,
    severity: Option<SeverityView>,
    judges: Vec<JudgeVote>,
    panel: Option<crate::outcome::PanelSummary>,
}

impl Draft {
    /// The fields of a parked command, for its final result.
    fn of(rec: &Parked, instance: &str) -> Self {
        Self {
            received_at: rec.received_at.clone(),
            instance: instance.to_owned(),
            action_id: Some(rec.action_id.clone()),
            command_type: Some(rec.command_type),
            service: Some(rec.service.clone()),
            agent: Some(rec.agent.clone()),
            severity: rec.severity_view.clone(),
            judges: rec.judges.clone(),
            panel: rec.panel,
        }
    }

    fn finish(self, status: Status, rationale: String) -> ResultMessage {
        ResultMessage {
            action_id: self.action_id,
            command_type: self.command_type,
            service: self.service,
            agent: self.agent,
            status,
            rationale,
            tool_result: None,
            judges: self.judges,
            panel: self.panel,
            severity: self.severity,
            error_field: None,
            bridge: None,
            received_at: self.received_at,
            completed_at: now_rfc3339(),
            poller_instance: self.instance,
            replay: false,
            approval: None,
            approvals: Vec::new(),
        }
    }

    fn rejected(self, field: &str, reason: String) -> ResultMessage {
        let mut r = self.finish(Status::Rejected, format!("Command rejected: {reason}"));
        r.error_field = Some(field.to_owned());
        r
    }
}

/// The rationale of a judged command: the outcome, the count and the rule that decided.
fn panel_rationale(report: &PanelReport, s: &PanelSummary) -> String {
    use crate::judging::DecisionRule;
    let needed = s.rule.approvals_needed(s.size, s.quorum);
    match (report.outcome, &report.veto) {
        (PanelOutcome::NotApproved, Some((judge, rule, reason))) => format!(
            "Vetoed by the {judge} judge's hard rule {rule} ({reason}); a veto is not outvoted: a human must approve this action."
        ),
        (PanelOutcome::NotApproved, None) => {
            let why = match s.rule {
                DecisionRule::Majority => format!("{needed} needed"),
                DecisionRule::Unanimous => format!("the unanimous rule needs all {}", s.size),
                DecisionRule::Veto if s.denials > 0 => "under the veto rule one deny denies".into(),
                DecisionRule::Veto => format!("the veto rule needs {needed} approvals and no deny"),
            };
            format!(
                "Not approved by the judges ({} of {} approved; {why}): a human must approve this action.",
                s.approvals, s.size
            )
        }
        (PanelOutcome::Approved, _) => match s.rule {
            DecisionRule::Majority => format!("Approved by the judges ({} of {}).", s.approvals, s.size),
            rule => format!(
                "Approved by the judges ({} of {}) under the {rule} rule.",
                s.approvals, s.size
            ),
        },
    }
}

impl Pipeline {
    /// Processes one message. Never fails: every outcome is a disposition.
    pub async fn process(&self, msg: &Inbound) -> Disposition {
        let span = tracing::info_span!(
            "command",
            action_id = tracing::field::Empty,
            agent = tracing::field::Empty,
            command_type = tracing::field::Empty,
            redelivered = msg.redelivered,
        );
        self.process_inner(msg).instrument(span).await
    }

    async fn process_inner(&self, msg: &Inbound) -> Disposition {
        let span = tracing::Span::current();
        let mut trail = vec![AuditEvent::Received {
            at: now_rfc3339(),
            payload_sha256: hex::encode(Sha256::digest(&msg.payload)),
            payload_bytes: msg.payload.len(),
            routing_key: msg.routing_key.clone(),
            redelivered: msg.redelivered,
        }];
        let mut draft = Draft {
            received_at: now_rfc3339(),
            instance: self.instance.clone(),
            action_id: None,
            command_type: None,
            service: None,
            agent: None,
            severity: None,
            judges: Vec::new(),
            panel: None,
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

        if msg.payload.len() > self.limits.max_payload_bytes {
            // Not parsed, not copied, not re-published: its digest and size are its trace.
            let reason = format!(
                "payload of {} bytes exceeds the limit of {} bytes",
                msg.payload.len(),
                self.limits.max_payload_bytes
            );
            tracing::warn!(
                bytes = msg.payload.len(),
                "oversized command; dead-lettering its digest, not its body"
            );
            trail.push(rejected_event("payload", &reason));
            return Disposition::DeadLetter {
                letter: DeadLetter {
                    field: "payload".into(),
                    reason,
                    body: DeadLetterBody::Withheld {
                        sha256: hex::encode(Sha256::digest(&msg.payload)),
                        bytes: msg.payload.len(),
                    },
                },
                result: None,
                reply: ReplyTarget::None,
                audit: trail,
            };
        }
        let cmd = match decode(&msg.payload, msg.content_type.as_deref(), self.limits) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(field = e.field(), error = %e, "undecodable command; dead-lettering");
                draft.action_id = salvage_action_id(&msg.payload, self.limits);
                if let Some(a) = &draft.action_id {
                    span.record("action_id", a.as_str());
                }
                let reply = lenient_reply(msg.reply_to.as_deref(), broker_agent.as_ref());
                let result = draft
                    .action_id
                    .is_some()
                    .then(|| draft.rejected(e.field(), e.to_string()));
                trail.push(rejected_event(e.field(), &e.to_string()));
                return Disposition::DeadLetter {
                    letter: DeadLetter {
                        field: e.field().to_owned(),
                        reason: e.to_string(),
                        body: DeadLetterBody::Original,
                    },
                    result,
                    reply,
                    audit: trail,
                };
            }
        };
        span.record("action_id", cmd.action_id.as_str());
        span.record("command_type", cmd.command_type.as_str());
        draft.action_id = Some(cmd.action_id.clone());
        draft.command_type = Some(cmd.command_type);
        draft.service = Some(cmd.service.clone());

        let agent = match identify(
            msg.user_id.as_deref(),
            cmd.claimed_agent.as_ref(),
            self.allow_unverified,
        ) {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "command refused: identity");
                let reply = lenient_reply(msg.reply_to.as_deref(), broker_agent.as_ref());
                trail.push(rejected_event(e.field(), &e.to_string()));
                let result = draft.rejected(e.field(), e.to_string());
                return Disposition::Conclude {
                    outcome: self.conclude(result, reply, trail),
                    claim: None,
                };
            }
        };
        span.record("agent", agent.id.as_str());
        draft.agent = Some(AgentView::from(&agent));

        let reply = match reply_target(msg.reply_to.as_deref(), &agent) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "command refused: reply_to");
                trail.push(rejected_event("reply_to", &e.to_string()));
                let result = draft.rejected("reply_to", e.to_string());
                return Disposition::Conclude {
                    outcome: self.conclude(result, ReplyTarget::None, trail),
                    claim: None,
                };
            }
        };

        if msg.message_type.as_deref() == Some(crate::broker::names::message_type::LOOKUP) {
            return self.lookup(&agent, &cmd, reply, trail, draft).await;
        }

        if let Some(a) = &self.admission {
            // Before the claim, the judges and the bridge: a flood is refused at the cost of
            // one count in the shared store. A redelivered command counts once (its action_id
            // is the member).
            let key = agent.admission_key();
            match a
                .windows
                .hit(&key, cmd.action_id.as_str(), a.limit.count, a.limit.window)
                .await
            {
                Ok(hit) if hit.allowed => {}
                Ok(hit) => {
                    let reason = format!(
                        "agent {} sent more than {} commands within {} s (the fleet's per-agent limit; {} counted); send it again later",
                        agent.id,
                        a.limit.count,
                        a.limit.window.as_secs(),
                        hit.count
                    );
                    trail.push(rejected_event("rate_limited", &reason));
                    let result = draft.rejected("rate_limited", reason);
                    return Disposition::Conclude {
                        outcome: self.conclude(result, reply, trail),
                        claim: None,
                    };
                }
                Err(e) => {
                    tracing::error!(error = %e, "admission count unavailable; not processing (fail closed)");
                    tokio::time::sleep(STORE_DOWN_PAUSE).await;
                    return deferred(e.to_string(), None, trail);
                }
            }
        }

        // Idempotency: per agent, so one agent can't pre-empt another's action_ids.
        // Unverified agents (where allowed) have a key space of their own.
        let digest = crate::store::command_digest(&agent, &cmd);
        let key = crate::store::action_key(&agent, &cmd.action_id);
        let take = |wait| {
            ClaimGuard::take(
                self.store.clone(),
                key.clone(),
                &self.instance,
                self.claim_ttl,
                self.retention,
                wait,
            )
        };
        // A copy of an action in flight waits for its result, holding its delivery slot: only
        // a few fresh copies per agent at a time, so copies of one slow action can't take every
        // slot. A redelivered message always waits: it may be the original itself, back after a
        // crash while its dead claim runs out, and must never be turned away.
        let taken = match take(Duration::ZERO).await {
            Ok(Taken::Busy(_)) if msg.redelivered => take(self.wait_for_in_flight).await,
            Ok(Taken::Busy(owner)) => match self.waiting.enter(agent.admission_key().as_str()) {
                Some(_place) => take(self.wait_for_in_flight).await,
                None => {
                    let reason = format!(
                        "a copy of action {} of agent {}, which is in flight on {owner}; {} copies of this agent's in-flight actions already wait on this replica, so this one does not (the original's result is published when it concludes)",
                        cmd.action_id,
                        agent.id,
                        self.waiting.cap()
                    );
                    tracing::warn!("{reason}");
                    trail.push(rejected_event("action_id", &reason));
                    return Disposition::DeadLetter {
                        letter: DeadLetter {
                            field: "action_id".into(),
                            reason,
                            body: DeadLetterBody::Original,
                        },
                        result: None,
                        reply,
                        audit: trail,
                    };
                }
            },
            other => other,
        };
        let claim = match taken {
            Ok(Taken::Mine(guard)) => guard,
            Ok(Taken::Done(stored)) => {
                return self
                    .replay(key, &digest, &stored, reply, trail, draft)
                    .await
            }
            Ok(Taken::Busy(owner)) => {
                return deferred(
                    format!("a duplicate of an action in flight on {owner}"),
                    None,
                    trail,
                );
            }
            Err(e) => {
                tracing::error!(error = %e, "idempotency store unavailable; not processing (fail closed)");
                // Don't spin on a store that is down: the requeue costs a delivery.
                tokio::time::sleep(STORE_DOWN_PAUSE).await;
                return deferred(e.to_string(), None, trail);
            }
        };

        if let Some(q) = self.gate.quarantine_of(&agent.control_key()) {
            // Never judged or executed; not stored, so the agent's own retry after a release
            // is decided afresh.
            let reason = quarantine_reason(&agent.control_key(), &q);
            tracing::warn!(by = %q.by, "command refused: agent in quarantine");
            if let Err(e) = claim.release().await {
                tracing::warn!(error = %e, "could not release the claim of a quarantined agent's command; it expires");
            }
            trail.push(rejected_event("agent", &reason));
            let result = draft.rejected("agent", reason);
            return Disposition::Conclude {
                outcome: self.conclude(result, reply, trail),
                claim: None,
            };
        }
        // One snapshot for the whole command: a reload meanwhile decides the next one.
        let policy = self.policy.snapshot();
        let history = &self.history;
        let earlier = |w: Duration| history.count_within(agent.id.as_str(), cmd.command_type, w);
        let decision = policy.decide(
            &cmd,
            &Facts {
                agent: Some(agent.id.as_str()),
                verified: agent.verified,
                earlier_attempts: &earlier,
            },
        );
        for s in &decision.shadows {
            tracing::info!(rule = %s.rule, would_have = s.would_have.as_str(), "shadow rule matched");
        }
        draft.severity = Some(SeverityView {
            declared: decision.declared_severity,
            effective: decision.effective_severity,
            mismatch: decision.severity_mismatch,
        });
        if decision.severity_mismatch {
            tracing::warn!(
                declared = %decision.declared_severity,
                effective = %decision.effective_severity,
                "declared severity below the policy floor; handled at the floor"
            );
        }
        tracing::info!(handling = ?decision.handling, "policy decided");
        trail.push(AuditEvent::PolicyDecision {
            at: now_rfc3339(),
            handling: decision.handling,
            declared_severity: decision.declared_severity,
            effective_severity: decision.effective_severity,
            severity_mismatch: decision.severity_mismatch,
            rationale: decision.rationale.clone(),
            policy_sha256: policy.digest().to_owned(),
            command: Some(poller_core::audit::DecidedCommand {
                command_type: cmd.command_type,
                service: cmd.service.clone(),
                agent: agent.id.to_string(),
                agent_verified: agent.verified,
            }),
            rule: Some(decision.rule.clone()),
            shadows: decision.shadows.clone(),
        });

        let result = match decision.handling {
            Handling::Block => Ok(draft.finish(Status::Blocked, decision.rationale.clone())),
            Handling::Judge => {
                self.judge_then_execute(&cmd, &agent, &decision, draft)
                    .await
            }
            Handling::Execute => {
                let rationale = decision.rationale.clone();
                self.execute(&cmd, &agent, draft, rationale).await
            }
        };
        let mut result = match result {
            Ok(r) => r,
            Err(Deferred(why)) => return deferred(why, Some(claim), trail),
        };
        if result.status == Status::NeedsApproval {
            // Parked for approvers before it is published: the result names the approval.
            let parked = self
                .park(
                    &cmd,
                    &agent,
                    msg.user_id.as_deref(),
                    &reply,
                    &result,
                    &policy,
                )
                .await;
            match parked {
                Ok(rec) => {
                    let ticket = rec.ticket();
                    trail.push(AuditEvent::ApprovalParked {
                        at: now_rfc3339(),
                        approval_id: ticket.approval_id.clone(),
                        digest: ticket.digest.clone(),
                        approvals_required: ticket.approvals_required,
                        expires_at: ticket.expires_at.clone(),
                    });
                    result.approval = Some(ticket);
                }
                Err(why) => {
                    tracing::error!(error = %why, "could not park the command for approval; not publishing it (fail closed)");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    return deferred(why, Some(claim), trail);
                }
            }
        }
        self.history.record(
            agent.id.as_str(),
            cmd.command_type,
            cmd.action_id.as_str(),
            result.status,
        );
        let unapproved =
            matches!(result.status, Status::NeedsApproval | Status::Blocked).then(|| {
                UnapprovedAttempt {
                    // Unverified claims trip and quarantine apart from the verified agent.
                    agent: agent.control_key(),
                    command_type: cmd.command_type,
                    action_id: cmd.action_id.to_string(),
                    status: result.status,
                    at: crate::clock::unix_now(),
                    instance: self.instance.clone(),
                }
            });
        let mut outcome = self.conclude(result, reply, trail);
        outcome.unapproved = unapproved;
        outcome.command_digest = Some(digest);
        Disposition::Conclude {
            outcome,
            claim: Some(claim),
        }
    }

    /// Parks a NEEDS_APPROVAL command in the shared store (or finds it parked by an earlier
    /// delivery of the same command): the record approvers decide on.
    async fn park(
        &self,
        cmd: &Command,
        agent: &Agent,
        publisher: Option<&str>,
        reply: &ReplyTarget,
        result: &ResultMessage,
        policy: &Policy,
    ) -> Result<Parked, String> {
        let command_digest = &crate::store::command_digest(agent, cmd);
        let key = crate::store::action_key(agent, &cmd.action_id);
        let rule = policy.rule(cmd.command_type);
        let now = crate::clock::unix_now();
        let policy_digest = policy.digest().to_owned();
        let rec = Parked {
            approval_id: poller_core::approval::approval_id(&key),
            action_key: key,
            action_id: cmd.action_id.clone(),
            command_type: cmd.command_type,
            service: cmd.service.clone(),
            severity: cmd.severity,
            agent: AgentView::from(agent),
            publisher: publisher.map(str::to_owned),
            reply: reply.clone(),
            judges: result.judges.clone(),
            panel: result.panel,
            severity_view: result.severity.clone(),
            received_at: result.received_at.clone(),
            rationale: result.rationale.clone(),
            digest: poller_core::approval::digest(command_digest, &policy_digest),
            command_digest: command_digest.to_owned(),
            policy_digest,
            required: rule.approvals_required,
            parked_at: now,
            expires_at: now + rule.approval_ttl.as_secs(),
            state: poller_core::approval::State::Pending,
            approvals: Vec::new(),
            denial: None,
            decided_at: None,
            notified: false,
            reminded: false,
            finalized: None,
        };
        let stored = self
            .store
            .park(&rec.approval_id, &rec.seal(&self.store_key), self.retention)
            .await
            .map_err(|e| e.to_string())?;
        let stored = Parked::unseal(&self.store_key, &stored)
            .map_err(|e| format!("the parked approval {} is unreadable: {e}", rec.approval_id))?;
        if stored.command_digest != rec.command_digest {
            return Err(format!(
                "approval {} is parked for another command",
                rec.approval_id
            ));
        }
        tracing::info!(approval_id = %stored.approval_id, required = stored.required, "parked for approval");
        Ok(stored)
    }

    /// Executes an approved parked command: the same gate, bridge slots and bridge client as
    /// any command. `Err`: held back (paused, halted), to be tried again.
    pub async fn approved(&self, rec: &Parked) -> Result<ResultMessage, String> {
        let draft = Draft::of(rec, &self.instance);
        let in_force = self.policy.digest();
        if rec.policy_digest != in_force {
            // Approved as decided under another policy: never executed under this one.
            let mut r = draft.finish(
                Status::Denied,
                format!(
                    "Approved by {}, but the policy changed before it was executed (parked under {}, now {}): not executed. Send it again under a new action_id to have it decided under the current policy.",
                    approvers(rec),
                    &rec.policy_digest[..12.min(rec.policy_digest.len())],
                    &in_force[..12]
                ),
            );
            r.approvals = rec.approvals.clone();
            return Ok(r);
        }
        let cmd = Command {
            action_id: rec.action_id.clone(),
            command_type: rec.command_type,
            service: rec.service.clone(),
            severity: rec.severity,
            claimed_agent: None,
        };
        let agent = Agent {
            id: rec.agent.id.clone(),
            verified: rec.agent.verified,
        };
        let rationale = format!(
            "Approved by {} ({} of {} required).",
            approvers(rec),
            rec.approvals.len(),
            rec.required
        );
        match self.execute(&cmd, &agent, draft, rationale).await {
            Ok(mut r) => {
                r.approvals = rec.approvals.clone();
                Ok(r)
            }
            Err(Deferred(why)) => Err(why),
        }
    }

    /// The final result of an approved record that no NEEDS_APPROVAL result backs: denied,
    /// never executed.
    pub fn unbacked(&self, rec: &Parked, why: &str) -> ResultMessage {
        let mut r = Draft::of(rec, &self.instance).finish(
            Status::Denied,
            format!(
                "Approved by {}, but not executed: {why}. Send it again under a new action_id.",
                approvers(rec)
            ),
        );
        r.approvals = rec.approvals.clone();
        r
    }

    /// The final result of a parked command that will never be executed (denied, expired).
    pub fn closed(&self, rec: &Parked) -> ResultMessage {
        let draft = Draft::of(rec, &self.instance);
        let mut r = match &rec.denial {
            Some(d) => draft.finish(
                Status::Denied,
                format!("Denied by {}: {}. Never executed.", d.by, d.reason),
            ),
            None => draft.finish(
                Status::Expired,
                format!(
                    "Nobody decided before {} ({} of {} approvals): expired, never executed.",
                    crate::clock::rfc3339(rec.expires_at),
                    rec.approvals.len(),
                    rec.required
                ),
            ),
        };
        r.approvals = rec.approvals.iter().chain(&rec.denial).cloned().collect();
        r
    }

    /// A parked command's final result with its alerts, and the audit event that ends its
    /// approval (executed, denied, expired: who decided, the digest).
    pub fn conclude_parked(&self, rec: &Parked, result: ResultMessage) -> Concluded {
        let by = match (&rec.denial, rec.state) {
            (Some(d), _) => d.by.clone(),
            (None, poller_core::approval::State::Expired) => "(expiry)".to_owned(),
            (None, _) => approvers(rec),
        };
        let trail = vec![AuditEvent::ApprovalDecision {
            at: now_rfc3339(),
            approval_id: rec.approval_id.clone(),
            by,
            decision: "finalize".into(),
            digest: Some(rec.digest.clone()),
            reason: result.rationale.clone(),
            outcome: result.status.as_str().to_ascii_lowercase(),
            refusal: None,
        }];
        let mut outcome = self.conclude(result, rec.reply.clone(), trail);
        outcome.command_digest = Some(rec.command_digest.clone());
        outcome
    }

    /// A duplicate of a concluded action: republish its stored result, marked as a replay;
    /// or, when the action_id was used for a different command, refuse the new one.
    async fn replay(
        &self,
        key: String,
        digest: &str,
        stored: &str,
        reply: ReplyTarget,
        mut trail: Vec<AuditEvent>,
        draft: Draft,
    ) -> Disposition {
        let stored = match StoredOutcome::unseal(&self.store_key, stored) {
            Ok(s) => s,
            Err(Unsealed::Tampered(why)) => return self.tampered(why, reply, trail, draft),
            Err(Unsealed::Unreadable(e)) => {
                // Never execute on doubt: an unreadable stored result is reported, not redone.
                tracing::error!(error = %e, "stored result unreadable");
                return deferred(format!("stored result unreadable: {e}"), None, trail);
            }
        };
        if stored
            .command_digest
            .as_deref()
            .is_some_and(|d| d != digest)
        {
            // The same agent reused an action_id for another command: answering with the
            // stored result would report the other command's outcome as this one's.
            let why = format!(
                "action_id {} was already used by this agent for a different command (concluded {} at {}); send a new action_id",
                draft.action_id.as_ref().map_or("-", |a| a.as_str()),
                stored.result.status,
                stored.result.completed_at,
            );
            tracing::warn!("{why}");
            trail.push(rejected_event("action_id", &why));
            let result = draft.rejected("action_id", why);
            return Disposition::Conclude {
                outcome: self.conclude(result, reply, trail),
                claim: None,
            };
        }
        let mut result = stored.result;
        result.replay = true;
        trail.push(AuditEvent::Replayed {
            at: now_rfc3339(),
            original_completed_at: result.completed_at.clone(),
            original_instance: result.poller_instance.clone(),
        });
        let replayed = |alerts, claim| Disposition::Replay {
            outcome: Concluded {
                result: result.clone(),
                reply: reply.clone(),
                alerts,
                audit: trail.clone(),
                unapproved: None,
                command_digest: stored.command_digest.clone(),
            },
            claim,
        };
        if stored.published {
            tracing::info!(status = %result.status, "duplicate action: replaying the stored result");
            return replayed(Vec::new(), None);
        }
        // Concluded but not confirmed published (a crash or a refused publish in between): it
        // may or may not have gone out, so publish it in full, alerts included (a duplicate alert
        // beats a lost one), marked as a replay, then mark it published: under a claim, so two
        // copies don't both mark it (a copy that can't hold it publishes without marking).
        tracing::warn!(status = %result.status, "concluded earlier, publication unconfirmed; publishing it again");
        let claim = ClaimGuard::hold(
            self.store.clone(),
            key,
            &self.instance,
            self.claim_ttl,
            self.retention,
        )
        .await
        .unwrap_or_else(|e| {
            tracing::warn!(error = %e, "could not hold the claim to mark it published");
            None
        });
        replayed(self.alerts(&result), claim)
    }

    /// A stored outcome that fails its integrity check: never replayed (it may be planted),
    /// never executed again (the original may have run). A human checks; security is told.
    fn tampered(
        &self,
        why: String,
        reply: ReplyTarget,
        mut trail: Vec<AuditEvent>,
        draft: Draft,
    ) -> Disposition {
        let why = format!("the stored outcome of this action failed its integrity check ({why})");
        tracing::error!("{why}; neither replayed nor executed");
        trail.push(rejected_event("idempotency_store", &why));
        let result = draft.finish(
            Status::UnknownOutcome,
            format!("{why}: it was neither replayed nor executed again, so whether the action took effect is unknown. A human must check the service and the idempotency store."),
        );
        let mut outcome = self.conclude(result, reply, trail);
        let mut security = outcome
            .alerts
            .first()
            .cloned()
            .expect("an unknown outcome always alerts");
        security.alert_id = uuid::Uuid::new_v4().to_string();
        security.team = "security".into();
        security.priority = crate::outcome::Priority::High;
        security.action_required = "Someone may have written to the idempotency store without the store key (idempotency.key_env): find who can write there and what else they changed.".into();
        outcome.alerts.push(security);
        Disposition::Conclude {
            outcome,
            claim: None,
        }
    }

    /// A lookup (`get_action`): what the store holds under the agent's action, answered to the
    /// asker only. Never claims, judges, executes or stores anything: an action older than the
    /// store's retention is answered EXPIRED, never sent again as new.
    async fn lookup(
        &self,
        agent: &Agent,
        cmd: &Command,
        reply: ReplyTarget,
        mut trail: Vec<AuditEvent>,
        draft: Draft,
    ) -> Disposition {
        if reply.routing_key().is_none() {
            let reason = "a lookup needs reply_to (its answer goes to the asker only)".to_owned();
            trail.push(rejected_event("reply_to", &reason));
            return Disposition::DeadLetter {
                letter: DeadLetter {
                    field: "reply_to".into(),
                    reason,
                    body: DeadLetterBody::Original,
                },
                result: None,
                reply,
                audit: trail,
            };
        }
        let key = crate::store::action_key(agent, &cmd.action_id);
        let stored = match self.store.result(&key).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "idempotency store unavailable; the lookup waits (fail closed)");
                tokio::time::sleep(STORE_DOWN_PAUSE).await;
                return deferred(e.to_string(), None, trail);
            }
        };
        let digest = crate::store::command_digest(agent, cmd);
        let result = match stored.map(|s| StoredOutcome::unseal(&self.store_key, &s)) {
            None => draft.finish(
                Status::Expired,
                format!(
                    "Nothing is stored for action {} of agent {}: it concluded longer ago than the store keeps results ({} s), was never received, or is still queued or in progress. Nothing was sent, judged or executed by this lookup.",
                    cmd.action_id,
                    agent.id,
                    self.retention.as_secs()
                ),
            ),
            Some(Ok(s)) if s.command_digest.as_deref().is_some_and(|d| d != digest) => draft
                .rejected(
                    "action_id",
                    format!(
                        "action_id {} was used by this agent for a different command (concluded {}); this lookup names another",
                        cmd.action_id, s.result.status
                    ),
                ),
            Some(Ok(s)) => {
                let mut r = s.result;
                r.replay = true;
                r
            }
            Some(Err(Unsealed::Tampered(why))) => {
                tracing::error!(why = %why, "lookup: the stored outcome failed its integrity check");
                draft.finish(
                    Status::UnknownOutcome,
                    format!("the stored outcome of this action failed its integrity check ({why}): a human must check the service and the idempotency store"),
                )
            }
            Some(Err(Unsealed::Unreadable(e))) => {
                tracing::error!(error = %e, "lookup: stored result unreadable");
                return deferred(format!("stored result unreadable: {e}"), None, trail);
            }
        };
        tracing::info!(status = %result.status, "lookup answered from the store");
        Disposition::Answer {
            result,
            reply,
            audit: trail,
        }
    }

    /// The alerts the policy routes for `result`.
    fn alerts(&self, result: &ResultMessage) -> Vec<crate::outcome::Alert> {
        alerts_for(
            self.policy
                .snapshot()
                .routes(result.command_type, result.status),
            result,
        )
    }

    /// A final result with its alerts and the audit events of how it was reached.
    fn conclude(
        &self,
        result: ResultMessage,
        reply: ReplyTarget,
        mut trail: Vec<AuditEvent>,
    ) -> Concluded {
        let alerts = self.alerts(&result);
        tracing::info!(status = %result.status, alerts = alerts.len(), "command concluded");
        if let Some(p) = result.panel {
            trail.push(AuditEvent::PanelDecision {
                at: now_rfc3339(),
                summary: p,
            });
        }
        for j in &result.judges {
            trail.push(AuditEvent::JudgeVerdict {
                at: now_rfc3339(),
                judge: j.name.clone(),
                verdict: j.verdict,
                reason: j.reason.clone(),
                ms: j.ms,
                cause: j.cause.clone(),
            });
        }
        if let Some(b) = &result.bridge {
            trail.push(AuditEvent::BridgeCall {
                at: now_rfc3339(),
                attempts: b.attempts,
                ms: b.ms,
                outcome: if b.error.is_none() {
                    "success"
                } else {
                    "error"
                }
                .into(),
                error: b.error.clone(),
                integration_status: result
                    .tool_result
                    .as_ref()
                    .and_then(|t| t.get("integration_status"))
                    .and_then(|s| s.as_str())
                    .map(str::to_owned),
            });
        }
        Concluded {
            result,
            reply,
            alerts,
            audit: trail,
            unapproved: None,
            command_digest: None,
        }
    }

    async fn judge_then_execute(
        &self,
        cmd: &Command,
        agent: &Agent,
        decision: &Decision,
        mut draft: Draft,
    ) -> Result<ResultMessage, Deferred> {
        if !self.gate.may_judge() {
            return Err(Deferred("halted before judging".into()));
        }
        let request = JudgeRequest {
            action_id: cmd.action_id.to_string(),
            command_type: cmd.command_type,
            service: cmd.service.clone(),
            agent: agent.clone(),
            declared_severity: decision.declared_severity,
            effective_severity: decision.effective_severity,
            policy_rationale: decision.rationale.clone(),
            recent_attempts: self.history.recent(agent.id.as_str(), cmd.command_type),
            probe: false,
        };
        let report = self.panel.convene(&request, decision.decision_rule).await;
        let summary = report.summary();
        draft.panel = Some(summary);
        let rationale = panel_rationale(&report, &summary);
        draft.judges = report.votes;
        match report.outcome {
            PanelOutcome::NotApproved => Ok(draft.finish(Status::NeedsApproval, rationale)),
            PanelOutcome::Approved => self.execute(cmd, agent, draft, rationale).await,
        }
    }

    async fn execute(
        &self,
        cmd: &Command,
        agent: &Agent,
        draft: Draft,
        rationale: String,
    ) -> Result<ResultMessage, Deferred> {
        let key = crate::store::action_key(agent, &cmd.action_id);
        let slot = match self.bridge_slots.acquire(&key).await {
            Ok(slot) => slot,
            // Fail closed: no bridge call starts without a slot of the fleet's limit. The store
            // is down: as for the claim, don't spin (the requeue costs a delivery).
            Err(e) => {
                tracing::error!(error = %e, "bridge slots unavailable; not calling the bridge (fail closed)");
                tokio::time::sleep(STORE_DOWN_PAUSE).await;
                return Err(Deferred(format!(
                    "no bridge slot: the fleet's limit can't be checked ({e})"
                )));
            }
        };
        let _ticket = match self.gate.begin_bridge(&agent.control_key()) {
            Ok(t) => t,
            Err(Held::Mode(mode)) => {
                slot.not_sent().await;
                return Err(Deferred(format!(
                    "{} before the bridge call",
                    mode.as_str().to_ascii_lowercase()
                )));
            }
            Err(Held::Quarantined(q)) => {
                // Quarantined while it was being decided (or waiting for approvers).
                slot.not_sent().await;
                tracing::warn!(by = %q.by, "agent quarantined before the bridge call; not executed");
                return Ok(draft.rejected("agent", quarantine_reason(&agent.control_key(), &q)));
            }
        };
        let repost = slot.earlier();
        if repost {
            tracing::warn!("re-POST: an earlier attempt already sent this action to the bridge; only the bridge's dedup keeps it from acting twice");
        }
        let request = BridgeRequest {
            action_id: cmd.action_id.to_string(),
            command_type: cmd.command_type,
            params: BridgeParams {
                service: cmd.service.to_string(),
            },
            agent: agent.id.to_string(),
            agent_verified: agent.verified,
            requested_at: now_rfc3339(),
            lookup: false,
        };
        let started = Instant::now();
        let answer = self.bridge.execute(&request, self.gate.as_ref()).await;
        let ms = started.elapsed().as_millis() as u64;
        match answer {
            Ok(a) => {
                tracing::info!(attempts = a.attempts, ms, "bridge call succeeded");
                let mut r = draft.finish(Status::Success, rationale);
                r.tool_result = Some(a.tool_result);
                r.bridge = Some(BridgeSummary {
                    attempts: a.attempts,
                    ms,
                    error: None,
                    repost,
                });
                Ok(r)
            }
            Err(crate::bridge::BridgeError::Held { attempts, why }) => Err(Deferred(format!(
                "{why} (after {attempts} attempt(s) that did not complete)"
            ))),
            Err(e @ crate::bridge::BridgeError::UnknownOutcome { .. }) => {
                tracing::error!(error = %e, ms, "bridge outcome unknown");
                let mut r = draft.finish(
                    Status::UnknownOutcome,
                    format!("{rationale} The bridge ran the action, but its answer was lost and it remembered none: whether it took effect is unknown. A human must check the service; it is not retried."),
                );
                r.bridge = Some(BridgeSummary {
                    attempts: 1,
                    ms,
                    error: Some(e.to_string()),
                    repost,
                });
                Ok(r)
            }
            Err(e) => {
                tracing::warn!(error = %e, ms, "bridge call failed");
                let attempts = match &e {
                    crate::bridge::BridgeError::Exhausted { attempts, .. } => *attempts,
                    _ => 1,
                };
                let mut r = draft.finish(
                    Status::Failed,
                    format!("{rationale} The bridge call failed: {e}"),
                );
                r.bridge = Some(BridgeSummary {
                    attempts,
                    ms,
                    error: Some(e.to_string()),
                    repost,
                });
                Ok(r)
            }
        }
    }
}

/// Why a quarantined agent's command is refused.
fn quarantine_reason(agent: &str, q: &poller_core::control::Quarantined) -> String {
    format!(
        "agent {agent} is in quarantine (by {} since {}: {}); its commands are neither judged nor executed until an operator releases it (`command-poller release {agent}`)",
        q.by, q.since, q.reason
    )
}

/// "alice, bob": who approved a parked command.
fn approvers(rec: &Parked) -> String {
    rec.approvals
        .iter()
        .map(|a| a.by.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn deferred(why: String, claim: Option<ClaimGuard>, audit: Vec<AuditEvent>) -> Disposition {
    tracing::info!(why = %why, "deferred: back to the queue unprocessed");
    Disposition::Defer { why, claim, audit }
}

fn rejected_event(field: &str, reason: &str) -> AuditEvent {
    AuditEvent::Rejected {
        at: now_rfc3339(),
        field: field.to_owned(),
        reason: reason.to_owned(),
    }
}

/// For messages refused before identity was settled: direct reply-to only reaches the
/// publisher's own channel, so it is always safe; an agent queue only for a broker-checked user.
fn lenient_reply(reply_to: Option<&str>, broker_agent: Option<&Agent>) -> ReplyTarget {
    match broker_agent {
        Some(a) => intake::reply_target(reply_to, a).unwrap_or(ReplyTarget::None),
        None => match reply_to {
            Some(r) if crate::broker::names::is_direct_reply_to(r) => {
                let anyone = Agent {
                    id: AgentId::parse("unknown").expect("valid"),
                    verified: false,
                };
                intake::reply_target(Some(r), &anyone).unwrap_or(ReplyTarget::None)
            }
            _ => ReplyTarget::None,
        },
    }
}
