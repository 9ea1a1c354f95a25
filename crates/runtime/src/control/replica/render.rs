//! Pure rendering of every message the control path publishes: control events (with their
//! audit records), control alerts, replies to operators, and the lever a trip pulls on the
//! other replicas.
//!
//! In: the replica's [`Names`] and what happened. Out: [`Outgoing`] messages and audit records
//! built from the broker name constants. No I/O: tested without a broker.

use crate::broker::names::{message_type, routing};
use crate::broker::Outgoing;
use crate::outcome::{Alert, Priority, Status};
use poller_core::audit::{AuditEvent, AuditRecord};
use poller_core::control::{ControlCommand, ControlState};
use serde::{Deserialize, Serialize};

/// Where the control path publishes, and as whom.
#[derive(Debug, Clone)]
pub struct Names {
    pub control_exchange: String,
    pub alerts_exchange: String,
    pub audit_exchange: String,
    pub dead_letter_exchange: String,
    /// This replica.
    pub instance: String,
    /// The broker user the poller publishes as.
    pub poller_user: String,
    /// How the control stream and events queue spread over a cluster when declared.
    pub replication: crate::broker::settings::Replication,
}

/// A replica's answer to a control message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicaReply {
    pub instance: String,
    pub request_id: String,
    pub accepted: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refusal: Option<String>,
    pub state: ControlState,
    /// The SHA-256 of the policy this replica runs: a fleet with mixed policies shows here.
    #[serde(default)]
    pub policy_sha256: String,
    /// The broker node this replica is connected to (URL, password masked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker_node: Option<String>,
    pub in_flight: usize,
    pub at_bridge: usize,
    pub processed: usize,
    /// The last results' action_id and status, newest last.
    pub recent_results: Vec<(String, Status)>,
    /// A revoke or disconnect: what the bridge did, from the replica that carried it out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cut: Option<crate::control::cut::CutReport>,
}

/// A control event, published as `event.<kind>`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ControlEvent {
    pub kind: String,
    pub instance: String,
    pub actor: String,
    pub request_id: String,
    pub state: ControlState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    pub at: String,
}

/// A control event's message and its audit record (one per control change).
pub fn event(e: &ControlEvent, names: &Names) -> (Outgoing, AuditRecord) {
    let msg = Outgoing {
        exchange: names.control_exchange.clone(),
        routing_key: format!("{}{}", routing::EVENT_PREFIX, e.kind),
        body: serde_json::to_vec(e).expect("an event serializes"),
        message_type: message_type::CONTROL_EVENT,
        ..Default::default()
    };
    let record = AuditRecord {
        kind: "control".into(),
        action_id: None,
        agent: None,
        instance: names.instance.clone(),
        at: e.at.clone(),
        events: vec![AuditEvent::ControlChange {
            at: e.at.clone(),
            kind: e.kind.clone(),
            actor: e.actor.clone(),
            request_id: e.request_id.clone(),
            mode: crate::outcome::wire_name(&e.state.mode),
            reason: e.state.reason.clone(),
            detail: e.detail.clone(),
        }],
    };
    (msg, record)
}

/// The control audit record's event for a control alert sent: kind `alert_sent`, its id as
/// the request id (each alert its own timeline entry), the team, priority and summary as the
/// detail.
pub fn sent_alert(a: &Alert, state: &ControlState) -> ControlEvent {
    ControlEvent {
        kind: ALERT_SENT.into(),
        instance: a.poller_instance.clone(),
        actor: a.poller_instance.clone(),
        request_id: a.alert_id.clone(),
        state: state.clone(),
        detail: Some(format!(
            "{} {}: {}",
            a.team,
            crate::outcome::wire_name(&a.priority),
            a.summary
        )),
        at: a.at.clone(),
    }
}

/// The control record kind of a control alert sent.
pub const ALERT_SENT: &str = "alert_sent";

/// A policy reload on one replica (or its refusal): the `event.policy_reloaded` /
/// `event.policy_reload_refused` message and its audit record (who, digest before and after).
pub fn policy_reload(
    names: &Names,
    actor: &str,
    request_id: &str,
    state: &ControlState,
    reload: &PolicyReload,
    at: String,
) -> (Outgoing, AuditRecord) {
    let (kind, detail) = match &reload.refused {
        None => (
            "policy_reloaded",
            format!("sha256 {} -> {}", reload.before, reload.after),
        ),
        Some(why) => (
            "policy_reload_refused",
            format!("refused, sha256 {} stays: {why}", reload.before),
        ),
    };
    let e = ControlEvent {
        kind: kind.into(),
        instance: names.instance.clone(),
        actor: actor.to_owned(),
        request_id: request_id.to_owned(),
        state: state.clone(),
        detail: Some(detail),
        at: at.clone(),
    };
    let (msg, mut record) = event(&e, names);
    record.events = vec![AuditEvent::PolicyReload {
        at,
        by: actor.to_owned(),
        before: reload.before.clone(),
        after: reload.after.clone(),
        refused: reload.refused.clone(),
    }];
    (msg, record)
}

/// What a reload did on this replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyReload {
    pub before: String,
    /// The same as `before` when refused.
    pub after: String,
    pub refused: Option<String>,
}

/// An alert about one agent (its quarantine or release): a control alert naming the agent,
/// its rationale the summary itself.
pub fn agent_alert(
    names: &Names,
    team: &str,
    priority: Priority,
    agent: &crate::outcome::AgentView,
    what: &str,
    todo: &str,
    at: String,
) -> Outgoing {
    let mut a = control_alert(names, team, priority, what, todo, what, at);
    a.agent = Some(agent.clone());
    alert_message(names, &a)
}

/// A control alert (halt, refused lever, trip, untrusted state): no command attached. The
/// message, and the alert it carries (for its audit record, [`sent_alert`]).
pub fn alert(
    names: &Names,
    team: &str,
    priority: Priority,
    what: &str,
    todo: &str,
    state: &ControlState,
    at: String,
) -> (Outgoing, Alert) {
    let a = control_alert(names, team, priority, what, todo, &state.reason, at);
    (alert_message(names, &a), a)
}

fn control_alert(
    names: &Names,
    team: &str,
    priority: Priority,
    what: &str,
    todo: &str,
    rationale: &str,
    at: String,
) -> Alert {
    Alert {
        alert_id: uuid::Uuid::new_v4().to_string(),
        team: team.to_owned(),
        priority,
        action_id: None,
        command_type: None,
        service: None,
        agent: None,
        status: None,
        summary: what.to_owned(),
        rationale: rationale.to_owned(),
        action_required: todo.to_owned(),
        poller_instance: names.instance.clone(),
        at,
        approval: None,
    }
}

fn alert_message(names: &Names, a: &Alert) -> Outgoing {
    Outgoing {
        exchange: names.alerts_exchange.clone(),
        routing_key: a.routing_key(),
        body: serde_json::to_vec(a).expect("an alert serializes"),
        message_type: message_type::ALERT,
        user_id: Some(names.poller_user.clone()),
        ..Default::default()
    }
}

/// The answer to an operator, to its direct reply-to (best effort: RabbitMQ returns direct
/// replies as unroutable although it delivers them).
pub fn reply(reply_to: &str, r: &ReplicaReply) -> Outgoing {
    Outgoing {
        exchange: String::new(),
        routing_key: reply_to.to_owned(),
        body: serde_json::to_vec(r).expect("a reply serializes"),
        message_type: message_type::CONTROL_REPLY,
        best_effort: true,
        ..Default::default()
    }
}

/// A lever for every replica (the trip's pause), as the poller's user.
pub fn lever(cmd: &ControlCommand, names: &Names) -> Outgoing {
    Outgoing {
        exchange: names.control_exchange.clone(),
        routing_key: cmd.routing_key().into(),
        body: serde_json::to_vec(cmd).expect("a control command serializes"),
        message_type: message_type::CONTROL,
        user_id: Some(names.poller_user.clone()),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use poller_core::control::Mode;

    fn names() -> Names {
        Names {
            control_exchange: "ctl".into(),
            alerts_exchange: "alerts".into(),
            audit_exchange: "audit".into(),
            dead_letter_exchange: "dlx".into(),
            instance: "poller-1".into(),
            poller_user: "command-poller".into(),
            replication: crate::testing::REPLICATION,
        }
    }

    fn halted() -> ControlState {
        ControlState {
            mode: Mode::Halted,
            reason: "unauthorized integration".into(),
            by: "ops".into(),
            ..ControlState::initial()
        }
    }

    #[test]
    fn an_event_goes_to_event_kind_with_its_audit_record() {
        let e = ControlEvent {
            kind: "halted".into(),
            instance: "poller-1".into(),
            actor: "ops".into(),
            request_id: "r-1".into(),
            state: halted(),
            detail: None,
            at: "2026-01-01T00:00:00Z".into(),
        };
        let (msg, record) = event(&e, &names());
        assert_eq!(msg.exchange, "ctl");
        assert_eq!(msg.routing_key, "event.halted");
        assert_eq!(msg.message_type, "control_event");
        assert!(!msg.best_effort);
        let back: ControlEvent = serde_json::from_slice(&msg.body).unwrap();
        assert_eq!(back.state, e.state);
        assert_eq!(record.kind, "control");
        assert_eq!(record.instance, "poller-1");
        match &record.events[..] {
            [AuditEvent::ControlChange {
                kind,
                actor,
                mode,
                reason,
                ..
            }] => {
                assert_eq!((kind.as_str(), actor.as_str()), ("halted", "ops"));
                assert_eq!(mode, "HALTED");
                assert_eq!(reason, "unauthorized integration");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_control_alert_carries_the_state_reason_and_no_command() {
        let (o, sent) = alert(
            &names(),
            "security",
            Priority::High,
            "MASTER SHUT-OFF",
            "Emergency-INT-E02",
            &halted(),
            "t".into(),
        );
        assert_eq!(
            (o.exchange.as_str(), o.routing_key.as_str()),
            ("alerts", "security.high")
        );
        let a: Alert = serde_json::from_slice(&o.body).unwrap();
        assert_eq!(a, sent, "the message carries the alert it returns");
        assert_eq!(a.rationale, "unauthorized integration");
        assert_eq!(a.action_required, "Emergency-INT-E02");
        assert!(a.action_id.is_none() && a.status.is_none());
    }

    #[test]
    fn a_reply_is_best_effort_and_a_lever_carries_the_poller_user() {
        let r = ReplicaReply {
            instance: "poller-1".into(),
            request_id: "r-1".into(),
            accepted: true,
            refusal: None,
            state: halted(),
            policy_sha256: "p".repeat(64),
            broker_node: None,
            in_flight: 0,
            at_bridge: 0,
            processed: 3,
            recent_results: vec![],
            cut: None,
        };
        let o = reply("amq.rabbitmq.reply-to.x", &r);
        assert!(String::from_utf8_lossy(&o.body).contains(&"p".repeat(64)));
        assert!(o.best_effort);
        assert_eq!(o.exchange, "");
        assert_eq!(serde_json::from_slice::<ReplicaReply>(&o.body).unwrap(), r);
        let cmd = ControlCommand::Pause {
            reason: "trip".into(),
            request_id: "r-2".into(),
        };
        let o = lever(&cmd, &names());
        assert_eq!(o.routing_key, cmd.routing_key());
        assert_eq!(o.user_id.as_deref(), Some("command-poller"));
        assert!(!o.best_effort, "a lever must reach the replicas");
    }

    #[test]
    fn a_reload_and_a_refused_one_are_audited_with_both_digests() {
        let ok = PolicyReload {
            before: "a".repeat(64),
            after: "b".repeat(64),
            refused: None,
        };
        let (msg, record) = policy_reload(&names(), "ops-admin", "r-9", &halted(), &ok, "t".into());
        assert_eq!(msg.routing_key, "event.policy_reloaded");
        assert_eq!(record.kind, "control");
        match &record.events[..] {
            [AuditEvent::PolicyReload {
                by,
                before,
                after,
                refused: None,
                ..
            }] => {
                assert_eq!(by, "ops-admin");
                assert_eq!(before, &"a".repeat(64));
                assert_eq!(after, &"b".repeat(64));
            }
            other => panic!("{other:?}"),
        }
        let refused = PolicyReload {
            before: "a".repeat(64),
            after: "a".repeat(64),
            refused: Some("commands.X.floor_severty: unknown field".into()),
        };
        let (msg, record) = policy_reload(&names(), "SIGHUP", "", &halted(), &refused, "t".into());
        assert_eq!(msg.routing_key, "event.policy_reload_refused");
        let body = String::from_utf8_lossy(&msg.body);
        assert!(body.contains("floor_severty"), "{body}");
        assert!(matches!(
            &record.events[..],
            [AuditEvent::PolicyReload {
                refused: Some(_),
                ..
            }]
        ));
    }
}
