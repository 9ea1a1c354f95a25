//! Reading, applying and following the stored control state: before anything is consumed, and
//! live while running. The stream is the one way the state reaches a replica ([`Follower`]);
//! a state that can't be read or trusted holds the replica paused.

use super::{state_writer, Cause, Replica};
use crate::broker::{self, BrokerError, Publisher};
use crate::control::state_log::{self, Folded, StateReader};
use crate::outcome::Priority;
use lapin::options::BasicConsumeOptions;
use lapin::types::FieldTable;
use lapin::Channel;
use poller_core::control::{ControlState, Mode};

/// The replica's follower of the state stream: the one path by which the stored state reaches
/// it. Its channel is kept, so the stream can be read afresh on it; the reader is `None` while
/// the stream can't be read (the replica is then held paused).
pub struct Follower {
    channel: Channel,
    reader: Option<StateReader>,
}

impl Follower {
    /// Waits for the next change of the folded state; never returns while the stream can't be
    /// read. Cancel-safe (see [`StateReader::changed`]).
    pub(super) async fn changed(&mut self) -> Result<Folded, state_log::ReadError> {
        match self.reader.as_mut() {
            Some(r) => r.changed().await,
            None => std::future::pending().await,
        }
    }

    pub(super) fn position(&self) -> Option<u64> {
        self.reader.as_ref().and_then(StateReader::position)
    }

    /// Whether the stream can still be read on its channel.
    pub(super) fn is_open(&self) -> bool {
        self.channel.status().connected()
    }
}

impl Replica {
    /// Declares, subscribes, then applies the stored state (folded from the state stream on
    /// `state_ch`, a channel for that alone). Returns the consumer of this replica's control
    /// queue and the follower of the stream; nothing else is consumed before this returns. A
    /// state that can't be read or trusted brings the replica up paused, with an alert.
    pub async fn attach(
        &self,
        conn: &lapin::Connection,
        ch: &Channel,
        state_ch: &Channel,
        publisher: &Publisher,
    ) -> Result<(lapin::Consumer, Follower), BrokerError> {
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
        let mut follower = Follower {
            channel: state_ch.clone(),
            reader: None,
        };
        self.read_stored(&mut follower, publisher, Cause::StoredAtStart)
            .await?;
        Ok((consumer, follower))
    }

    /// Reads the stored state afresh on the follower's channel (a reader it had is closed and
    /// replaced) and applies it. A stream that can't be read holds the replica paused, and the
    /// follower has no reader until a later read succeeds.
    pub(super) async fn read_stored(
        &self,
        follower: &mut Follower,
        publisher: &Publisher,
        cause: Cause,
    ) -> Result<(), BrokerError> {
        if let Some(old) = follower.reader.take() {
            old.close().await;
        }
        let classify = state_writer(&self.control.operators, &self.names.poller_user);
        match StateReader::open(&follower.channel, &self.control, classify).await {
            Ok(reader) => {
                let folded = reader.state().clone();
                self.set_state_position(reader.position());
                follower.reader = Some(reader);
                self.apply_stored(publisher, folded, cause).await
            }
            Err(state_log::ReadError::Broker(e)) if e.is_connection() => Err(e),
            Err(e) => {
                // Can't read it: never assume RUNNING.
                let why = format!("could not be read ({e})");
                let held = state_log::stricter(Some(&self.gate.state()), &why);
                self.fail_closed(publisher, why, held).await
            }
        }
    }

    /// Applies a folded stored state to the gate; announces a mode change unless it was read
    /// at start.
    pub(super) async fn apply_stored(
        &self,
        publisher: &Publisher,
        folded: Folded,
        cause: Cause,
    ) -> Result<(), BrokerError> {
        match folded {
            // A new system: nothing was ever stored.
            Folded::Empty => Ok(()),
            Folded::State(state) => {
                let ((), changed) = self.enforce(cause, |_| (Some(state.clone()), ()));
                if changed.mode {
                    if matches!(cause, Cause::StoredAtStart) {
                        tracing::warn!(mode = state.mode.as_str(), by = %state.by, reason = %state.reason, seq = state.seq, "applying the stored control state");
                    } else {
                        self.mode_changed(publisher, &state).await?;
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
    /// A change the stream brings is announced here; this replica's own trip announces its own.
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
