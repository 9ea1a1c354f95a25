//! The conclude stage: a final result with its alerts and audit events; a NEEDS_APPROVAL command
//! parked for approvers first.

use super::claim::Claimed;
use super::draft::Subject;
use super::*;

impl Pipeline {
    /// Conclude: the result parked first when it needs approval (the result names the
    /// approval), the attempt recorded, then concluded with its alerts and audit events under
    /// the claim. Deferred, with the claim, when the park can't be stored (fail closed).
    pub(super) async fn finish(
        &self,
        subject: Subject<'_>,
        reply: ReplyTarget,
        policy: &Policy,
        claimed: Claimed,
        mut result: ResultMessage,
        t: &mut Trace,
    ) -> Disposition {
        let Subject { msg, agent, cmd } = subject;
        if result.status == Status::NeedsApproval {
            // Parked for approvers before it is published: the result names the approval.
            let parked = self
                .park(cmd, agent, msg.user_id.as_deref(), &reply, &result, policy)
                .await;
            match parked {
                Ok(rec) => {
                    let ticket = rec.ticket();
                    t.trail.push(AuditEvent::ApprovalParked {
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
                    return deferred(why, Some(claimed.guard), t.trail());
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
                    service: Some(cmd.service.to_string()),
                    instance: self.instance.clone(),
                }
            });
        let mut outcome = self.conclude(result, reply, t.trail());
        outcome.unapproved = unapproved;
        outcome.command_digest = Some(claimed.digest);
        Disposition::Conclude {
            outcome,
            claim: Some(claimed.guard),
        }
    }

    /// Parks a NEEDS_APPROVAL command in the shared store (or finds it parked by an earlier
    /// delivery of the same command): the record approvers decide on.
    pub(super) async fn park(
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
            justification: cmd.justification.clone(),
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

    /// The alerts the policy routes for `result`.
    pub(super) fn alerts(&self, result: &ResultMessage) -> Vec<crate::outcome::Alert> {
        alerts_for(
            self.policy
                .snapshot()
                .routes(result.command_type, result.status),
            result,
        )
    }

    /// A final result with its alerts and the audit events of how it was reached.
    pub(super) fn conclude(
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
        if let Some(g) = &result.grant {
            trail.push(AuditEvent::GrantUsed {
                at: now_rfc3339(),
                grant: g.clone(),
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
}
