//! The first stages, before anything is claimed: intake (the payload's size, then the decoder),
//! identity (who sent it, where the answer goes) and admission (the agent's share of the
//! fleet's per-agent limit). Each returns what the next stage needs, or the disposition that
//! ends the command here.

use super::*;

impl Pipeline {
    /// Intake: the payload within the size limit, decoded into a command. Out: the command, or a
    /// dead letter (an oversized payload's digest only; an undecodable one with its REJECTED
    /// result when its action_id can be salvaged).
    pub(super) fn intake(&self, msg: &Inbound, t: &mut Trace) -> Result<Command, Stop> {
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
            t.trail.push(rejected_event("payload", &reason));
            return Err(Box::new(Disposition::DeadLetter {
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
                alerts: Vec::new(),
                audit: t.trail(),
            }));
        }
        match decode(&msg.payload, msg.content_type.as_deref(), self.limits) {
            Ok(cmd) => {
                t.span.record("action_id", cmd.action_id.as_str());
                t.span.record("command_type", cmd.command_type.as_str());
                t.draft.action_id = Some(cmd.action_id.clone());
                t.draft.command_type = Some(cmd.command_type);
                t.draft.service = Some(cmd.service.clone());
                Ok(cmd)
            }
            Err(e) => {
                tracing::warn!(field = e.field(), error = %e, "undecodable command; dead-lettering");
                t.draft.action_id = salvage_action_id(&msg.payload, self.limits);
                if let Some(a) = &t.draft.action_id {
                    t.span.record("action_id", a.as_str());
                }
                let reply = lenient_reply(msg.reply_to.as_deref(), t.broker_agent.as_ref());
                let result = t
                    .draft
                    .action_id
                    .is_some()
                    .then(|| t.draft().rejected(e.field(), e.to_string()));
                t.trail.push(rejected_event(e.field(), &e.to_string()));
                let alerts = match (&e, &result) {
                    (crate::intake::DecodeError::OperatorLever(lever), Some(r)) => {
                        tracing::warn!(lever = %lever, "an agent sent an operator lever as a command");
                        vec![crate::outcome::lever_attempt(lever, r)]
                    }
                    _ => Vec::new(),
                };
                Err(Box::new(Disposition::DeadLetter {
                    letter: DeadLetter {
                        field: e.field().to_owned(),
                        reason: e.to_string(),
                        body: DeadLetterBody::Original,
                    },
                    result,
                    reply,
                    alerts,
                    audit: t.trail(),
                }))
            }
        }
    }

    /// Identity: the agent as the broker vouches for it (or as it claims, where unverified
    /// agents are allowed), and where its answer may go. Out: both, or REJECTED.
    pub(super) fn identity(
        &self,
        msg: &Inbound,
        cmd: &Command,
        t: &mut Trace,
    ) -> Result<(Agent, ReplyTarget), Stop> {
        let agent = match identify(
            msg.user_id.as_deref(),
            cmd.claimed_agent.as_ref(),
            self.allow_unverified,
        ) {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "command refused: identity");
                let reply = lenient_reply(msg.reply_to.as_deref(), t.broker_agent.as_ref());
                let result = t.reject(e.field(), e.to_string());
                return Err(Box::new(self.refused(result, reply, t)));
            }
        };
        t.span.record("agent", agent.id.as_str());
        t.draft.agent = Some(AgentView::from(&agent));
        match reply_target(msg.reply_to.as_deref(), &agent) {
            Ok(reply) => Ok((agent, reply)),
            Err(e) => {
                tracing::warn!(error = %e, "command refused: reply_to");
                let result = t.reject("reply_to", e.to_string());
                Err(Box::new(self.refused(result, ReplyTarget::None, t)))
            }
        }
    }

    /// Admission: before the claim, the judges and the bridge, a flood is refused at the cost
    /// of one count in the shared store. A redelivered command counts once (its action_id is
    /// the member). Out: admitted, or REJECTED (`rate_limited`), or deferred while the count
    /// can't be had (fail closed).
    pub(super) async fn admission(
        &self,
        agent: &Agent,
        cmd: &Command,
        reply: &ReplyTarget,
        t: &mut Trace,
    ) -> Result<(), Stop> {
        let Some(a) = &self.admission else {
            return Ok(());
        };
        let key = agent.admission_key();
        match a
            .windows
            .hit(&key, cmd.action_id.as_str(), a.limit.count, a.limit.window)
            .await
        {
            Ok(hit) if hit.allowed => Ok(()),
            Ok(hit) => {
                let reason = format!(
                    "agent {} sent more than {} commands within {} s (the fleet's per-agent limit; {} counted); send it again later",
                    agent.id,
                    a.limit.count,
                    a.limit.window.as_secs(),
                    hit.count
                );
                let result = t.reject("rate_limited", reason);
                Err(Box::new(self.refused(result, reply.clone(), t)))
            }
            Err(e) => {
                tracing::error!(error = %e, "admission count unavailable; not processing (fail closed)");
                tokio::time::sleep(STORE_DOWN_PAUSE).await;
                Err(Box::new(deferred(e.to_string(), None, t.trail())))
            }
        }
    }

    /// A command refused before it was claimed: concluded with its REJECTED result, no claim.
    pub(super) fn refused(
        &self,
        result: ResultMessage,
        reply: ReplyTarget,
        t: &mut Trace,
    ) -> Disposition {
        Disposition::Conclude {
            outcome: self.conclude(result, reply, t.trail()),
            claim: None,
        }
    }
}
