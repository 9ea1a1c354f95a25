//! Reading, applying and following the stored control state: before anything is consumed, and
//! live while running. A state that can't be read or trusted holds the replica paused.

use super::{state_writer, Cause, Replica};
use crate::broker::{self, BrokerError, Publisher};
use crate::control::state_log::{self, Folded, StateReader};
use crate::outcome::Priority;
use lapin::options::BasicConsumeOptions;
use lapin::types::FieldTable;
use lapin::Channel;
use poller_core::control::{ControlState, Mode};

impl Replica {
    /// Declares, subscribes, then applies the stored state (folded from the state stream on
    /// `state_ch`, a channel for that alone). Returns the consumer of this replica's control
    /// queue and the state reader to follow; nothing else is consumed before this returns. A
    /// state that can't be read or trusted brings the replica up paused, with an alert.
    pub async fn attach(
        &self,
        conn: &lapin::Connection,
        ch: &Channel,
        state_ch: &Channel,
        publisher: &Publisher,
    ) -> Result<(lapin::Consumer, Option<StateReader>), BrokerError> {
        let c = &self.control;
        broker::declare_replica_control(conn, c, &self.names.replication).await?;
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
        match StateReader::open(state_ch, c, classify).await {
            Ok(reader) => {
                let folded = reader.state().clone();
                self.set_state_position(reader.position());
                self.apply_stored(publisher, folded, false).await?;
                Ok((consumer, Some(reader)))
            }
            Err(state_log::ReadError::Broker(e)) if e.is_connection() => Err(e),
            Err(e) => {
                // Can't read it: never assume RUNNING.
                let why = format!("could not be read ({e})");
                let held = state_log::stricter(Some(&self.gate.state()), &why);
                self.fail_closed(publisher, why, held).await?;
                Ok((consumer, None))
            }
        }
    }

    /// Applies a folded stored state to the gate; `announce`s a mode change when it comes
    /// from following the stream (not when read at start).
    pub(super) async fn apply_stored(
        &self,
        publisher: &Publisher,
        folded: Folded,
        announce: bool,
    ) -> Result<(), BrokerError> {
        match folded {
            // A new system: nothing was ever stored.
            Folded::Empty => Ok(()),
            Folded::State(state) => {
                let cause = if announce {
                    Cause::StoredFollowed
                } else {
                    Cause::StoredAtStart
                };
                let ((), changed) = self.enforce(cause, |_| (Some(state.clone()), ()));
                if changed.mode {
                    if announce {
                        self.mode_changed(publisher, &state).await?;
                    } else {
                        tracing::warn!(mode = state.mode.as_str(), by = %state.by, reason = %state.reason, seq = state.seq, "applying the stored control state");
                    }
                }
                Ok(())
            }
            Folded::Untrusted { ref why, .. } => {
                let held = folded
                    .effective()
                    .expect("untrusted has an effective state");
                self.fail_closed(publisher, why.clone(), held).await
            }
        }
    }

    /// Announces a mode change this replica made: the event, and for a halt the shut-off alerts.
    /// Whichever path brings the change (the control message or the state stream) announces it;
    /// the other then finds the mode unchanged.
    pub(super) async fn mode_changed(
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

    /// Comes up (or goes) at least paused and alerts security: the stored state can't be
    /// trusted. `held` is what the fold says to enforce (the last trusted state made stricter);
    /// what this replica enforces already is never loosened by it.
    pub(super) async fn fail_closed(
        &self,
        publisher: &Publisher,
        why: String,
        held: ControlState,
    ) -> Result<(), BrokerError> {
        let why = format!(
            "the stored control state is untrusted: {why}; held at least paused (a halt and every quarantine kept) until an operator decides"
        );
        tracing::error!("{why}");
        self.enforce(Cause::Untrusted, |current| {
            let mut new = held;
            if current.mode == Mode::Halted {
                new.mode = Mode::Halted;
            }
            if new.mode == Mode::Running {
                new.mode = Mode::Paused;
            }
            if new.mode != current.mode {
                new.since = crate::clock::now_rfc3339();
                new.by = self.names.instance.clone();
                new.reason = why.clone();
                new.request_id = String::new();
            }
            new.seq = new.seq.max(current.seq);
            for (agent, q) in &current.quarantined {
                new.quarantined.entry(agent.clone()).or_insert(q.clone());
            }
            (Some(new), ())
        });
        self.alert(publisher, "security", Priority::High, &why, "Inspect the control state stream and who can write to it (control.state_exchange), then decide with `command-poller resume` (or `halt`) as an operator: the lever is decided on the state replicas now enforce.").await
    }
}
