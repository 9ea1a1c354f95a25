//! Parked commands brought to their end after a human decision: executed once approved
//! ([`Pipeline::approved`]), or closed DENIED or EXPIRED, or refused when nothing backs the
//! record. Called by the approval sweeper under the command's claim.

use super::*;

impl Pipeline {
    /// Whether an approved command may be executed now: the system is running. Checked again
    /// under the claim, before the bridge call.
    pub fn running(&self) -> bool {
        self.gate.mode() == poller_core::control::Mode::Running
    }

    /// Holds the claim on a parked command's key for this replica, as the command's own
    /// processing would (`None`: another replica holds it).
    pub async fn hold_claim(
        &self,
        key: &str,
    ) -> Result<Option<ClaimGuard>, crate::store::StoreError> {
        self.claims.hold(key.to_owned()).await
    }

    /// Executes an approved parked command: the same gate, bridge slots and bridge client as
    /// any command. `Err`: held back (paused, halted), to be tried again.
    pub async fn approved(&self, rec: &Parked) -> Result<ResultMessage, String> {
        let draft = Draft::of(rec, &self.instance);
        let cmd = Command {
            justification: rec.justification.clone(),
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
        let in_force = self.policy.digest();
        let reached = if rec.policy_digest != in_force {
            // Approved as decided under another policy: never executed under this one.
            draft.finish(
                Status::Denied,
                format!(
                    "Approved by {}, but the policy changed before it was executed (parked under {}, now {}): not executed. Send it again under a new action_id to have it decided under the current policy.",
                    approvers(rec),
                    &rec.policy_digest[..12.min(rec.policy_digest.len())],
                    &in_force[..12]
                ),
            )
        } else {
            let rationale = format!(
                "Approved by {} ({} of {} required).",
                approvers(rec),
                rec.approvals.len(),
                rec.required
            );
            self.execute(&cmd, &agent, draft, rationale)
                .await
                .map_err(|Deferred(why)| why)?
        };
        // Not executed by this attempt: an earlier one (a sweeper killed after its call) may
        // have executed it.
        let mut r = match self.past(&cmd, &agent, &reached).await {
            Ok(past::Past::None) => reached,
            Ok(past::Past::Sent(r)) => *r,
            Err(Deferred(why)) => return Err(why),
        };
        r.approvals = rec.approvals.clone();
        Ok(r)
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
}
