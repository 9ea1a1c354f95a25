//! The panel stage: the judges vote on a JUDGE command; an approved one goes on to the bridge.
//! One they did not approve goes on too when a scoped grant covers it (the hard rules checked
//! and held, one of the grant's uses counted for the fleet); any other ends NEEDS_APPROVAL.

use super::*;
use poller_core::control::grant;
use poller_core::outcome::GrantUse;

/// What a grant does for a command the judges did not approve.
enum ByGrant {
    /// No grant covers it.
    None,
    /// A grant covers it but can't let it through: why (said in the NEEDS_APPROVAL rationale).
    Refused(String),
    /// Let through: one use counted.
    Used(GrantUse),
}

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
            justification: cmd.justification.clone(),
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
        if report.outcome == PanelOutcome::Approved {
            draft.judges = report.votes;
            return self.execute(cmd, agent, draft, rationale).await;
        }
        let by_grant = self.by_grant(cmd, agent, &request, &report).await;
        draft.judges = report.votes;
        match by_grant {
            ByGrant::None => Ok(draft.finish(Status::NeedsApproval, rationale)),
            ByGrant::Refused(why) => Ok(draft.finish(
                Status::NeedsApproval,
                format!("{rationale} A grant covers it but did not let it through: {why}."),
            )),
            ByGrant::Used(g) => {
                tracing::info!(grant = %g.grant_id, use_no = g.use_no, uses = g.uses, "let through by a grant");
                let rationale = format!("{} {rationale}", g.words());
                draft.grant = Some(g);
                self.execute(cmd, agent, draft, rationale).await
            }
        }
    }

    /// Whether a grant in force lets through the command the judges did not approve: never
    /// past a veto or a vetoing judge that could not answer (the hard rules are asked when the
    /// panel settled without them); one use counted in the shared store, once per command.
    async fn by_grant(
        &self,
        cmd: &Command,
        agent: &Agent,
        request: &JudgeRequest,
        report: &PanelReport,
    ) -> ByGrant {
        let now = crate::clock::unix_now();
        let Some((id, g)) = self.gate.grant_covering(
            &agent.control_key(),
            cmd.command_type,
            cmd.service.as_str(),
            now,
        ) else {
            return ByGrant::None;
        };
        let id = id.as_str();
        // The hard rules as the panel heard them, or asked now when it settled without them.
        let hard_rules = match &report.veto {
            Some((judge, rule, reason)) => Err(format!("{judge} vetoed ({rule}): {reason}")),
            None if report.hard_rules_held => Ok(()),
            None => self.panel.hard_rules(request).await,
        };
        if let Err(why) = hard_rules {
            return ByGrant::Refused(format!("grant {id} never overrides the hard rules: {why}"));
        }
        let key = crate::store::action_key(agent, &cmd.action_id);
        let window = Duration::from_secs(g.window_secs());
        match self
            .grant_uses
            .hit(&grant::count_key(id), &key, g.uses as usize, window)
            .await
        {
            Ok(hit) if hit.allowed => ByGrant::Used(GrantUse {
                grant_id: id.to_owned(),
                use_no: hit.count as u32,
                uses: g.uses,
                granted_by: g.approvers(),
                reason: g.reason.clone(),
                until: crate::clock::rfc3339(g.until),
            }),
            Ok(hit) => ByGrant::Refused(format!(
                "grant {id} is used up ({} of {} uses)",
                hit.count, g.uses
            )),
            // Fail closed: a use that can't be counted is not taken.
            Err(e) => ByGrant::Refused(format!("grant {id}'s uses can't be counted now ({e})")),
        }
    }
}
