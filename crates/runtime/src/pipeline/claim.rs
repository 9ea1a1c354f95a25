//! The claim stage: the command's idempotency claim, per agent, so one agent can't pre-empt
//! another's action_ids; then, under it, the agent's quarantine and the service's cut, which
//! refuse the command unless an earlier attempt already sent it to the bridge (see `past`).

use super::*;

/// A command this replica holds: its claim and its command digest.
pub(super) struct Claimed {
    pub guard: ClaimGuard,
    pub digest: String,
}

impl Pipeline {
    /// Claim: take the action's claim (a copy of an action in flight waits for it, a few per
    /// agent at a time). Out: the claim, or the disposition that ends the command here: a
    /// stored result replayed, a copy over the cap dead-lettered, a busy or unreachable store
    /// deferred.
    pub(super) async fn claim(
        &self,
        msg: &Inbound,
        agent: &Agent,
        cmd: &Command,
        reply: &ReplyTarget,
        t: &mut Trace,
    ) -> Result<Claimed, Stop> {
        // Unverified agents (where allowed) have a key space of their own.
        let digest = crate::store::command_digest(agent, cmd);
        let key = crate::store::action_key(agent, &cmd.action_id);
        let take = |wait| self.claims.take(key.clone(), wait);
        // A copy of an action in flight waits for its result, holding its delivery slot: only
        // a few fresh copies per agent at a time, so copies of one slow action can't take every
        // slot. A redelivered message always waits: it may be the original itself, back after a
        // crash while its dead claim runs out, and must never be turned away.
        let taken = match take(Duration::ZERO).await {
            Ok(Taken::Busy(_)) if msg.redelivered => take(self.wait_for_in_flight).await,
            Ok(Taken::Busy(owner)) => match self.waiting.enter(agent.admission_key().as_str()) {
                Some(_place) => take(self.wait_for_in_flight).await,
                None => return Err(Box::new(self.copy_over_cap(agent, cmd, &owner, reply, t))),
            },
            other => other,
        };
        let guard = match taken {
            Ok(Taken::Mine(guard)) => guard,
            Ok(Taken::Done(stored)) => {
                let draft = t.draft();
                return Err(Box::new(
                    self.replay(key, &digest, &stored, reply.clone(), t.trail(), draft)
                        .await,
                ));
            }
            Ok(Taken::Busy(owner)) => {
                return Err(Box::new(deferred(
                    format!("a duplicate of an action in flight on {owner}"),
                    None,
                    t.trail(),
                )));
            }
            Err(e) => {
                tracing::error!(error = %e, "idempotency store unavailable; not processing (fail closed)");
                // Don't spin on a store that is down: the requeue costs a delivery.
                tokio::time::sleep(STORE_DOWN_PAUSE).await;
                return Err(Box::new(deferred(e.to_string(), None, t.trail())));
            }
        };
        Ok(Claimed { guard, digest })
    }

    /// The lever that refuses this command before it is decided, if one does: its agent in
    /// quarantine, or its service revoked or disconnected. Out: the REJECTED result (with its
    /// audit event), which [`Pipeline::refuse`] settles.
    pub(super) fn lever_refusal(
        &self,
        agent: &Agent,
        cmd: &Command,
        t: &mut Trace,
    ) -> Option<ResultMessage> {
        if let Some(q) = self.gate.quarantine_of(&agent.control_key()) {
            tracing::warn!(by = %q.by, "command refused: agent in quarantine");
            let reason = quarantine_reason(&agent.control_key(), &q);
            return Some(t.reject("agent", reason));
        }
        let r = self
            .gate
            .revocation_of(cmd.command_type, cmd.service.as_str())?;
        tracing::warn!(by = %r.by, "command refused: its service was cut off");
        Some(t.reject(
            "service",
            poller_core::control::revocation::refusal(cmd.service.as_str(), &r),
        ))
    }

    /// A command a lever refused under its claim. Never judged or executed by this attempt, and
    /// not stored, so the agent's retry after a release or reconnect is decided afresh; unless
    /// an earlier attempt sent it to the bridge, when what the bridge remembers is its outcome,
    /// stored as any other.
    pub(super) async fn refuse(
        &self,
        subject: draft::Subject<'_>,
        reply: ReplyTarget,
        claimed: Claimed,
        refusal: ResultMessage,
        t: &mut Trace,
    ) -> Disposition {
        match self.past(subject.cmd, subject.agent, &refusal).await {
            Ok(past::Past::None) => {
                if let Err(e) = claimed.guard.release().await {
                    tracing::warn!(error = %e, "could not release the claim of a refused command; it expires");
                }
                self.refused(refusal, reply, t)
            }
            Ok(past::Past::Sent(result)) => {
                let policy = self.policy.snapshot();
                self.finish(subject, reply, &policy, claimed, *result, t)
                    .await
            }
            Err(Deferred(why)) => deferred(why, Some(claimed.guard), t.trail()),
        }
    }

    /// A fresh copy of an in-flight action when enough copies of this agent's actions already
    /// wait: dead-lettered at once, naming the original.
    fn copy_over_cap(
        &self,
        agent: &Agent,
        cmd: &Command,
        owner: &str,
        reply: &ReplyTarget,
        t: &mut Trace,
    ) -> Disposition {
        let reason = format!(
            "a copy of action {} of agent {}, which is in flight on {owner}; {} copies of this agent's in-flight actions already wait on this replica, so this one does not (the original's result is published when it concludes)",
            cmd.action_id,
            agent.id,
            self.waiting.cap()
        );
        tracing::warn!("{reason}");
        t.trail.push(rejected_event("action_id", &reason));
        Disposition::DeadLetter {
            letter: DeadLetter {
                field: "action_id".into(),
                reason,
                body: DeadLetterBody::Original,
            },
            result: None,
            reply: reply.clone(),
            alerts: Vec::new(),
            audit: t.trail(),
        }
    }
}
