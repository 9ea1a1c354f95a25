//! The panel stage: the judges vote on a JUDGE command; an approved one goes on to the bridge,
//! any other ends NEEDS_APPROVAL.

use super::*;

impl Pipeline {
    pub(super) async fn judge_then_execute(
        &self,
        cmd: &Command,
        agent: &Agent,
        decision: &Decision,
        mut draft: Draft,
    ) -> Result<ResultMessage, Deferred> {
        if !self.gate.may_judge() {
            return Err(Deferred("halted before judging".into()));
        }
        let request = JudgeRequest {
            action_id: cmd.action_id.to_string(),
            command_type: cmd.command_type,
            service: cmd.service.clone(),
            agent: agent.clone(),
            declared_severity: decision.declared_severity,
            effective_severity: decision.effective_severity,
            policy_rationale: decision.rationale.clone(),
            recent_attempts: self.history.recent(agent.id.as_str(), cmd.command_type),
            probe: false,
        };
        let report = self.panel.convene(&request, decision.decision_rule).await;
        let summary = report.summary();
        draft.panel = Some(summary);
        let rationale = panel_rationale(&report, &summary);
        draft.judges = report.votes;
        match report.outcome {
            PanelOutcome::NotApproved => Ok(draft.finish(Status::NeedsApproval, rationale)),
            PanelOutcome::Approved => self.execute(cmd, agent, draft, rationale).await,
        }
    }
}
