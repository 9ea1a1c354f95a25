//! The past of an action: whether an earlier attempt already sent it to the bridge. A replica
//! killed after its bridge call and before its result was stored leaves the action executed
//! with nothing to say so but the bridge's memory and the store's mark of the call. The copy
//! that takes the action over may meet a lever pulled since (a quarantine, a cut), a policy
//! reloaded since or a panel that now votes otherwise; reporting that as the outcome would tell
//! the agent an executed action was refused. So a command about to end without a bridge call of
//! its own (refused by a lever, BLOCKED, NEEDS_APPROVAL, DENIED) first asks.
//!
//! In: the result this attempt reached without a bridge call. Out: that result when nothing was
//! sent before, or when the bridge remembers no answer to the earlier call (it never ran it to
//! an answer: the POSTs failed before running, or never arrived); otherwise the outcome the
//! bridge remembers (SUCCESS, or FAILED when it remembers a failure), asked with a lookup that
//! never acts; or [`Deferred`] when the store or the bridge can't be asked, or the bridge is
//! still running the earlier call (never concluded on doubt).

use super::*;

/// What a command's past settles.
pub(super) enum Past {
    /// No earlier attempt sent it (or this attempt made the call itself): its own result stands.
    None,
    /// An earlier attempt sent it: the outcome that reports what happened.
    Sent(Box<ResultMessage>),
}

impl Pipeline {
    /// Whether `reached` (this attempt's result) stands, or an earlier attempt's call decides
    /// the outcome. A result with a bridge call of its own stands without asking (the bridge's
    /// dedup answered that call), so commands that execute pay nothing for this.
    pub(super) async fn past(
        &self,
        cmd: &Command,
        agent: &Agent,
        reached: &ResultMessage,
    ) -> Result<Past, Deferred> {
        if reached.bridge.is_some() {
            return Ok(Past::None);
        }
        let key = crate::store::action_key(agent, &cmd.action_id);
        match self.bridge_slots.sent(&key).await {
            Ok(false) => Ok(Past::None),
            Ok(true) => Ok(match self.remembered(cmd, agent, reached).await? {
                Some(r) => Past::Sent(Box::new(r)),
                None => Past::None,
            }),
            Err(e) => {
                // Fail closed: an action that may have run is never reported refused on doubt.
                tracing::error!(error = %e, "could not ask whether an earlier attempt sent this action to the bridge; not concluding it");
                tokio::time::sleep(STORE_DOWN_PAUSE).await;
                Err(Deferred(format!(
                    "whether an earlier attempt sent this action to the bridge can't be checked ({e})"
                )))
            }
        }
    }

    /// Asks the bridge what came of an earlier attempt's call (a lookup: never acts), within a
    /// slot of the fleet's limit and only while running (a pause or halt defers it).
    async fn remembered(
        &self,
        cmd: &Command,
        agent: &Agent,
        reached: &ResultMessage,
    ) -> Result<Option<ResultMessage>, Deferred> {
        tracing::warn!(would_be = %reached.status, "an earlier attempt sent this action to the bridge; asking the bridge what came of it instead of concluding");
        if let Err(why) = self.gate.may_retry() {
            return Err(Deferred(format!(
                "an earlier attempt sent this action to the bridge; asking what came of it waits: {why}"
            )));
        }
        let key = crate::store::action_key(agent, &cmd.action_id);
        let _slot = self.bridge_slots.acquire(&key).await.map_err(|e| {
            Deferred(format!(
                "no bridge slot to ask what came of an earlier attempt ({e})"
            ))
        })?;
        let request = super::bridge::bridge_request(cmd, agent, true);
        let started = Instant::now();
        let answer = self.bridge.execute(&request, self.gate.as_ref()).await;
        let settled = settle_past(reached.clone(), answer, started.elapsed());
        if settled.is_err() {
            // Don't spin through the command's deliveries: each requeue spends one.
            tokio::time::sleep(STORE_DOWN_PAUSE).await;
        }
        settled
    }
}

/// The outcome of an action an earlier attempt sent, from the bridge's answer to the lookup;
/// `reached` is what this attempt would have concluded (kept in the rationale). `None`: the
/// bridge remembers no answer, so `reached` stands.
fn settle_past(
    reached: ResultMessage,
    answer: Result<crate::bridge::BridgeAnswer, crate::bridge::BridgeError>,
    took: Duration,
) -> Result<Option<ResultMessage>, Deferred> {
    use crate::bridge::BridgeError;
    let ms = took.as_millis() as u64;
    let instead = format!(
        "This attempt would have ended {}: {}",
        reached.status, reached.rationale
    );
    let (status, rationale, tool_result, attempts, error) = match answer {
        Ok(a) => (
            Status::Success,
            format!("An earlier attempt sent this action to the bridge and stopped before its result was stored; the bridge remembers it ran, and its answer is reported (looked up, not sent again). {instead}"),
            Some(a.tool_result),
            a.attempts,
            None,
        ),
        Err(e @ BridgeError::Remote { retryable: false, .. }) => (
            Status::Failed,
            format!("An earlier attempt sent this action to the bridge and stopped before its result was stored; the bridge remembers it failed: {e}. Not sent again. {instead}"),
            None,
            1,
            Some(e.to_string()),
        ),
        Err(BridgeError::NotRemembered { .. }) => {
            // The bridge remembers every answer it gave (for up to 6 hours): the earlier call
            // never ran to one.
            tracing::info!("the bridge remembers no answer to the earlier attempt: it never ran; this attempt's result stands");
            return Ok(None);
        }
        Err(BridgeError::Held { why, .. }) => {
            return Err(Deferred(format!(
                "an earlier attempt sent this action to the bridge; asking what came of it waits: {why}"
            )))
        }
        Err(e) => {
            // Unreachable, or still running the earlier call ("ask again"): ask on redelivery.
            tracing::warn!(error = %e, "the bridge could not say what came of an earlier attempt");
            return Err(Deferred(format!(
                "an earlier attempt sent this action to the bridge, which could not say what came of it ({e})"
            )));
        }
    };
    let mut r = reached;
    r.error_field = None;
    r.approval = None;
    // This attempt's votes authorized nothing (they are in the rationale); the votes of the
    // attempt that ran it were lost with it.
    r.judges = Vec::new();
    r.panel = None;
    r.status = status;
    r.rationale = rationale;
    r.tool_result = tool_result;
    r.bridge = Some(BridgeSummary {
        attempts,
        ms,
        error,
        repost: false,
        looked_up: true,
    });
    Ok(Some(r))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bridge::{BridgeAnswer, BridgeError};

    fn refused() -> ResultMessage {
        Draft::default().rejected("agent", "agent guest is quarantined".into())
    }

    #[test]
    fn a_remembered_answer_is_reported_as_the_outcome_with_what_this_attempt_reached() {
        let r = settle_past(
            refused(),
            Ok(BridgeAnswer {
                tool_result: serde_json::json!({"status": "success"}),
                attempts: 1,
            }),
            Duration::from_millis(7),
        )
        .unwrap_or_else(|_| panic!("settled"))
        .expect("remembered");
        assert_eq!(r.status, Status::Success);
        assert!(r.error_field.is_none());
        assert!(r.tool_result.is_some());
        assert!(
            r.rationale.contains("would have ended REJECTED"),
            "{}",
            r.rationale
        );
        assert!(r.rationale.contains("quarantined"), "{}", r.rationale);
        let b = r.bridge.unwrap();
        assert_eq!(b.ms, 7);
        assert!(b.looked_up && !b.repost);
    }

    #[test]
    fn a_remembered_failure_is_failed_and_no_memory_lets_the_refusal_stand() {
        let failed = settle_past(
            refused(),
            Err(BridgeError::Remote {
                error: "quota".into(),
                retryable: false,
            }),
            Duration::ZERO,
        )
        .unwrap_or_else(|_| panic!("settled"))
        .expect("remembered");
        assert_eq!(failed.status, Status::Failed);
        assert!(failed.bridge.unwrap().error.is_some());
        let none = settle_past(
            refused(),
            Err(BridgeError::NotRemembered {
                error: "no answer remembered".into(),
            }),
            Duration::ZERO,
        );
        assert!(matches!(none, Ok(None)));
    }

    #[test]
    fn a_bridge_that_cant_be_asked_defers_the_command() {
        let held = settle_past(
            refused(),
            Err(BridgeError::Held {
                attempts: 0,
                why: "paused".into(),
            }),
            Duration::ZERO,
        );
        assert!(matches!(held, Err(Deferred(w)) if w.contains("paused")));
        let down = settle_past(
            refused(),
            Err(BridgeError::Remote {
                error: "busy".into(),
                retryable: true,
            }),
            Duration::ZERO,
        );
        assert!(down.is_err());
    }
}
