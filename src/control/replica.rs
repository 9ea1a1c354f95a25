//! The replica's side of control: declares the control topology, reads the stored state
//! before anything is consumed, then listens on its own queue for control messages and for
//! the unapproved attempts every replica shares (the trip counts them all).
//!
//! In: control deliveries. Out: gate changes, events (`event.*`), replies to the operator's
//! `reply_to`, alerts (halt, refused levers, trips) and, on a trip, the new stored state and a
//! `control.pause` for the other replicas.

use super::gate::Gate;
use super::trip::{Trip, TripWire, UnapprovedAttempt};
use super::{transition, Actor, ControlCommand, ControlState, Mode, Refusal};
use crate::audit::{AuditEvent, AuditRecord};
use crate::broker::{BrokerError, Outgoing, Publisher};
use crate::outcome::{Alert, Priority, Status};
use crate::settings::{ControlSettings, Settings};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, ExchangeKind};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

/// Declares the control exchange, the state queue (length 1, durable) and the events queue.
pub async fn declare_control(ch: &Channel, c: &ControlSettings) -> Result<(), BrokerError> {
    ch.exchange_declare(
        c.exchange.as_str().into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await?;
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), text("classic"));
    args.insert("x-max-length".into(), AMQPValue::LongInt(1));
    ch.queue_declare(
        c.state_queue.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await?;
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), text("quorum"));
    ch.queue_declare(
        c.events_queue.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await?;
    ch.queue_bind(
        c.events_queue.as_str().into(),
        c.exchange.as_str().into(),
        "event.#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    Ok(())
}

/// The stored state as read from the state queue, with its writer.
#[derive(Debug, Clone)]
pub struct StoredState {
    pub state: Option<ControlState>,
    pub writer: Option<String>,
}

/// Reads the last stored state without consuming it (get, then requeue). An empty queue is
/// read again a few times, since another reader may hold the message for a moment.
pub async fn read_state(ch: &Channel, queue: &str) -> Result<Option<StoredState>, BrokerError> {
    for attempt in 0..5 {
        if let Some(m) = ch
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await?
        {
            let d = m.delivery;
            let stored = StoredState {
                state: serde_json::from_slice(&d.data).ok(),
                writer: d.properties.user_id().as_ref().map(|u| u.to_string()),
            };
            let _ = d
                .acker
                .nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await?;
            return Ok(Some(stored));
        }
        if attempt < 4 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    Ok(None)
}

/// Replaces the stored state (persistent, confirmed). `user` must be the connection's user.
pub async fn store_state(
    publisher: &Publisher,
    c: &ControlSettings,
    state: &ControlState,
    user: &str,
) -> Result<(), BrokerError> {
    publisher
        .publish(&Outgoing {
            exchange: String::new(),
            routing_key: c.state_queue.clone(),
            body: serde_json::to_vec(state).expect("serializes"),
            message_type: "control_state",
            user_id: Some(user.to_owned()),
            ..Default::default()
        })
        .await
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
    pub in_flight: usize,
    pub at_bridge: usize,
    pub processed: usize,
    /// The last results' action_id and status, newest last.
    pub recent_results: Vec<(String, Status)>,
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

/// What the replica reports about itself.
pub trait ReplicaStats: Send + Sync {
    /// Counts an audit record the audit exchange refused.
    fn audit_diverted(&self) {}
    fn in_flight(&self) -> usize;
    fn processed(&self) -> usize;
    fn recent_results(&self) -> Vec<(String, Status)>;
}

pub struct Replica {
    pub settings: Arc<Settings>,
    pub gate: Arc<Gate>,
    pub instance: String,
    pub poller_user: String,
    pub trip: Mutex<TripWire>,
    pub stats: Arc<dyn ReplicaStats>,
}

impl Replica {
    pub fn new(
        settings: Arc<Settings>,
        gate: Arc<Gate>,
        instance: String,
        stats: Arc<dyn ReplicaStats>,
    ) -> Self {
        let poller_user = settings.poller_user();
        let trip = Mutex::new(TripWire::new(settings.control.trips.clone()));
        Self {
            settings,
            gate,
            instance,
            poller_user,
            trip,
            stats,
        }
    }

    fn control(&self) -> &ControlSettings {
        &self.settings.control
    }

    /// Declares, subscribes, then applies the stored state. Returns the consumer of this
    /// replica's control queue; nothing else is consumed before this returns.
    pub async fn attach(
        &self,
        ch: &Channel,
        publisher: &Publisher,
    ) -> Result<lapin::Consumer, BrokerError> {
        let c = self.control();
        declare_control(ch, c).await?;
        let q = ch
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        for key in ["control.#", "attempt.#"] {
            ch.queue_bind(
                q.name().clone(),
                c.exchange.as_str().into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        }
        // Subscribe before reading the state, so a change in between is not missed.
        let consumer = ch
            .basic_consume(
                q.name().clone(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        match read_state(ch, &c.state_queue).await? {
            None => {}
            Some(StoredState {
                state: Some(state),
                writer,
            }) if writer.as_deref().is_some_and(|w| self.trusted_writer(w)) => {
                if state.mode != self.gate.mode() {
                    tracing::warn!(mode = state.mode.as_str(), by = %state.by, reason = %state.reason, "applying the stored control state");
                }
                self.gate.set(state);
            }
            Some(bad) => {
                // Unreadable, or written by someone who may not: fail closed.
                let why = format!(
                    "the stored control state is {} (writer {:?}); coming up paused until an operator resumes",
                    if bad.state.is_some() { "from an untrusted writer" } else { "unreadable" },
                    bad.writer
                );
                tracing::error!("{why}");
                let state = ControlState {
                    mode: Mode::Paused,
                    since: super::now(),
                    by: self.instance.clone(),
                    reason: why.clone(),
                    request_id: String::new(),
                };
                self.gate.set(state.clone());
                self.alert(publisher, "security", Priority::High, &why, "Inspect the control state queue and who can write to it, then resume with `command-poller resume` as an operator.").await?;
            }
        }
        Ok(consumer)
    }

    fn trusted_writer(&self, user: &str) -> bool {
        user == self.poller_user || self.control().operators.iter().any(|o| o == user)
    }

    /// Handles control deliveries until the consumer ends.
    pub async fn listen(
        &self,
        mut consumer: lapin::Consumer,
        publisher: Publisher,
    ) -> Result<(), BrokerError> {
        while let Some(d) = consumer.next().await {
            let d = d?;
            let user = d.properties.user_id().as_ref().map(|u| u.to_string());
            let reply_to = d.properties.reply_to().as_ref().map(|u| u.to_string());
            let key = d.routing_key.to_string();
            let outcome = if key.starts_with("attempt.") {
                self.on_attempt(&d.data, user.as_deref(), &publisher).await
            } else {
                self.on_control(&d.data, user.as_deref(), reply_to.as_deref(), &publisher)
                    .await
            };
            if let Err(e) = outcome {
                if e.is_connection() {
                    return Err(e);
                }
                tracing::error!(error = %e, "control message handling failed");
            }
            let _ = d.acker.ack(BasicAckOptions::default()).await;
        }
        Ok(())
    }

    fn reply(&self, request_id: &str, accepted: bool, refusal: Option<String>) -> ReplicaReply {
        ReplicaReply {
            instance: self.instance.clone(),
            request_id: request_id.to_owned(),
            accepted,
            refusal,
            state: self.gate.state(),
            in_flight: self.stats.in_flight(),
            at_bridge: self.gate.at_bridge(),
            processed: self.stats.processed(),
            recent_results: self.stats.recent_results(),
        }
    }

    async fn on_control(
        &self,
        body: &[u8],
        user: Option<&str>,
        reply_to: Option<&str>,
        publisher: &Publisher,
    ) -> Result<(), BrokerError> {
        let actor = Actor::classify(user, &self.control().operators, &self.poller_user);
        let cmd: ControlCommand = match serde_json::from_slice(body) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(actor = %actor.name(), error = %e, "unreadable control message refused");
                if matches!(actor, Actor::Other(_)) {
                    self.refused(
                        publisher,
                        &actor,
                        "",
                        &format!("unreadable control message: {e}"),
                        true,
                    )
                    .await?;
                }
                return Ok(());
            }
        };
        let request_id = cmd.request_id().to_owned();
        if matches!(cmd, ControlCommand::Status { .. }) {
            if !matches!(actor, Actor::Operator(_)) {
                let r = Refusal::NotOperator(actor.name());
                self.refused(publisher, &actor, &request_id, &r.to_string(), true)
                    .await?;
                return self
                    .answer(
                        publisher,
                        reply_to,
                        self.reply(&request_id, false, Some(r.to_string())),
                    )
                    .await;
            }
            return self
                .answer(publisher, reply_to, self.reply(&request_id, true, None))
                .await;
        }
        let current = self.gate.state();
        match transition(&current, &cmd, &actor) {
            Ok(new) => {
                let changed = new.mode != current.mode;
                // The gate flip is the acknowledgement: from here no bridge call starts.
                self.gate.set(new.clone());
                if changed {
                    tracing::warn!(mode = new.mode.as_str(), by = %new.by, reason = %new.reason, "control state changed");
                    self.event(
                        publisher,
                        new.mode.as_str().to_ascii_lowercase().as_str(),
                        &actor,
                        &request_id,
                        None,
                    )
                    .await?;
                    if new.mode == Mode::Halted {
                        let what = format!(
                            "MASTER SHUT-OFF: replica {} halted by {}: {}",
                            self.instance, new.by, new.reason
                        );
                        let todo = "Emergency-INT-E02: disconnect the unauthorized integration at the provider, audit logs, deployment history and policy files, hold a post-mortem; lift with `command-poller resume --lift-halt` only afterwards.";
                        self.alert(publisher, "security", Priority::High, &what, todo)
                            .await?;
                        self.alert(publisher, "engineering", Priority::High, &what, todo)
                            .await?;
                    }
                }
                self.answer(publisher, reply_to, self.reply(&request_id, true, None))
                    .await
            }
            Err(refusal) => {
                tracing::warn!(actor = %actor.name(), refusal = %refusal, "control message refused");
                self.refused(
                    publisher,
                    &actor,
                    &request_id,
                    &refusal.to_string(),
                    refusal.is_security_relevant(),
                )
                .await?;
                self.answer(
                    publisher,
                    reply_to,
                    self.reply(&request_id, false, Some(refusal.to_string())),
                )
                .await
            }
        }
    }

    async fn on_attempt(
        &self,
        body: &[u8],
        user: Option<&str>,
        publisher: &Publisher,
    ) -> Result<(), BrokerError> {
        // Only replicas report attempts.
        if user != Some(self.poller_user.as_str()) {
            tracing::warn!(user = ?user, "attempt report from a user that is not the poller; ignored");
            return Ok(());
        }
        let Ok(attempt) = serde_json::from_slice::<UnapprovedAttempt>(body) else {
            return Ok(());
        };
        let own = attempt.instance == self.instance;
        let trip = self
            .trip
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record(attempt);
        match trip {
            Some(t) if own => self.trip(publisher, t).await,
            _ => Ok(()),
        }
    }

    /// Pauses everywhere: locally first, then the stored state, then the other replicas.
    async fn trip(&self, publisher: &Publisher, t: Trip) -> Result<(), BrokerError> {
        let reason = t.reason();
        let request_id = uuid::Uuid::new_v4().to_string();
        let cmd = ControlCommand::Pause {
            reason: reason.clone(),
            request_id: request_id.clone(),
        };
        let actor = Actor::Poller(self.poller_user.clone());
        let Ok(new) = transition(&self.gate.state(), &cmd, &actor) else {
            return Ok(()); // halted already
        };
        self.gate.set(new.clone());
        tracing::error!(agent = %t.agent, "{reason}");
        store_state(publisher, self.control(), &new, &self.poller_user).await?;
        publisher
            .publish(&Outgoing {
                exchange: self.control().exchange.clone(),
                routing_key: cmd.routing_key().into(),
                body: serde_json::to_vec(&cmd).expect("serializes"),
                message_type: "control",
                user_id: Some(self.poller_user.clone()),
                ..Default::default()
            })
            .await?;
        self.event(
            publisher,
            "tripped",
            &actor,
            &request_id,
            Some(reason.clone()),
        )
        .await?;
        let attempts: Vec<String> = t
            .attempts
            .iter()
            .map(|a| format!("{} ({}, {})", a.action_id, a.status, a.instance))
            .collect();
        let what = format!(
            "Poller paused automatically: agent {} made {} unapproved {} attempts within {} s: {}",
            t.agent,
            t.attempts.len(),
            t.command_type,
            t.rule.window_secs,
            attempts.join("; ")
        );
        self.alert(
            publisher,
            "security",
            Priority::High,
            &what,
            "Emergency-INT-E01: revoke the possibly compromised credentials at the provider, investigate the agent's decision logs, escalate to security; resume with `command-poller resume` when safe.",
        )
        .await
    }

    async fn refused(
        &self,
        publisher: &Publisher,
        actor: &Actor,
        request_id: &str,
        why: &str,
        alert: bool,
    ) -> Result<(), BrokerError> {
        self.event(
            publisher,
            "refused",
            actor,
            request_id,
            Some(why.to_owned()),
        )
        .await?;
        if alert {
            let what = format!(
                "Refused a control message from {} on replica {}: {why}",
                actor.name(),
                self.instance
            );
            self.alert(publisher, "security", Priority::High, &what, "Find out who holds that broker user's credentials and why it tried to pull an operator lever; only operators may.").await?;
        }
        Ok(())
    }

    async fn event(
        &self,
        publisher: &Publisher,
        kind: &str,
        actor: &Actor,
        request_id: &str,
        detail: Option<String>,
    ) -> Result<(), BrokerError> {
        let e = ControlEvent {
            kind: kind.to_owned(),
            instance: self.instance.clone(),
            actor: actor.name(),
            request_id: request_id.to_owned(),
            state: self.gate.state(),
            detail,
            at: super::now(),
        };
        publisher
            .publish(&Outgoing {
                exchange: self.control().exchange.clone(),
                routing_key: format!("event.{kind}"),
                body: serde_json::to_vec(&e).expect("serializes"),
                message_type: "control_event",
                ..Default::default()
            })
            .await?;
        // One audit record per control change.
        let record = AuditRecord {
            kind: "control".into(),
            action_id: None,
            agent: None,
            instance: self.instance.clone(),
            at: e.at.clone(),
            events: vec![AuditEvent::ControlChange {
                at: e.at.clone(),
                kind: e.kind.clone(),
                actor: e.actor.clone(),
                request_id: e.request_id.clone(),
                mode: e.state.mode.as_str().to_owned(),
                reason: e.state.reason.clone(),
                detail: e.detail.clone(),
            }],
        };
        // A refused audit record must not hold back what follows (a halt's shut-off alerts).
        let audited = crate::audit::publish_record(
            publisher,
            &self.settings.audit.exchange,
            "audit.control",
            &self.settings.topology.dead_letter_exchange,
            &record,
        )
        .await?;
        if audited != crate::audit::AuditOutcome::Delivered {
            self.stats.audit_diverted();
        }
        Ok(())
    }

    async fn answer(
        &self,
        publisher: &Publisher,
        reply_to: Option<&str>,
        reply: ReplicaReply,
    ) -> Result<(), BrokerError> {
        let Some(rt) = reply_to.filter(|r| r.starts_with("amq.rabbitmq.reply-to")) else {
            return Ok(());
        };
        let r = publisher
            .publish(&Outgoing {
                exchange: String::new(),
                routing_key: rt.to_owned(),
                body: serde_json::to_vec(&reply).expect("serializes"),
                message_type: "control_reply",
                ..Default::default()
            })
            .await;
        match r {
            Err(e) if e.is_connection() => Err(e),
            Err(e) => {
                tracing::warn!(error = %e, "control reply not delivered (the operator went away)");
                Ok(())
            }
            Ok(()) => Ok(()),
        }
    }

    async fn alert(
        &self,
        publisher: &Publisher,
        team: &str,
        priority: Priority,
        what: &str,
        todo: &str,
    ) -> Result<(), BrokerError> {
        let state = self.gate.state();
        let a = Alert {
            alert_id: uuid::Uuid::new_v4().to_string(),
            team: team.to_owned(),
            priority,
            action_id: None,
            command_type: None,
            service: None,
            agent: None,
            status: None,
            summary: what.to_owned(),
            rationale: state.reason.clone(),
            action_required: todo.to_owned(),
            poller_instance: self.instance.clone(),
            at: super::now(),
        };
        publisher
            .publish(&Outgoing {
                exchange: self.settings.topology.alerts_exchange.clone(),
                routing_key: a.routing_key(),
                body: serde_json::to_vec(&a).expect("serializes"),
                message_type: "alert",
                ..Default::default()
            })
            .await
    }
}
