//! The policy stage: one snapshot of the policy in force decides the command (ALLOW, JUDGE or
//! BLOCK), with the agent's recent attempts as facts; the decision is logged and audited.

use super::*;

impl Pipeline {
    /// Policy: the decision and the snapshot that made it (a reload meanwhile decides the next
    /// command, never this one).
    pub(super) fn decide(
        &self,
        agent: &Agent,
        cmd: &Command,
        t: &mut Trace,
    ) -> (Arc<Policy>, Decision) {
        let policy = self.policy.snapshot();
        let history = &self.history;
        let earlier = |w: Duration| history.count_within(agent.id.as_str(), cmd.command_type, w);
        let decision = policy.decide(
            cmd,
            &Facts {
                agent: Some(agent.id.as_str()),
                verified: agent.verified,
                earlier_attempts: &earlier,
            },
        );
        for s in &decision.shadows {
            tracing::info!(rule = %s.rule, would_have = s.would_have.as_str(), "shadow rule matched");
        }
        t.draft.severity = Some(SeverityView {
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
        t.trail.push(AuditEvent::PolicyDecision {
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
        (policy, decision)
    }

    /// What the decision leads to: BLOCKED at once, the panel (and the bridge if approved), or
    /// the bridge. `Err`: held back on the way, to be tried again.
    pub(super) async fn act(
        &self,
        cmd: &Command,
        agent: &Agent,
        decision: &Decision,
        t: &mut Trace,
    ) -> Result<ResultMessage, Deferred> {
        let draft = t.draft();
        match decision.handling {
            Handling::Block => Ok(draft.finish(Status::Blocked, decision.rationale.clone())),
            Handling::Judge => self.judge_then_execute(cmd, agent, decision, draft).await,
            Handling::Execute => {
                let rationale = decision.rationale.clone();
                self.execute(cmd, agent, draft, rationale).await
            }
        }
    }
}
