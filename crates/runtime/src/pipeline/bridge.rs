//! The bridge stage: a slot of the fleet's limit, the operator gate, then the Apps Script
//! bridge. Out: the result of the call (SUCCESS, FAILED, UNKNOWN_OUTCOME), a refusal when the
//! agent was quarantined or the service cut off meanwhile, or [`Deferred`] when held back.

use super::*;

impl Pipeline {
    pub(super) async fn execute(
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
        let grant = draft.grant.as_ref().map(|g| g.grant_id.clone());
        let held = self.gate.begin_bridge(
            &agent.control_key(),
            cmd.command_type,
            cmd.service.as_str(),
            grant.as_deref(),
        );
        let _ticket = match held {
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
            Err(Held::GrantWithdrawn(id)) => {
                // Its redelivery is judged again, and waits for approvers without the grant.
                slot.not_sent().await;
                return Err(Deferred(format!(
                    "grant {id} withdrawn before the bridge call"
                )));
            }
            Err(Held::Revoked(r)) => {
                // Revoked or disconnected while it was being decided (or waiting for approvers).
                slot.not_sent().await;
                tracing::warn!(by = %r.by, "service cut off before the bridge call; not executed");
                return Ok(draft.rejected(
                    "service",
                    poller_core::control::revocation::refusal(cmd.service.as_str(), &r),
                ));
            }
        };
        let repost = slot.earlier();
        if repost {
            tracing::warn!("re-POST: an earlier attempt already sent this action to the bridge; only the bridge's dedup keeps it from acting twice");
        }
        let request = bridge_request(cmd, agent, false);
        let started = Instant::now();
        let agent_key = agent.control_key();
        let admission = Retrying {
            gate: self.gate.as_ref(),
            agent: &agent_key,
            command_type: cmd.command_type,
            service: cmd.service.as_str(),
            grant: grant.as_deref(),
        };
        let answer = self.bridge.execute(&request, &admission).await;
        call_result(draft, rationale, answer, started.elapsed(), repost)
    }
}

/// The bridge request for `agent`'s `cmd`, sent now; `lookup`: only ask for a remembered
/// answer (never acts).
pub(super) fn bridge_request(cmd: &Command, agent: &Agent, lookup: bool) -> BridgeRequest {
    BridgeRequest {
        action_id: cmd.action_id.to_string(),
        command_type: cmd.command_type.into(),
        params: BridgeParams {
            service: cmd.service.to_string(),
        },
        agent: agent.id.to_string(),
        agent_verified: agent.verified,
        requested_at: now_rfc3339(),
        lookup,
    }
}

/// What the bridge client asks before every retry of one command: the gate still running, the
/// agent not quarantined and the command's service not cut off since (a quarantine or a revoke
/// pulled during the retries stops the next POST: the command goes back to the queue, and its
/// redelivery is refused).
struct Retrying<'a> {
    gate: &'a poller_core::control::gate::Gate,
    agent: &'a str,
    command_type: crate::intake::CommandType,
    service: &'a str,
    /// The grant that let it through, if one did.
    grant: Option<&'a str>,
}

impl crate::bridge::Admission for Retrying<'_> {
    fn admit(&self) -> Result<(), String> {
        self.gate.may_retry()?;
        if self.gate.quarantine_of(self.agent).is_some() {
            return Err(format!(
                "agent {} quarantined during the bridge call's retries",
                self.agent
            ));
        }
        if let Some(id) = self.grant.filter(|id| !self.gate.grant_in_force(id)) {
            return Err(format!(
                "grant {id} withdrawn during the bridge call's retries"
            ));
        }
        match self.gate.revocation_of(self.command_type, self.service) {
            Some(r) => Err(format!(
                "service {} {} during the bridge call's retries",
                self.service,
                r.cut.as_str()
            )),
            None => Ok(()),
        }
    }
}

/// The result of a bridge call: SUCCESS with the tool's result, FAILED, or UNKNOWN_OUTCOME when
/// the bridge ran the action and its answer was lost; `Deferred` when the gate held it back.
fn call_result(
    draft: Draft,
    rationale: String,
    answer: Result<crate::bridge::BridgeAnswer, crate::bridge::BridgeError>,
    took: std::time::Duration,
    repost: bool,
) -> Result<ResultMessage, Deferred> {
    let ms = took.as_millis() as u64;
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
                looked_up: false,
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
                looked_up: false,
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
                looked_up: false,
            });
            Ok(r)
        }
    }
}
