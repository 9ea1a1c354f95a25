//! Pure rendering of every message the approval path publishes: replies to approvers, events
//! (`event.approval.<outcome>` on the control exchange, kept in the events queue), security
//! alerts for abuse, audit records, and the webhook's Slack-compatible notice.
//!
//! In: the replica's names and what happened. Out: [`Outgoing`] messages, audit records and
//! JSON. No I/O: tested without a broker.

use crate::broker::names::{message_type, routing};
use crate::broker::Outgoing;
use crate::control::replica::Names;
use crate::outcome::{Alert, ApprovalNotice, Priority, Status};
use poller_core::approval::wire::Reply;
use poller_core::approval::Parked;
use poller_core::audit::{AuditEvent, AuditRecord};
use serde::{Deserialize, Serialize};

/// What a decision message came to, for the event and the audit record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApprovalEvent {
    /// `counted`, `approved`, `denied`, `refused`, `expired`.
    pub outcome: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approval_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// The decider's broker user (`poller` for an expiry), if known.
    pub by: String,
    /// `approve`, `deny`, `list`, `expire`, or what could be read of a bad message.
    pub decision: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    pub reason: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refusal: Option<String>,
    pub instance: String,
    pub at: String,
}

/// The reply to an approver, on its direct reply-to (or reply queue).
pub fn reply(reply_to: &str, correlation_id: Option<&str>, r: &Reply) -> Outgoing {
    Outgoing {
        exchange: String::new(),
        routing_key: reply_to.to_owned(),
        body: serde_json::to_vec(r).expect("a reply serializes"),
        correlation_id: correlation_id.map(str::to_owned),
        message_type: message_type::APPROVAL_REPLY,
        best_effort: true,
        ..Default::default()
    }
}

/// The event of a decision (or a refusal, or an expiry).
pub fn event(e: &ApprovalEvent, names: &Names) -> Outgoing {
    Outgoing {
        exchange: names.control_exchange.clone(),
        routing_key: format!("{}approval.{}", routing::EVENT_PREFIX, e.outcome),
        body: serde_json::to_vec(e).expect("an event serializes"),
        correlation_id: e.approval_id.clone(),
        message_type: message_type::APPROVAL_EVENT,
        user_id: Some(names.poller_user.clone()),
        ..Default::default()
    }
}

/// The audit record of a decision on a parked command (records of refusals of unknown
/// approvals carry no action).
pub fn audit(e: &ApprovalEvent, rec: Option<&Parked>, names: &Names) -> AuditRecord {
    AuditRecord {
        kind: "approval".into(),
        action_id: rec.map(|r| r.action_id.clone()),
        agent: rec.map(|r| r.agent.id.clone()),
        instance: names.instance.clone(),
        at: e.at.clone(),
        events: vec![AuditEvent::ApprovalDecision {
            at: e.at.clone(),
            approval_id: e.approval_id.clone().unwrap_or_default(),
            by: e.by.clone(),
            decision: e.decision.clone(),
            digest: e.digest.clone(),
            reason: e.reason.clone(),
            outcome: e.outcome.clone(),
            refusal: e.refusal.clone(),
        }],
    }
}

/// Security's alert about an abusive decision (a non-approver, an agent deciding its own
/// command, a message without a user, a planted record).
pub fn abuse_alert(e: &ApprovalEvent, rec: Option<&Parked>, names: &Names) -> Outgoing {
    let a = Alert {
        alert_id: uuid::Uuid::new_v4().to_string(),
        team: "security".into(),
        priority: Priority::High,
        action_id: rec.map(|r| r.action_id.clone()),
        command_type: rec.map(|r| r.command_type),
        service: rec.map(|r| r.service.clone()),
        agent: rec.map(|r| r.agent.clone()),
        status: None,
        summary: format!(
            "Refused approval decision by {}: {}",
            e.by,
            e.refusal.as_deref().unwrap_or("refused")
        ),
        rationale: e.refusal.clone().unwrap_or_default(),
        action_required: "Someone tried to decide a parked command who may not: find who holds that broker user and why. If an agent tried to approve its own command, treat the agent as compromised (Emergency-INT-E01: pause).".into(),
        poller_instance: names.instance.clone(),
        at: e.at.clone(),
        approval: None,
    };
    Outgoing {
        exchange: names.alerts_exchange.clone(),
        routing_key: a.routing_key(),
        body: serde_json::to_vec(&a).expect("an alert serializes"),
        correlation_id: e.approval_id.clone(),
        message_type: message_type::ALERT,
        user_id: Some(names.poller_user.clone()),
        ..Default::default()
    }
}

/// Security's alert about an approved record that was not executed because no NEEDS_APPROVAL
/// result for its command backs it ([`poller_core::approval::rules::backed`]).
pub fn unbacked_alert(rec: &Parked, why: &str, names: &Names) -> Outgoing {
    let a = Alert {
        alert_id: uuid::Uuid::new_v4().to_string(),
        team: "security".into(),
        priority: Priority::High,
        action_id: Some(rec.action_id.clone()),
        command_type: Some(rec.command_type),
        service: Some(rec.service.clone()),
        agent: Some(rec.agent.clone()),
        status: Some(Status::Denied),
        summary: format!(
            "Approved command not executed: approval {} is not backed by its NEEDS_APPROVAL result",
            rec.approval_id
        ),
        rationale: why.to_owned(),
        action_required: "An approval record the poller did not park (or whose command's result was replaced) was found approved in the shared store. Treat the store and the store key (POLLER_STORE_KEY) as compromised: rotate the key, check who can write the store, and pause (Emergency-INT-E01) until you know.".into(),
        poller_instance: names.instance.clone(),
        at: crate::clock::now_rfc3339(),
        approval: None,
    };
    Outgoing {
        exchange: names.alerts_exchange.clone(),
        routing_key: a.routing_key(),
        body: serde_json::to_vec(&a).expect("an alert serializes"),
        correlation_id: Some(rec.approval_id.clone()),
        message_type: message_type::ALERT,
        user_id: Some(names.poller_user.clone()),
        ..Default::default()
    }
}

/// The webhook's notice of a parked command (or its reminder), in the Slack incoming-webhook
/// shape: `text` for notifications, `blocks` for the message.
pub fn webhook_notice(rec: &Parked, reminder: bool, now: u64) -> serde_json::Value {
    let notice = ApprovalNotice::new(&rec.ticket(), &rec.judges);
    let head = if reminder {
        format!(
            "Reminder: approval {} expires in {} s",
            rec.approval_id,
            rec.expires_at.saturating_sub(now)
        )
    } else {
        format!("Approval needed: {}", rec.approval_id)
    };
    let votes: Vec<String> = rec
        .judges
        .iter()
        .map(|j| {
            format!(
                "• {}: {} ({})",
                j.name,
                crate::outcome::wire_name(&j.verdict),
                j.reason
            )
        })
        .collect();
    let detail = format!(
        "*{}* for *{}* by agent *{}*{} (action {})\n{}\nApprovals: {} of {} · expires {}",
        rec.command_type,
        rec.service,
        rec.agent.id,
        if rec.agent.verified {
            ""
        } else {
            " (unverified)"
        },
        rec.action_id,
        rec.rationale,
        rec.approvals.len(),
        rec.required,
        notice.ticket.expires_at,
    );
    let commands = format!("```{}\n{}```", notice.approve_command, notice.deny_command);
    let mut blocks = vec![
        serde_json::json!({"type": "header", "text": {"type": "plain_text", "text": head}}),
        serde_json::json!({"type": "section", "text": {"type": "mrkdwn", "text": detail}}),
    ];
    if let Some(j) = &rec.justification {
        // The agent's words as plain text: no markup, no links rendered.
        blocks.push(serde_json::json!({"type": "section", "text": {"type": "plain_text", "text": format!("The agent's justification (quoted, not verified): {j}")}}));
    }
    blocks.push(serde_json::json!({"type": "section", "text": {"type": "mrkdwn", "text": if votes.is_empty() { "No judge votes.".to_owned() } else { votes.join("\n") }}}));
    blocks
        .push(serde_json::json!({"type": "section", "text": {"type": "mrkdwn", "text": commands}}));
    serde_json::json!({
        "text": format!("{head}: {} for {} by {}", rec.command_type, rec.service, rec.agent.id),
        "blocks": blocks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use poller_core::approval::test_util::parked;

    fn names() -> Names {
        Names {
            control_exchange: "ctl".into(),
            alerts_exchange: "alerts".into(),
            audit_exchange: "audit".into(),
            dead_letter_exchange: "dlx".into(),
            instance: "i-1".into(),
            poller_user: "poller".into(),
            replication: crate::testing::REPLICATION,
        }
    }

    fn refused() -> ApprovalEvent {
        ApprovalEvent {
            outcome: "refused".into(),
            approval_id: Some("a".repeat(24)),
            action_id: Some("a-1".into()),
            agent: Some("agent-7".into()),
            by: "agent-7".into(),
            decision: "approve".into(),
            digest: Some("d".repeat(64)),
            reason: "mine".into(),
            refusal: Some("the requester never decides its own command".into()),
            instance: "i-1".into(),
            at: "2026-11-27T00:00:00Z".into(),
        }
    }

    #[test]
    fn an_abusive_decision_becomes_an_event_an_audit_record_and_a_security_alert() {
        let e = refused();
        let rec = parked();
        let ev = event(&e, &names());
        assert_eq!(ev.routing_key, "event.approval.refused");
        assert_eq!(ev.exchange, "ctl");
        let a = abuse_alert(&e, Some(&rec), &names());
        assert_eq!(a.routing_key, "security.high");
        let alert: Alert = serde_json::from_slice(&a.body).unwrap();
        assert_eq!(a.user_id.as_deref(), Some(names().poller_user.as_str()));
        assert!(alert.summary.contains("agent-7"));
        assert_eq!(alert.action_id.unwrap(), "a-1");
        let r = audit(&e, Some(&rec), &names());
        assert_eq!(r.kind, "approval");
        assert_eq!(r.action_id.unwrap(), "a-1");
        assert!(matches!(
            &r.events[0],
            AuditEvent::ApprovalDecision { outcome, by, .. } if outcome == "refused" && by == "agent-7"
        ));
    }

    #[test]
    fn the_webhook_notice_is_slack_shaped_and_carries_the_command_lines() {
        let rec = parked();
        let n = webhook_notice(&rec, false, 1100);
        assert!(n["text"].as_str().unwrap().starts_with("Approval needed"));
        let blocks = n["blocks"].as_array().unwrap();
        assert_eq!(blocks[0]["type"], "header");
        let all = n.to_string();
        assert!(all.contains(&format!(
            "command-poller approve {} --digest {}",
            rec.approval_id, rec.digest
        )));
        assert!(all.contains(&format!("command-poller deny {}", rec.approval_id)));
        let r = webhook_notice(&rec, true, 1600);
        assert!(r["text"].as_str().unwrap().contains("expires in 300 s"));
        // The agent's justification, as plain text (Slack renders no markup or links in it).
        let quoted = blocks
            .iter()
            .find(|b| {
                b["text"]["text"]
                    .as_str()
                    .is_some_and(|t| t.contains("justification"))
            })
            .expect("the justification's block");
        assert_eq!(quoted["text"]["type"], "plain_text");
        assert!(quoted["text"]["text"]
            .as_str()
            .unwrap()
            .contains("weekly refresh for the newsletter"));
    }
}
