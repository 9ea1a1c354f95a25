//! Pure rendering of every message the command path publishes.
//!
//! In: what a disposition publishes ([`Publication`]), the inbound message (none for a parked
//! command's result), and the names the
//! worker publishes to ([`Names`]). Out: the messages in publishing order (dead letter, result,
//! reply, alerts) and the command's audit record, built from the broker name constants. No
//! I/O: tested without a broker.

use crate::broker::names::{header, message_type, routing, text};
use crate::broker::Outgoing;
use crate::clock::now_rfc3339;
use crate::intake::ReplyTarget;
use crate::pipeline::{DeadLetterBody, Inbound, Publication};
use lapin::types::{AMQPValue, FieldTable};
use poller_core::audit::{AuditEvent, AuditRecord};
use poller_core::control::trip::UnapprovedAttempt;

/// Where the command path publishes, and as whom.
#[derive(Debug, Clone)]
pub struct Names {
    pub results_exchange: String,
    pub alerts_exchange: String,
    pub dead_letter_exchange: String,
    pub audit_exchange: String,
    pub control_exchange: String,
    /// This replica (dead-letter header, audit record, trip reports).
    pub instance: String,
    /// The broker user the poller publishes as (audit records and trip reports carry it, and
    /// the broker checks it).
    pub poller_user: String,
}

/// What a message is, for how its publishing failure is treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    DeadLetter,
    Result,
    /// To the agent: not delivering it is logged, not fatal (the result is on the results
    /// exchange, and the agent may have gone away).
    Reply,
    Alert,
}

/// One message to publish.
#[derive(Debug, Clone)]
pub struct Message {
    pub part: Part,
    pub outgoing: Outgoing,
}

/// Everything one command publishes, in order, and its audit record (published last).
#[derive(Debug, Clone)]
pub struct Rendered {
    pub messages: Vec<Message>,
    pub audit: AuditRecord,
}

/// Renders a disposition's publication. The audit record lists what is published (the
/// publisher sends them in this order and stops at the first failure, so a record that goes
/// out describes what went out).
pub fn command(p: Publication<'_>, inbound: Option<&Inbound>, names: &Names) -> Rendered {
    let mut messages = Vec::new();
    let mut trail = p.audit.to_vec();
    // Only a delivery is dead-lettered: a parked command's result never is.
    if let (Some(dl), Some(inbound)) = (p.dead_letter, inbound) {
        messages.push(dead_letter(dl, inbound, names));
        trail.push(AuditEvent::DeadLettered {
            at: now_rfc3339(),
            reason: dl.reason.clone(),
        });
    }
    if let Some(result) = p.result {
        let body = serde_json::to_vec(result).expect("result serializes");
        if let Some(queue) = p.reply.routing_key() {
            if p.to_results {
                messages.push(Message {
                    part: Part::Result,
                    outgoing: result_message(names, result, body.clone()),
                });
            }
            messages.push(Message {
                part: Part::Reply,
                outgoing: Outgoing {
                    exchange: String::new(),
                    routing_key: queue.to_owned(),
                    body,
                    correlation_id: result.action_id.as_ref().map(ToString::to_string),
                    message_type: message_type::RESULT,
                    // RabbitMQ returns direct replies as unroutable although it delivers them.
                    best_effort: matches!(p.reply, ReplyTarget::DirectReplyTo(_)),
                    ..Default::default()
                },
            });
        } else if p.to_results {
            messages.push(Message {
                part: Part::Result,
                outgoing: result_message(names, result, body),
            });
        }
        trail.push(AuditEvent::ResultPublished {
            at: now_rfc3339(),
            status: result.status,
            routing_key: result.status.routing_key(),
            rationale: result.rationale.clone(),
        });
    }
    for alert in p.alerts {
        messages.push(Message {
            part: Part::Alert,
            outgoing: Outgoing {
                exchange: names.alerts_exchange.clone(),
                routing_key: alert.routing_key(),
                body: serde_json::to_vec(alert).expect("alert serializes"),
                correlation_id: alert.action_id.as_ref().map(ToString::to_string),
                message_type: message_type::ALERT,
                // Consumers check it: only the poller's alerts carry the poller's user.
                user_id: Some(names.poller_user.clone()),
                ..Default::default()
            },
        });
        trail.push(AuditEvent::AlertSent {
            at: now_rfc3339(),
            team: alert.team.clone(),
            priority: alert.priority,
        });
    }
    let audit = AuditRecord {
        kind: "command".into(),
        action_id: p.result.and_then(|r| r.action_id.clone()),
        agent: p
            .result
            .and_then(|r| r.agent.as_ref().map(|a| a.id.clone()))
            .or_else(|| {
                inbound
                    .and_then(|i| i.user_id.as_deref())
                    .and_then(|u| crate::intake::AgentId::parse(u).ok())
            }),
        instance: names.instance.clone(),
        at: now_rfc3339(),
        events: trail,
    };
    Rendered { messages, audit }
}

/// A dead letter: the original body (or only its digest and size, for an oversized one) with
/// why, which field, and where it came from in its headers.
fn dead_letter(dl: &crate::pipeline::DeadLetter, inbound: &Inbound, names: &Names) -> Message {
    let mut headers = FieldTable::default();
    headers.insert(header::REASON.into(), text(&dl.reason));
    headers.insert(header::FIELD.into(), text(&dl.field));
    headers.insert(
        header::ORIGINAL_ROUTING_KEY.into(),
        text(&inbound.routing_key),
    );
    if let Some(u) = &inbound.user_id {
        headers.insert(header::ORIGINAL_USER_ID.into(), text(u));
    }
    headers.insert(header::INSTANCE.into(), text(&names.instance));
    let body = match &dl.body {
        DeadLetterBody::Original => inbound.payload.clone(),
        DeadLetterBody::Withheld { sha256, bytes } => {
            headers.insert(header::PAYLOAD_SHA256.into(), text(sha256));
            headers.insert(
                header::PAYLOAD_BYTES.into(),
                AMQPValue::LongLongInt(i64::try_from(*bytes).unwrap_or(i64::MAX)),
            );
            Vec::new()
        }
    };
    Message {
        part: Part::DeadLetter,
        outgoing: Outgoing {
            exchange: names.dead_letter_exchange.clone(),
            routing_key: inbound.routing_key.clone(),
            body,
            message_type: message_type::DEAD_LETTER,
            headers: Some(headers),
            ..Default::default()
        },
    }
}

fn result_message(
    names: &Names,
    result: &crate::outcome::ResultMessage,
    body: Vec<u8>,
) -> Outgoing {
    Outgoing {
        exchange: names.results_exchange.clone(),
        routing_key: result.status.routing_key(),
        body,
        correlation_id: result.action_id.as_ref().map(ToString::to_string),
        message_type: message_type::RESULT,
        ..Default::default()
    }
}

/// An unapproved attempt for every replica's trip: published through the control exchange as
/// the poller's user, best effort (no replica listening, the last one shutting down, is not a
/// failure of the command).
pub fn unapproved_attempt(a: &UnapprovedAttempt, names: &Names) -> Outgoing {
    Outgoing {
        exchange: names.control_exchange.clone(),
        routing_key: routing::ATTEMPT_UNAPPROVED.into(),
        body: serde_json::to_vec(a).expect("an attempt serializes"),
        message_type: message_type::ATTEMPT,
        user_id: Some(names.poller_user.clone()),
        best_effort: true,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intake::CommandType;
    use crate::outcome::{Alert, ResultMessage, Status};
    use crate::pipeline::DeadLetter;

    fn names() -> Names {
        Names {
            results_exchange: "r".into(),
            alerts_exchange: "a".into(),
            dead_letter_exchange: "dlx".into(),
            audit_exchange: "audit".into(),
            control_exchange: "control".into(),
            instance: "poller-1".into(),
            poller_user: "command-poller".into(),
        }
    }

    fn inbound() -> Inbound {
        Inbound {
            payload: b"{\"action_id\":".to_vec(),
            user_id: Some("agent-7".into()),
            reply_to: None,
            content_type: None,
            routing_key: "commands".into(),
            redelivered: false,
            message_type: None,
        }
    }

    fn result(status: Status) -> ResultMessage {
        serde_json::from_value(serde_json::json!({
            "action_id": "a-1", "command_type": "REFRESH_TOKEN", "service": "google",
            "agent": {"id": "agent-7", "verified": true},
            "status": status, "rationale": "because",
            "received_at": "2026-01-01T00:00:00Z", "completed_at": "2026-01-01T00:00:01Z",
            "poller_instance": "poller-1"
        }))
        .unwrap()
    }

    fn header_text(o: &Outgoing, name: &str) -> Option<String> {
        match o.headers.as_ref()?.inner().get(name)? {
            AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
            AMQPValue::LongLongInt(n) => Some(n.to_string()),
            _ => None,
        }
    }

    /// A lookup's answer goes to the asker's reply target only, never to the results exchange
    /// (consumers of results see one final result per action, not one per lookup).
    #[test]
    fn a_lookup_answer_goes_to_the_asker_only() {
        let r = result(Status::Success);
        let reply = ReplyTarget::DirectReplyTo("amq.rabbitmq.reply-to.abc".into());
        let rendered = command(
            Publication {
                dead_letter: None,
                result: Some(&r),
                reply: &reply,
                alerts: &[],
                audit: &[],
                to_results: false,
            },
            Some(&inbound()),
            &names(),
        );
        assert_eq!(rendered.messages.len(), 1);
        assert_eq!(rendered.messages[0].part, Part::Reply);
        let o = &rendered.messages[0].outgoing;
        assert_eq!(o.exchange, "");
        assert_eq!(o.routing_key, "amq.rabbitmq.reply-to.abc");
        let nobody = command(
            Publication {
                dead_letter: None,
                result: Some(&r),
                reply: &ReplyTarget::None,
                alerts: &[],
                audit: &[],
                to_results: false,
            },
            Some(&inbound()),
            &names(),
        );
        assert!(nobody.messages.is_empty());
    }

    #[test]
    fn a_dead_letter_carries_the_body_and_why_and_the_audit_record_says_so() {
        let letter = DeadLetter {
            field: "action_id".into(),
            reason: "missing".into(),
            body: DeadLetterBody::Original,
        };
        let r = command(
            Publication {
                dead_letter: Some(&letter),
                result: None,
                reply: &ReplyTarget::None,
                alerts: &[],
                audit: &[],
                to_results: true,
            },
            Some(&inbound()),
            &names(),
        );
        assert_eq!(r.messages.len(), 1);
        let dl = &r.messages[0].outgoing;
        assert_eq!(r.messages[0].part, Part::DeadLetter);
        assert_eq!(
            (dl.exchange.as_str(), dl.routing_key.as_str()),
            ("dlx", "commands")
        );
        assert_eq!(dl.body, inbound().payload);
        assert_eq!(dl.message_type, "dead_letter");
        assert_eq!(
            header_text(dl, "x-poller-reason").as_deref(),
            Some("missing")
        );
        assert_eq!(
            header_text(dl, "x-poller-field").as_deref(),
            Some("action_id")
        );
        assert_eq!(
            header_text(dl, "x-original-user-id").as_deref(),
            Some("agent-7")
        );
        assert_eq!(
            header_text(dl, "x-poller-instance").as_deref(),
            Some("poller-1")
        );
        assert!(matches!(
            r.audit.events[..],
            [AuditEvent::DeadLettered { .. }]
        ));
        assert_eq!(r.audit.agent.as_deref(), Some("agent-7"));
        assert_eq!(r.audit.action_id, None);
    }

    #[test]
    fn an_oversized_payload_is_withheld_and_only_its_digest_goes_out() {
        let letter = DeadLetter {
            field: "payload".into(),
            reason: "too big".into(),
            body: DeadLetterBody::Withheld {
                sha256: "ab".into(),
                bytes: 5_000_000,
            },
        };
        let p = Publication {
            dead_letter: Some(&letter),
            result: None,
            reply: &ReplyTarget::None,
            alerts: &[],
            audit: &[],
            to_results: true,
        };
        let dl = &command(p, Some(&inbound()), &names()).messages[0].outgoing;
        assert!(dl.body.is_empty());
        assert_eq!(
            header_text(dl, "x-poller-payload-sha256").as_deref(),
            Some("ab")
        );
        assert_eq!(
            header_text(dl, "x-poller-payload-bytes").as_deref(),
            Some("5000000")
        );
    }

    #[test]
    fn a_result_goes_to_the_results_exchange_then_the_reply_then_the_alerts() {
        let res = result(Status::NeedsApproval);
        let alert: Alert = serde_json::from_value(serde_json::json!({
            "alert_id": "x", "team": "integrations", "priority": "high", "action_id": "a-1",
            "command_type": "REFRESH_TOKEN", "service": "google", "status": "NEEDS_APPROVAL",
            "summary": "s", "rationale": "r", "action_required": "approve", "at": "2026-01-01T00:00:01Z",
            "poller_instance": "poller-1"
        }))
        .unwrap();
        let reply = ReplyTarget::DirectReplyTo("amq.rabbitmq.reply-to.abc".into());
        let alerts = [alert];
        let r = command(
            Publication {
                dead_letter: None,
                result: Some(&res),
                reply: &reply,
                alerts: &alerts,
                audit: &[],
                to_results: true,
            },
            Some(&inbound()),
            &names(),
        );
        let parts: Vec<Part> = r.messages.iter().map(|m| m.part).collect();
        assert_eq!(parts, [Part::Result, Part::Reply, Part::Alert]);
        let (result_msg, reply_msg, alert_msg) = (
            &r.messages[0].outgoing,
            &r.messages[1].outgoing,
            &r.messages[2].outgoing,
        );
        assert_eq!(result_msg.exchange, "r");
        assert_eq!(result_msg.routing_key, "result.needs_approval");
        assert_eq!(result_msg.correlation_id.as_deref(), Some("a-1"));
        assert!(!result_msg.best_effort, "results are mandatory");
        assert_eq!(reply_msg.exchange, "");
        assert_eq!(reply_msg.routing_key, "amq.rabbitmq.reply-to.abc");
        assert_eq!(reply_msg.body, result_msg.body);
        assert!(reply_msg.best_effort, "direct replies are not mandatory");
        assert_eq!(alert_msg.exchange, "a");
        assert_eq!(alert_msg.message_type, "alert");
        // Consumers tell the poller's alerts from anyone else's by the broker-checked user.
        assert_eq!(
            alert_msg.user_id.as_deref(),
            Some(names().poller_user.as_str())
        );
        let back: ResultMessage = serde_json::from_slice(&result_msg.body).unwrap();
        assert_eq!(back.status, Status::NeedsApproval);
        assert!(matches!(
            r.audit.events[..],
            [
                AuditEvent::ResultPublished { .. },
                AuditEvent::AlertSent { .. }
            ]
        ));
        assert_eq!(r.audit.action_id.as_deref(), Some("a-1"));
        assert_eq!(r.audit.instance, "poller-1");
    }

    #[test]
    fn a_reply_to_an_agent_queue_is_mandatory() {
        let res = result(Status::Success);
        let reply = ReplyTarget::AgentQueue("reply.agent-7.x".into());
        let r = command(
            Publication {
                dead_letter: None,
                result: Some(&res),
                reply: &reply,
                alerts: &[],
                audit: &[],
                to_results: true,
            },
            Some(&inbound()),
            &names(),
        );
        assert_eq!(r.messages[1].part, Part::Reply);
        assert!(!r.messages[1].outgoing.best_effort);
    }

    #[test]
    fn an_unapproved_attempt_goes_to_the_control_exchange_as_the_poller() {
        let a = UnapprovedAttempt {
            agent: "agent-7".into(),
            command_type: CommandType::RefreshToken,
            action_id: "a-1".into(),
            status: Status::Blocked,
            at: 1,
            instance: "poller-1".into(),
            service: Some("google".into()),
        };
        let o = unapproved_attempt(&a, &names());
        assert_eq!(o.exchange, "control");
        assert_eq!(o.routing_key, "attempt.unapproved");
        assert_eq!(o.user_id.as_deref(), Some("command-poller"));
        assert!(o.best_effort);
        let back: UnapprovedAttempt = serde_json::from_slice(&o.body).unwrap();
        assert_eq!(back, a);
    }
}
