//! Alerts for humans: one message per team on `mcp.alerts`, routing key `<team>.<priority>`.

use super::{AgentView, ApprovalTicket, JudgeVote, Priority, ResultMessage, Status, Team};
use crate::intake::{ActionId, CommandType, Service};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    pub alert_id: String,
    pub team: String,
    pub priority: Priority,
    pub action_id: Option<ActionId>,
    pub command_type: Option<CommandType>,
    pub service: Option<Service>,
    pub agent: Option<AgentView>,
    /// The command's status; absent for control alerts (halt, refused lever, trip).
    pub status: Option<Status>,
    /// What happened, in one sentence.
    pub summary: String,
    pub rationale: String,
    /// What the human receiving it should do.
    pub action_required: String,
    pub poller_instance: String,
    pub at: String,
    /// NEEDS_APPROVAL only: everything an approver needs to decide, and how to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<ApprovalNotice>,
}

/// What a NEEDS_APPROVAL alert tells the approvers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApprovalNotice {
    #[serde(flatten)]
    pub ticket: ApprovalTicket,
    /// The judges' votes, with their reasons.
    pub votes: Vec<JudgeVote>,
    /// The exact command lines (fill in the reason).
    pub approve_command: String,
    pub deny_command: String,
}

impl ApprovalNotice {
    pub fn new(ticket: &ApprovalTicket, votes: &[JudgeVote]) -> Self {
        Self {
            approve_command: format!(
                "command-poller approve {} --digest {} --reason \"...\"",
                ticket.approval_id, ticket.digest
            ),
            deny_command: format!(
                "command-poller deny {} --reason \"...\"",
                ticket.approval_id
            ),
            ticket: ticket.clone(),
            votes: votes.to_vec(),
        }
    }
}

impl Alert {
    pub fn routing_key(&self) -> String {
        format!("{}.{}", self.team, self.priority.as_str())
    }
}

fn action_required(status: Status) -> &'static str {
    match status {
        Status::Blocked => "Review the request manually: confirm with the agent's owner whether this integration is wanted, and follow the security and permissions review before connecting anything. If the service appears connected anyway, follow Emergency-INT-E02 (master shut-off).",
        Status::NeedsApproval => "Review the judges' reasons and approve or deny the action manually: `command-poller approvals list` shows it; run the approve_command or deny_command below (as an approver, with your reason) before it expires. Repeated unapproved REFRESH_TOKEN attempts from one agent: follow Emergency-INT-E01 (pause the poller).",
        Status::Denied => "No action required: an approver denied it and it was never executed.",
        Status::Expired => "Nobody decided in time, so it was never executed. If it is still wanted, the agent sends it again under a new action_id; if approvals keep expiring, look at who is on the approver rota.",
        Status::Failed => "Check the Apps Script bridge and the target service; the action did not complete and the agent may retry it.",
        Status::UnknownOutcome => "Check the target service (and the Apps Script executions log) to find out whether this action took effect: the bridge ran it but its answer was lost. Do not retry it until you know; send it again under a new action_id only if it did not happen.",
        Status::Success | Status::Rejected => "No action required.",
    }
}

/// The routes an outcome's alerts take: what the policy routes, or, when it routes none, the
/// alerts the runbook always sends (an UNKNOWN_OUTCOME reaches ops at high priority, a DENIED or
/// EXPIRED one at normal). What the poller sends and what `policy test` shows.
pub fn with_defaults(mut routes: Vec<(Team, Priority)>, status: Status) -> Vec<(Team, Priority)> {
    if routes.is_empty() {
        match status {
            Status::UnknownOutcome => {
                routes.push((Team::parse("ops").expect("valid"), Priority::High))
            }
            Status::Denied | Status::Expired => {
                routes.push((Team::parse("ops").expect("valid"), Priority::Normal))
            }
            _ => {}
        }
    }
    routes
}

/// The alerts for this result: one per `(team, priority)` the policy routes it to (the caller
/// asks the policy for them). An UNKNOWN_OUTCOME always reaches ops.
pub fn alerts_for(routes: Vec<(Team, Priority)>, result: &ResultMessage) -> Vec<Alert> {
    let Some(t) = result.command_type else {
        return Vec::new();
    };
    let agent = result
        .agent
        .as_ref()
        .map(|a| {
            if a.verified {
                a.id.to_string()
            } else {
                format!("{} (unverified)", a.id)
            }
        })
        .unwrap_or_else(|| "unknown agent".into());
    let service = result
        .service
        .as_ref()
        .map_or("unknown service", |s| s.as_str());
    let action = result
        .action_id
        .as_ref()
        .map_or("unknown action", |a| a.as_str());
    let summary = format!(
        "{t} for service {service} by agent {agent} (action {action}) ended {}",
        result.status
    );
    let routes = with_defaults(routes, result.status);
    let approval = result
        .approval
        .as_ref()
        .filter(|_| result.status == Status::NeedsApproval)
        .map(|t| ApprovalNotice::new(t, &result.judges));
    routes
        .into_iter()
        .map(|(team, priority)| Alert {
            alert_id: uuid::Uuid::new_v4().to_string(),
            team: team.as_str().to_owned(),
            priority,
            action_id: result.action_id.clone(),
            command_type: result.command_type,
            service: result.service.clone(),
            agent: result.agent.clone(),
            status: Some(result.status),
            summary: summary.clone(),
            rationale: result.rationale.clone(),
            action_required: action_required(result.status).to_owned(),
            poller_instance: result.poller_instance.clone(),
            at: result.completed_at.clone(),
            approval: approval.clone(),
        })
        .collect()
}

/// The security alert for an agent that sent an operator lever (`lever`, its wire name) as a
/// command, refused at intake: attached to the REJECTED result it got.
pub fn lever_attempt(lever: &str, result: &ResultMessage) -> Alert {
    let agent = result.agent.as_ref().map_or_else(
        || "an agent the broker did not vouch for".to_owned(),
        |a| format!("agent {}", a.id),
    );
    Alert {
        alert_id: uuid::Uuid::new_v4().to_string(),
        team: "security".to_owned(),
        priority: Priority::High,
        action_id: result.action_id.clone(),
        command_type: None,
        service: None,
        agent: result.agent.clone(),
        status: Some(result.status),
        summary: format!("{agent} sent {lever}, an operator lever, as a command: refused"),
        rationale: result.rationale.clone(),
        action_required: "Agents never revoke or disconnect integrations: investigate the agent's decision logs and credentials (Emergency-INT-E01 step 3); quarantine it (`command-poller quarantine AGENT`) if it persists.".into(),
        poller_instance: result.poller_instance.clone(),
        at: result.completed_at.clone(),
        approval: None,
    }
}
