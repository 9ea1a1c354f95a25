//! Levers from operators (pause, resume, halt, status): checked by the pure `transition`,
//! applied to the gate, answered, and recorded (events, audit, alerts), each message rendered by
//! [`super::render`].

use super::render::{self, ControlEvent, ReplicaReply};
use super::{Cause, Replica};
use crate::broker::names::{self, routing};
use crate::broker::{BrokerError, Publisher};
use crate::outcome::Priority;
use poller_core::control::{transition, Actor, ControlCommand, ControlState, Refusal};

/// A lever on `current`: the state to enforce (none when nothing changes) and what the lever
/// did: `Ok(None)` for a policy reload (the gate is not its business), `Ok(Some(new))` for a
/// transition, or its refusal.
fn lever_decision(
    current: &ControlState,
    cmd: &ControlCommand,
    actor: &Actor,
) -> (Option<ControlState>, Result<Option<ControlState>, Refusal>) {
    match transition(current, cmd, actor) {
        Ok(_) if matches!(cmd, ControlCommand::ReloadPolicy { .. }) => (None, Ok(None)),
        Ok(new) => {
            let applies = match cmd {
                ControlCommand::Quarantine { .. } | ControlCommand::Release { .. } => {
                    new.quarantined != current.quarantined
                }
                _ => new.mode != current.mode,
            };
            (applies.then(|| new.clone()), Ok(Some(new)))
        }
        Err(refusal) => (None, Err(refusal)),
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
        }
    }

    pub(super) async fn on_control(
        &self,
        body: &[u8],
        user: Option<&str>,
        reply_to: Option<&str>,
        publisher: &Publisher,
    ) -> Result<(), BrokerError> {
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
                return Ok(());
            }
        };
        let request_id = cmd.request_id().to_owned();
        if matches!(cmd, ControlCommand::Status { .. }) {
            return self
                .on_status(&actor, &request_id, reply_to, publisher)
                .await;
        }
        let agent = matches!(
            cmd,
            ControlCommand::Quarantine { .. } | ControlCommand::Release { .. }
        );
        // Decided and enforced on the state as it is under the gate's lock.
        let (decided, changed) = self.enforce(Cause::Lever, |current| {
            lever_decision(current, &cmd, &actor)
        });
        match decided {
            Ok(None) => {
                let refusal = self
                    .reload_policy(publisher, &actor.name(), &request_id)
                    .await?;
                let accepted = refusal.is_none();
                self.answer(
                    publisher,
                    reply_to,
                    self.reply(&request_id, accepted, refusal),
                )
                .await
            }
            Ok(Some(_)) if agent => {
                // Announced once per request on this replica, whether the lever or the stored
                // state (written first, and followed) brought the change.
                if self.first_announcement(&request_id) {
                    let alert = !matches!(actor, Actor::Poller(_));
                    self.quarantine_changed(publisher, &cmd, &actor, alert)
                        .await?;
                }
                self.answer(publisher, reply_to, self.reply(&request_id, true, None))
                    .await
            }
            Ok(Some(new)) => {
                // The gate flip (done above) is the acknowledgement: from here no bridge call
                // starts.
                if changed.mode {
                    self.mode_changed(publisher, &new).await?;
                }
                self.answer(publisher, reply_to, self.reply(&request_id, true, None))
                    .await
            }
            Err(refusal) => {
                tracing::warn!(actor = %actor.name(), refusal = %refusal, "control message refused");
                self.refused(
                    publisher,
                    &actor,
                    &request_id,
                    &refusal.to_string(),
                    refusal.is_security_relevant(),
                )
                .await?;
                self.answer(
                    publisher,
                    reply_to,
                    self.reply(&request_id, false, Some(refusal.to_string())),
                )
                .await
            }
        }
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
        let msg = render::alert(
            &self.names,
            team,
            priority,
            what,
            todo,
            &self.gate.state(),
            crate::clock::now_rfc3339(),
        );
        publisher.publish(&msg).await
    }
}
