//! Levers from operators (pause, resume, halt, quarantine, release, revoke, disconnect,
//! reconnected, status, policy reload):
//! checked by the pure `transition`, refused or answered, and recorded (events, audit, alerts),
//! each message rendered by [`super::render`]. A lever changes nothing by itself: the operator
//! stores the change first, the replica's follower of the stored state enforces it, and the
//! lever is answered once the enforced state shows it (the pure [`shows`]).

use super::render::{self, ControlEvent, ReplicaReply};
use super::Replica;
use crate::broker::names::{self, routing};
use crate::broker::{BrokerError, Publisher};
use crate::outcome::Priority;
use poller_core::control::{shows, transition, Actor, ControlCommand, Refusal};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// How long a lever waits for the state this replica follows to show it before the stream is
/// read afresh. The operator writes the stored state before it sends the lever, so the
/// follower normally has it first or within milliseconds; the CLI collects answers for 2 s.
pub(super) const SHOWN_WITHIN: Duration = Duration::from_millis(750);

/// A lever accepted for checking and waiting for the state this replica enforces to show it.
/// Only the stored state changes what a replica enforces: the lever is the operator's request
/// for an answer (and, for a quarantine or release, for its announcement).
pub(super) struct Pending {
    pub(super) cmd: ControlCommand,
    pub(super) actor: Actor,
    pub(super) reply_to: Option<String>,
    /// When the stream is read afresh; a lever still not shown after that is refused.
    pub(super) deadline: Instant,
}

impl Pending {
    /// A lever this replica pulled itself (a trip): nobody waits for its answer.
    pub(super) fn unanswered(cmd: ControlCommand, actor: Actor) -> Self {
        Self {
            cmd,
            actor,
            reply_to: None,
            deadline: Instant::now(),
        }
    }
}

impl Replica {
    pub(super) fn reply(
        &self,
        request_id: &str,
        accepted: bool,
        refusal: Option<String>,
    ) -> ReplicaReply {
        ReplicaReply {
            instance: self.names.instance.clone(),
            request_id: request_id.to_owned(),
            accepted,
            refusal,
            state: self.gate.state(),
            policy_sha256: self.policy.digest(),
            broker_node: self.stats.broker_node(),
            in_flight: self.stats.in_flight(),
            at_bridge: self.gate.at_bridge(),
            processed: self.stats.processed(),
            recent_results: self.stats.recent_results(),
            cut: None,
        }
    }

    /// A control message: a status or policy reload is handled at once, a lever refused at once
    /// when the transition refuses it, and otherwise returned to wait until the enforced state
    /// shows it ([`Replica::answer_shown`]).
    pub(super) async fn on_control(
        &self,
        body: &[u8],
        user: Option<&str>,
        reply_to: Option<String>,
        publisher: &Publisher,
    ) -> Result<Option<Pending>, BrokerError> {
        let actor = Actor::classify(user, &self.control.operators, &self.names.poller_user);
        let cmd: ControlCommand = match serde_json::from_slice(body) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(actor = %actor.name(), error = %e, "unreadable control message refused");
                if matches!(actor, Actor::Other(_)) {
                    self.refused(
                        publisher,
                        &actor,
                        "",
                        &format!("unreadable control message: {e}"),
                        true,
                    )
                    .await?;
                }
                return Ok(None);
            }
        };
        let request_id = cmd.request_id().to_owned();
        let reply_to = reply_to.as_deref();
        if matches!(cmd, ControlCommand::Status { .. }) {
            self.on_status(&actor, &request_id, reply_to, publisher)
                .await?;
            return Ok(None);
        }
        // Checked on the state this replica enforces, for the refusal only: the change itself
        // comes from the stored state.
        match transition(&self.gate.state(), &cmd, &actor) {
            Ok(_) if matches!(cmd, ControlCommand::ReloadPolicy { .. }) => {
                let refusal = self
                    .reload_policy(publisher, &actor.name(), &request_id)
                    .await?;
                let accepted = refusal.is_none();
                self.answer(
                    publisher,
                    reply_to,
                    self.reply(&request_id, accepted, refusal),
                )
                .await?;
                Ok(None)
            }
            Ok(_)
                if matches!(
                    cmd,
                    ControlCommand::OpenIncident { .. } | ControlCommand::CloseIncident { .. }
                ) =>
            {
                let (kind, detail) = match &cmd {
                    ControlCommand::OpenIncident { reason, .. } => {
                        (poller_core::incident::OPENED, reason.clone())
                    }
                    ControlCommand::CloseIncident {
                        incident, reason, ..
                    } => (
                        poller_core::incident::CLOSED,
                        format!("{incident}: {reason}"),
                    ),
                    _ => unreachable!("matched above"),
                };
                self.event(publisher, kind, &actor.name(), &request_id, Some(detail))
                    .await?;
                self.answer(publisher, reply_to, self.reply(&request_id, true, None))
                    .await?;
                Ok(None)
            }
            Ok(_) => Ok(Some(Pending {
                cmd,
                actor,
                reply_to: reply_to.map(str::to_owned),
                deadline: Instant::now() + SHOWN_WITHIN,
            })),
            Err(refusal) => {
                self.lever_refused(publisher, &actor, &request_id, reply_to, refusal)
                    .await?;
                Ok(None)
            }
        }
    }

    /// Answers every pending lever the enforced state now shows (a quarantine or release is
    /// announced first, once per request on this replica); with `expired`, refuses those past
    /// their deadline that it still does not show.
    pub(super) async fn answer_shown(
        self: &Arc<Self>,
        pending: &mut Vec<Pending>,
        publisher: &Publisher,
        expired: bool,
    ) -> Result<(), BrokerError> {
        let state = self.gate.state();
        let now = Instant::now();
        let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(pending)
            .into_iter()
            .partition(|p| shows(&state, &p.cmd) || (expired && p.deadline <= now));
        *pending = waiting;
        for p in done {
            let request_id = p.cmd.request_id().to_owned();
            let reply_to = p.reply_to.as_deref();
            if !shows(&state, &p.cmd) {
                self.lever_refused(
                    publisher,
                    &p.actor,
                    &request_id,
                    reply_to,
                    Refusal::NotStored,
                )
                .await?;
                continue;
            }
            if let Some(proposal) = state.proposals.get(&request_id) {
                // Parked for other operators: announced once, answered, nothing applied yet.
                if self.first_announcement(&request_id) {
                    self.proposed(publisher, &p.actor, &request_id, proposal)
                        .await?;
                }
                self.answer(publisher, reply_to, self.reply(&request_id, true, None))
                    .await?;
                continue;
            }
            if let ControlCommand::Second { proposal, .. } = &p.cmd {
                if self.first_announcement(&request_id) {
                    let applied = !state.proposals.contains_key(proposal);
                    let detail = format!(
                        "proposal {proposal}: {}",
                        if applied {
                            "applied"
                        } else {
                            "needs more operators"
                        }
                    );
                    self.event(
                        publisher,
                        "seconded",
                        &p.actor.name(),
                        &request_id,
                        Some(detail),
                    )
                    .await?;
                    if applied {
                        self.grant_changed(publisher, &p.cmd, &p.actor, &state)
                            .await?;
                    }
                }
                self.answer(publisher, reply_to, self.reply(&request_id, true, None))
                    .await?;
                continue;
            }
            if p.cmd.cut().is_some() {
                // Answered when the bridge has carried it out (or another replica does).
                self.carry_out_cut(p, publisher);
                continue;
            }
            let agent = matches!(
                p.cmd,
                ControlCommand::Quarantine { .. } | ControlCommand::Release { .. }
            );
            if agent && self.first_announcement(&request_id) {
                let alert = !matches!(p.actor, Actor::Poller(_));
                self.quarantine_changed(publisher, &p.cmd, &p.actor, alert)
                    .await?;
            }
            let grant = matches!(
                p.cmd,
                ControlCommand::Grant { .. } | ControlCommand::Ungrant { .. }
            );
            if grant && self.first_announcement(&request_id) {
                self.grant_changed(publisher, &p.cmd, &p.actor, &state)
                    .await?;
            }
            let reconnected = matches!(p.cmd, ControlCommand::Reconnected { .. });
            if reconnected && self.first_announcement(&request_id) {
                self.reconnected(publisher, &p.cmd, &p.actor).await?;
            }
            self.answer(publisher, reply_to, self.reply(&request_id, true, None))
                .await?;
        }
        Ok(())
    }

    /// A loosening lever parked as a proposal: the event, its audit record, and a security alert
    /// naming what it would loosen and how another operator seconds it.
    async fn proposed(
        &self,
        publisher: &Publisher,
        actor: &Actor,
        id: &str,
        p: &poller_core::control::loosening::Proposal,
    ) -> Result<(), BrokerError> {
        let lever = serde_json::to_string(&p.lever).expect("a lever serializes");
        self.event(
            publisher,
            "proposed",
            &actor.name(),
            id,
            Some(lever.clone()),
        )
        .await?;
        let what = format!(
            "{} proposed a loosening lever (proposal {id}, until {}): {lever}",
            p.by, p.expires_at
        );
        let todo = format!(
            "It applies only when another operator seconds it: check it is wanted (for a lifted halt, that the post-mortem it names happened), then `command-poller second {id} --digest {} --reason \"...\"`; otherwise let it expire.",
            p.digest
        );
        self.alert(publisher, "security", Priority::Normal, &what, &todo)
            .await
    }

    async fn lever_refused(
        &self,
        publisher: &Publisher,
        actor: &Actor,
        request_id: &str,
        reply_to: Option<&str>,
        refusal: Refusal,
    ) -> Result<(), BrokerError> {
        tracing::warn!(actor = %actor.name(), refusal = %refusal, "control message refused");
        self.refused(
            publisher,
            actor,
            request_id,
            &refusal.to_string(),
            refusal.is_security_relevant(),
        )
        .await?;
        self.answer(
            publisher,
            reply_to,
            self.reply(request_id, false, Some(refusal.to_string())),
        )
        .await
    }

    /// A status request: answered to operators, refused (and alerted) to anyone else.
    async fn on_status(
        &self,
        actor: &Actor,
        request_id: &str,
        reply_to: Option<&str>,
        publisher: &Publisher,
    ) -> Result<(), BrokerError> {
        if !matches!(actor, Actor::Operator(_)) {
            let r = Refusal::NotOperator(actor.name());
            self.refused(publisher, actor, request_id, &r.to_string(), true)
                .await?;
            return self
                .answer(
                    publisher,
                    reply_to,
                    self.reply(request_id, false, Some(r.to_string())),
                )
                .await;
        }
        self.answer(publisher, reply_to, self.reply(request_id, true, None))
            .await
    }

    pub(super) async fn refused(
        &self,
        publisher: &Publisher,
        actor: &Actor,
        request_id: &str,
        why: &str,
        alert: bool,
    ) -> Result<(), BrokerError> {
        self.event(
            publisher,
            "refused",
            &actor.name(),
            request_id,
            Some(why.to_owned()),
        )
        .await?;
        if alert {
            let what = format!(
                "Refused a control message from {} on replica {}: {why}",
                actor.name(),
                self.names.instance
            );
            self.alert(publisher, "security", Priority::High, &what, "Find out who holds that broker user's credentials and why it tried to pull an operator lever; only operators may.").await?;
        }
        Ok(())
    }

    /// Publishes a control event, then its audit record (a refused record must not hold back
    /// what follows, such as a halt's shut-off alerts).
    pub(super) async fn event(
        &self,
        publisher: &Publisher,
        kind: &str,
        actor: &str,
        request_id: &str,
        detail: Option<String>,
    ) -> Result<(), BrokerError> {
        let e = ControlEvent {
            kind: kind.to_owned(),
            instance: self.names.instance.clone(),
            actor: actor.to_owned(),
            request_id: request_id.to_owned(),
            state: self.gate.state(),
            detail,
            at: crate::clock::now_rfc3339(),
        };
        let (msg, record) = render::event(&e, &self.names);
        publisher.publish(&msg).await?;
        self.audit(publisher, &record).await
    }

    /// Publishes a control audit record; one the audit exchange refused is counted.
    pub(super) async fn audit(
        &self,
        publisher: &Publisher,
        record: &poller_core::audit::AuditRecord,
    ) -> Result<(), BrokerError> {
        let audited = crate::audit::publish_record(
            publisher,
            &self.names.audit_exchange,
            routing::AUDIT_CONTROL,
            &self.names.dead_letter_exchange,
            record,
            &self.names.poller_user,
        )
        .await?;
        if audited != poller_core::audit::AuditOutcome::Delivered {
            self.stats.audit_diverted();
        }
        Ok(())
    }

    /// Answers an operator on its direct reply-to; an operator gone away is not an error.
    pub(super) async fn answer(
        &self,
        publisher: &Publisher,
        reply_to: Option<&str>,
        reply: ReplicaReply,
    ) -> Result<(), BrokerError> {
        let Some(rt) = reply_to.filter(|r| names::is_direct_reply_to(r)) else {
            return Ok(());
        };
        match publisher.publish(&render::reply(rt, &reply)).await {
            Err(e) if e.is_connection() => Err(e),
            Err(e) => {
                tracing::warn!(error = %e, "control reply not delivered (the operator went away)");
                Ok(())
            }
            Ok(()) => Ok(()),
        }
    }

    pub(super) async fn alert(
        &self,
        publisher: &Publisher,
        team: &str,
        priority: Priority,
        what: &str,
        todo: &str,
    ) -> Result<(), BrokerError> {
        let (msg, sent) = render::alert(
            &self.names,
            team,
            priority,
            what,
            todo,
            &self.gate.state(),
            crate::clock::now_rfc3339(),
        );
        publisher.publish(&msg).await?;
        // Its own line in the audit trail, so an incident's timeline shows who was told what.
        let (_, record) =
            render::event(&render::sent_alert(&sent, &self.gate.state()), &self.names);
        self.audit(publisher, &record).await
    }
}
