//! Answers from the store instead of the stages: a duplicate's stored result replayed (or
//! refused when the action_id was used for another command, or a tampered value), and a
//! lookup's answer.

use super::*;

impl Pipeline {
    /// A duplicate of a concluded action: republish its stored result, marked as a replay;
    /// or, when the action_id was used for a different command, refuse the new one.
    pub(super) async fn replay(
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
        let claim = self.claims.hold(key).await.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "could not hold the claim to mark it published");
            None
        });
        replayed(self.alerts(&result), claim)
    }

    /// A stored outcome that fails its integrity check: never replayed (it may be planted),
    /// never executed again (the original may have run). A human checks; security is told.
    pub(super) fn tampered(
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
    pub(super) async fn lookup(
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
                alerts: Vec::new(),
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
}
