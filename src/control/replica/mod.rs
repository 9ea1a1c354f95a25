//! The replica's side of control: declares the control topology, reads the stored state
//! before anything is consumed, then listens on its own queue for control messages and for
//! the unapproved attempts every replica shares (the trip counts them all).
//!
//! In: control deliveries and the state stream. Out: gate changes, and what [`render`] builds:
//! events (`event.*`) with their audit records, replies to the operator's `reply_to`, alerts
//! (halt, refused levers, trips, an untrusted state) and, on a trip, the new stored state and a
//! `control.pause` for the other replicas.

pub mod render;

pub use render::{ControlEvent, Names, ReplicaReply};

use super::gate::Gate;
use super::state_log::{self, Folded, StateReader};
use super::trip::{Trip, TripWire, UnapprovedAttempt};
use super::{transition, Actor, ControlCommand, ControlState, Mode, Refusal};
use crate::broker::names::{self, routing};
use crate::broker::{self, BrokerError, Publisher};
use crate::outcome::{Priority, Status};
use crate::settings::ControlSettings;
use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions};
use lapin::types::FieldTable;
use lapin::Channel;
use std::sync::{Arc, Mutex};

/// Who may write the stored state, by broker user: operators and the poller's own user.
pub fn state_writer(
    operators: &[String],
    poller_user: &str,
) -> impl Fn(Option<&str>) -> state_log::Writer + Send + Sync + 'static {
    let operators = operators.to_vec();
    let poller_user = poller_user.to_owned();
    move |user| match user {
        Some(u) if operators.iter().any(|o| o == u) => state_log::Writer::Operator,
        Some(u) if u == poller_user => state_log::Writer::Poller,
        _ => state_log::Writer::Untrusted,
    }
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
    /// Its own section: exchanges, the state stream, operators, trips.
    control: ControlSettings,
    names: Names,
    gate: Arc<Gate>,
    trip: Mutex<TripWire>,
    stats: Arc<dyn ReplicaStats>,
}

impl Replica {
    pub fn new(
        control: ControlSettings,
        names: Names,
        gate: Arc<Gate>,
        stats: Arc<dyn ReplicaStats>,
    ) -> Self {
        let trip = Mutex::new(TripWire::new(control.trips.clone()));
        Self {
            control,
            names,
            gate,
            trip,
            stats,
        }
    }

    /// Declares, subscribes, then applies the stored state (folded from the state stream on
    /// `state_ch`, a channel for that alone). Returns the consumer of this replica's control
    /// queue and the state reader to follow; nothing else is consumed before this returns. A
    /// state that can't be read or trusted brings the replica up paused, with an alert.
    pub async fn attach(
        &self,
        ch: &Channel,
        state_ch: &Channel,
        publisher: &Publisher,
    ) -> Result<(lapin::Consumer, Option<StateReader>), BrokerError> {
        let c = &self.control;
        broker::declare_control(ch, c).await?;
        let q = broker::declare_replica_queue(ch, c).await?;
        // Subscribe before reading the state, so a change in between is not missed.
        let consumer = ch
            .basic_consume(
                q,
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let classify = state_writer(&c.operators, &self.names.poller_user);
        match StateReader::open(state_ch, publisher, c, &self.names.poller_user, classify).await {
            Ok(reader) => {
                let folded = reader.state().clone();
                self.apply_stored(publisher, folded, false).await?;
                Ok((consumer, Some(reader)))
            }
            Err(state_log::ReadError::Broker(e)) if e.is_connection() => Err(e),
            Err(e) => {
                // Can't read it: never assume RUNNING.
                self.fail_closed(publisher, format!("could not be read ({e})"))
                    .await?;
                Ok((consumer, None))
            }
        }
    }

    /// Applies a folded stored state to the gate; `announce`s a mode change when it comes
    /// from following the stream (not when read at start).
    async fn apply_stored(
        &self,
        publisher: &Publisher,
        folded: Folded,
        announce: bool,
    ) -> Result<(), BrokerError> {
        match folded {
            // A new system: nothing was ever stored.
            Folded::Empty => Ok(()),
            Folded::State(state) => {
                let mode_changed = state.mode != self.gate.mode();
                if state != self.gate.state() {
                    self.gate.set(state.clone());
                }
                if mode_changed {
                    if announce {
                        self.mode_changed(publisher, &state).await?;
                    } else {
                        tracing::warn!(mode = state.mode.as_str(), by = %state.by, reason = %state.reason, seq = state.seq, "applying the stored control state");
                    }
                }
                Ok(())
            }
            Folded::Untrusted(why) => self.fail_closed(publisher, why).await,
        }
    }

    /// Announces a mode change this replica made: the event, and for a halt the shut-off alerts.
    /// Whichever path brings the change (the control message or the state stream) announces it;
    /// the other then finds the mode unchanged.
    async fn mode_changed(
        &self,
        publisher: &Publisher,
        new: &ControlState,
    ) -> Result<(), BrokerError> {
        tracing::warn!(mode = new.mode.as_str(), by = %new.by, reason = %new.reason, seq = new.seq, "control state changed");
        self.event(
            publisher,
            new.mode.as_str().to_ascii_lowercase().as_str(),
            &new.by,
            &new.request_id,
            None,
        )
        .await?;
        if new.mode == Mode::Halted {
            let what = format!(
                "MASTER SHUT-OFF: replica {} halted by {}: {}",
                self.names.instance, new.by, new.reason
            );
            let todo = "Emergency-INT-E02: disconnect the unauthorized integration at the provider, audit logs, deployment history and policy files, hold a post-mortem; lift with `command-poller resume --lift-halt` only afterwards.";
            self.alert(publisher, "security", Priority::High, &what, todo)
                .await?;
            self.alert(publisher, "engineering", Priority::High, &what, todo)
                .await?;
        }
        Ok(())
    }

    /// Comes up (or goes) paused and alerts security: the stored state can't be trusted.
    async fn fail_closed(&self, publisher: &Publisher, why: String) -> Result<(), BrokerError> {
        let why = format!(
            "the stored control state is untrusted: {why}; paused until an operator decides"
        );
        tracing::error!("{why}");
        if self.gate.mode() != Mode::Halted {
            let current = self.gate.state();
            self.gate.set(ControlState {
                mode: Mode::Paused,
                since: super::now(),
                by: self.names.instance.clone(),
                reason: why.clone(),
                request_id: String::new(),
                seq: current.seq,
            });
        }
        self.alert(publisher, "security", Priority::High, &why, "Inspect the control state stream and who can write to it (control.state_exchange), then decide with `command-poller resume` (or `halt`) as an operator.").await
    }

    /// Handles control deliveries and follows the stored state until either ends.
    pub async fn listen(
        &self,
        mut consumer: lapin::Consumer,
        mut state: Option<StateReader>,
        publisher: Publisher,
    ) -> Result<(), BrokerError> {
        loop {
            let changed = async {
                match state.as_mut() {
                    Some(r) => r.changed().await,
                    None => futures::future::pending().await,
                }
            };
            let d = tokio::select! {
                d = consumer.next() => d,
                folded = changed => {
                    match folded {
                        Ok(f) => self.apply_stored(&publisher, f, true).await?,
                        Err(state_log::ReadError::Broker(e)) => return Err(e),
                        Err(e) => {
                            // The stream consumer is gone: restart the session (and re-read).
                            tracing::warn!(error = %e, "stopped following the control state");
                            return Ok(());
                        }
                    }
                    continue;
                }
            };
            let Some(d) = d else { return Ok(()) };
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
    }

    fn reply(&self, request_id: &str, accepted: bool, refusal: Option<String>) -> ReplicaReply {
        ReplicaReply {
            instance: self.names.instance.clone(),
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
        let actor = Actor::classify(user, &self.control.operators, &self.names.poller_user);
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
                if new.mode != current.mode {
                    // The gate flip is the acknowledgement: from here no bridge call starts.
                    self.gate.set(new.clone());
                    self.mode_changed(publisher, &new).await?;
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
        if user != Some(self.names.poller_user.as_str()) {
            tracing::warn!(user = ?user, "attempt report from a user that is not the poller; ignored");
            return Ok(());
        }
        let Ok(attempt) = serde_json::from_slice::<UnapprovedAttempt>(body) else {
            return Ok(());
        };
        let own = attempt.instance == self.names.instance;
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
        let actor = Actor::Poller(self.names.poller_user.clone());
        let current = self.gate.state();
        let Ok(new) = transition(&current, &cmd, &actor) else {
            return Ok(()); // halted already
        };
        self.gate.set(new.clone());
        tracing::error!(agent = %t.agent, "{reason}");
        state_log::write(
            publisher,
            &self.control,
            current.seq,
            &new,
            &self.names.poller_user,
        )
        .await?;
        publisher.publish(&render::lever(&cmd, &self.names)).await?;
        self.event(
            publisher,
            "tripped",
            &actor.name(),
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
            &actor.name(),
            request_id,
            Some(why.to_owned()),
        )
        .await?;
        if alert {
            let what = format!(
                "Refused a control message from {} on replica {}: {why}",
                actor.name(),
                self.names.instance
            );
            self.alert(publisher, "security", Priority::High, &what, "Find out who holds that broker user's credentials and why it tried to pull an operator lever; only operators may.").await?;
        }
        Ok(())
    }

    /// Publishes a control event, then its audit record (a refused record must not hold back
    /// what follows, such as a halt's shut-off alerts).
    async fn event(
        &self,
        publisher: &Publisher,
        kind: &str,
        actor: &str,
        request_id: &str,
        detail: Option<String>,
    ) -> Result<(), BrokerError> {
        let e = ControlEvent {
            kind: kind.to_owned(),
            instance: self.names.instance.clone(),
            actor: actor.to_owned(),
            request_id: request_id.to_owned(),
            state: self.gate.state(),
            detail,
            at: crate::clock::now_rfc3339(),
        };
        let (msg, record) = render::event(&e, &self.names);
        publisher.publish(&msg).await?;
        let audited = crate::audit::publish_record(
            publisher,
            &self.names.audit_exchange,
            routing::AUDIT_CONTROL,
            &self.names.dead_letter_exchange,
            &record,
            &self.names.poller_user,
        )
        .await?;
        if audited != crate::audit::AuditOutcome::Delivered {
            self.stats.audit_diverted();
        }
        Ok(())
    }

    /// Answers an operator on its direct reply-to; an operator gone away is not an error.
    async fn answer(
        &self,
        publisher: &Publisher,
        reply_to: Option<&str>,
        reply: ReplicaReply,
    ) -> Result<(), BrokerError> {
        let Some(rt) = reply_to.filter(|r| names::is_direct_reply_to(r)) else {
            return Ok(());
        };
        match publisher.publish(&render::reply(rt, &reply)).await {
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
        let msg = render::alert(
            &self.names,
            team,
            priority,
            what,
            todo,
            &self.gate.state(),
            crate::clock::now_rfc3339(),
        );
        publisher.publish(&msg).await
    }
}
