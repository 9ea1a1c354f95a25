//! What a command's processing has gathered so far, whatever stage it stops at: the fields of
//! its result ([`Draft`]), the audit events ([`Trace`]), and the small pure pieces that word its
//! rationale and refusals.

use super::*;

/// What one command's stages gather as it goes: the span, the audit events, the result's
/// fields, and the agent as far as the broker vouches for it (for replies to messages refused
/// before identity is settled).
pub(super) struct Trace {
    pub span: tracing::Span,
    pub trail: Vec<AuditEvent>,
    pub draft: Draft,
    pub broker_agent: Option<Agent>,
}

/// The command a stage works on: the delivery, the agent identity settled, the command.
#[derive(Clone, Copy)]
pub(super) struct Subject<'a> {
    pub msg: &'a Inbound,
    pub agent: &'a Agent,
    pub cmd: &'a Command,
}

impl Trace {
    /// The audit events so far, for a disposition that ends the command here.
    pub(crate) fn trail(&mut self) -> Vec<AuditEvent> {
        std::mem::take(&mut self.trail)
    }

    /// The result's fields so far, to finish the result with.
    pub(crate) fn draft(&mut self) -> Draft {
        std::mem::take(&mut self.draft)
    }

    /// A refusal of `field`: recorded in the audit, and the REJECTED result that says why.
    pub(crate) fn reject(&mut self, field: &str, reason: String) -> ResultMessage {
        self.trail.push(rejected_event(field, &reason));
        self.draft().rejected(field, reason)
    }
}

/// Fields known so far, to build a result at whatever stage the command stops.
#[derive(Default)]
pub(super) struct Draft {
    pub received_at: String,
    pub instance: String,
    pub action_id: Option<ActionId>,
    pub command_type: Option<CommandType>,
    pub service: Option<Service>,
    pub agent: Option<AgentView>,
    pub severity: Option<SeverityView>,
    pub judges: Vec<JudgeVote>,
    pub panel: Option<crate::outcome::PanelSummary>,
    /// The grant that let it through instead of a human's approval.
    pub grant: Option<crate::outcome::GrantUse>,
}

impl Draft {
    /// The fields of a parked command, for its final result.
    pub(crate) fn of(rec: &Parked, instance: &str) -> Self {
        Self {
            received_at: rec.received_at.clone(),
            instance: instance.to_owned(),
            action_id: Some(rec.action_id.clone()),
            command_type: Some(rec.command_type),
            service: Some(rec.service.clone()),
            agent: Some(rec.agent.clone()),
            severity: rec.severity_view.clone(),
            judges: rec.judges.clone(),
            panel: rec.panel,
            grant: None,
        }
    }

    pub(crate) fn finish(self, status: Status, rationale: String) -> ResultMessage {
        ResultMessage {
            action_id: self.action_id,
            command_type: self.command_type,
            service: self.service,
            agent: self.agent,
            status,
            rationale,
            tool_result: None,
            judges: self.judges,
            panel: self.panel,
            severity: self.severity,
            error_field: None,
            bridge: None,
            received_at: self.received_at,
            completed_at: now_rfc3339(),
            poller_instance: self.instance,
            replay: false,
            approval: None,
            approvals: Vec::new(),
            grant: self.grant,
        }
    }

    pub(crate) fn rejected(self, field: &str, reason: String) -> ResultMessage {
        let mut r = self.finish(Status::Rejected, format!("Command rejected: {reason}"));
        r.error_field = Some(field.to_owned());
        r
    }
}

/// The rationale of a judged command: the outcome, the count and the rule that decided.
pub(super) fn panel_rationale(report: &PanelReport, s: &PanelSummary) -> String {
    use crate::judging::DecisionRule;
    let needed = s.rule.approvals_needed(s.size, s.quorum);
    match (report.outcome, &report.veto) {
        (PanelOutcome::NotApproved, Some((judge, rule, reason))) => format!(
            "Vetoed by the {judge} judge's hard rule {rule} ({reason}); a veto is not outvoted: a human must approve this action."
        ),
        (PanelOutcome::NotApproved, None) => {
            let why = match s.rule {
                DecisionRule::Majority => format!("{needed} needed"),
                DecisionRule::Unanimous => format!("the unanimous rule needs all {}", s.size),
                DecisionRule::Veto if s.denials > 0 => "under the veto rule one deny denies".into(),
                DecisionRule::Veto => format!("the veto rule needs {needed} approvals and no deny"),
            };
            format!(
                "Not approved by the judges ({} of {} approved; {why}): a human must approve this action.",
                s.approvals, s.size
            )
        }
        (PanelOutcome::Approved, _) => match s.rule {
            DecisionRule::Majority => format!("Approved by the judges ({} of {}).", s.approvals, s.size),
            rule => format!(
                "Approved by the judges ({} of {}) under the {rule} rule.",
                s.approvals, s.size
            ),
        },
    }
}

/// Why a quarantined agent's command is refused.
pub(super) fn quarantine_reason(agent: &str, q: &poller_core::control::Quarantined) -> String {
    format!(
        "agent {agent} is in quarantine (by {} since {}: {}); its commands are neither judged nor executed until an operator releases it (`command-poller release {agent}`)",
        q.by, q.since, q.reason
    )
}

/// "alice, bob": who approved a parked command.
pub(super) fn approvers(rec: &Parked) -> String {
    rec.approvals
        .iter()
        .map(|a| a.by.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

pub(super) fn deferred(
    why: String,
    claim: Option<ClaimGuard>,
    audit: Vec<AuditEvent>,
) -> Disposition {
    tracing::info!(why = %why, "deferred: back to the queue unprocessed");
    Disposition::Defer { why, claim, audit }
}

pub(super) fn rejected_event(field: &str, reason: &str) -> AuditEvent {
    AuditEvent::Rejected {
        at: now_rfc3339(),
        field: field.to_owned(),
        reason: reason.to_owned(),
    }
}

/// For messages refused before identity was settled: direct reply-to only reaches the
/// publisher's own channel, so it is always safe; an agent queue only for a broker-checked user.
pub(super) fn lenient_reply(reply_to: Option<&str>, broker_agent: Option<&Agent>) -> ReplyTarget {
    match broker_agent {
        Some(a) => crate::intake::reply_target(reply_to, a).unwrap_or(ReplyTarget::None),
        None => match reply_to {
            Some(r) if crate::broker::names::is_direct_reply_to(r) => {
                let anyone = Agent {
                    id: AgentId::parse("unknown").expect("valid"),
                    verified: false,
                };
                crate::intake::reply_target(Some(r), &anyone).unwrap_or(ReplyTarget::None)
            }
            _ => ReplyTarget::None,
        },
    }
}
