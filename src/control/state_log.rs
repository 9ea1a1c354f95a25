//! The stored control state: a versioned log in a RabbitMQ stream, folded into one state.
//!
//! In: state entries (each a [`ControlState`] with its sequence number and the sequence it was
//! decided on) and read markers, published through the state exchange with the writer's
//! broker-checked `user_id`. Out: the state every replica and operator agrees on.
//!
//! Why a stream: reading it takes nothing off it, so no reader (a replica starting, an operator,
//! someone holding messages unacked on purpose) can make the state look empty to another; the
//! old length-1 queue read by get-then-requeue could, and a replica then came up RUNNING during a
//! HALT. A reader can't tell the end of a stream from a pause in deliveries, so it first appends
//! a marker of its own and reads from the start until it meets it: every entry written before
//! its read is then folded in.
//!
//! The fold ([`fold`], [`apply`]) is pure. Compare-and-set: an entry decided on the current
//! sequence applies (a trusted transition); one decided on an older sequence lost a race and
//! applies only if it is more restrictive (a halt always wins; a pause never overwrites a halt;
//! a resume never overwrites what it didn't see). The poller's own user may only pause a
//! running system (the automatic trip). An entry that can't be read, or written by anyone
//! else, makes the fold fail closed: the reader comes up paused and alerts.

use super::{ControlState, Mode};
use crate::broker::{BrokerError, Outgoing, Publisher};
use crate::settings::ControlSettings;
use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::Channel;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// How long a read may take to meet its own marker before it counts as unreadable.
pub const READ_DEADLINE: Duration = Duration::from_secs(10);

/// One message in the state stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Entry {
    /// A new state, decided on the state whose sequence was `base`.
    State { base: u64, state: ControlState },
    /// A reader's "I read up to here".
    Marker { nonce: String },
    /// An agent quarantined (`Some`) or released (`None`). Applied in stream order, apart from
    /// the mode's compare-and-set; the poller's own user may only quarantine.
    Agent {
        agent: String,
        quarantined: Option<super::Quarantined>,
    },
}

/// Who wrote an entry, by its broker-checked `user_id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writer {
    Operator,
    /// The poller's own user: a replica that tripped.
    Poller,
    Untrusted,
}

/// The folded state, or why it can't be trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Folded {
    /// Nothing was ever stored: a new system.
    Empty,
    State(ControlState),
    /// An entry that can't be read, or from a writer who may not write: fail closed.
    Untrusted(String),
}

fn restrictiveness(m: Mode) -> u8 {
    match m {
        Mode::Running => 0,
        Mode::Paused => 1,
        Mode::Halted => 2,
    }
}

/// The state after `entry` (decided on `base`, written by `writer`), or `None` when it doesn't
/// apply (the current state stands).
pub fn apply(
    current: &ControlState,
    base: u64,
    entry: &ControlState,
    writer: Writer,
) -> Option<ControlState> {
    let applies = match writer {
        Writer::Untrusted => false,
        // The automatic trip: it may pause a running system, nothing else.
        Writer::Poller => entry.mode == Mode::Paused && current.mode == Mode::Running,
        // Decided on what is current (or on entries this reader never saw): a transition the
        // writer checked. A pause still never overwrites a halt.
        Writer::Operator if base >= current.seq => {
            !(current.mode == Mode::Halted && entry.mode == Mode::Paused)
        }
        // Lost a race with a newer entry: only a stricter state still applies.
        Writer::Operator => restrictiveness(entry.mode) > restrictiveness(current.mode),
    };
    applies.then(|| ControlState {
        seq: (current.seq + 1).max(entry.seq),
        // The quarantine list is folded from its own entries, never from a mode entry.
        quarantined: current.quarantined.clone(),
        ..entry.clone()
    })
}

/// The state after an agent entry, or `None` when the writer may not write it.
fn apply_agent(
    current: &ControlState,
    agent: &str,
    quarantined: Option<&super::Quarantined>,
    writer: Writer,
) -> Option<ControlState> {
    let mut new = current.clone();
    match (quarantined, writer) {
        (_, Writer::Untrusted) | (None, Writer::Poller) => return None,
        (Some(q), _) => {
            new.quarantined
                .entry(agent.to_owned())
                .or_insert_with(|| q.clone());
        }
        (None, Writer::Operator) => {
            new.quarantined.remove(agent);
        }
    }
    Some(new)
}

/// Folds one message (body and writer) into `current`.
pub fn step(current: Folded, body: &[u8], writer: Writer) -> Folded {
    let (base, state) = match serde_json::from_slice::<Entry>(body) {
        Ok(Entry::Marker { .. }) => return current,
        Ok(Entry::State { base, state }) => (base, state),
        Ok(Entry::Agent { agent, quarantined }) => {
            return match (current, writer) {
                (_, Writer::Untrusted) => Folded::Untrusted(format!(
                    "a quarantine entry for {agent} written by a user who is neither an operator nor the poller"
                )),
                (Folded::Untrusted(why), _) => Folded::Untrusted(why),
                (Folded::Empty, w) => {
                    let initial = ControlState::initial();
                    match apply_agent(&initial, &agent, quarantined.as_ref(), w) {
                        Some(s) => Folded::State(s),
                        None => Folded::Empty,
                    }
                }
                (Folded::State(c), w) => Folded::State(
                    apply_agent(&c, &agent, quarantined.as_ref(), w).unwrap_or(c),
                ),
            };
        }
        Err(e) => return Folded::Untrusted(format!("an unreadable state entry ({e})")),
    };
    match (current, writer) {
        (_, Writer::Untrusted) => Folded::Untrusted(format!(
            "a state entry ({}) written by a user who is neither an operator nor the poller",
            state.mode.as_str()
        )),
        // The first state, or an operator deciding anew after an untrusted entry (the
        // recovery the fail-closed alert asks for).
        (Folded::Empty, _) | (Folded::Untrusted(_), Writer::Operator) => {
            Folded::State(ControlState {
                quarantined: Default::default(),
                ..state
            })
        }
        (Folded::Untrusted(why), Writer::Poller) => Folded::Untrusted(why),
        (Folded::State(c), w) => Folded::State(apply(&c, base, &state, w).unwrap_or(c)),
    }
}

/// Folds messages (body and writer, in stream order) into the state.
pub fn fold<'a>(entries: impl IntoIterator<Item = (&'a [u8], Writer)>) -> Folded {
    entries
        .into_iter()
        .fold(Folded::Empty, |current, (body, writer)| {
            step(current, body, writer)
        })
}

use crate::broker::names::text;

/// Appends a new state decided on `base` (persistent, confirmed). `user` must be the
/// publishing connection's user.
pub async fn write(
    publisher: &Publisher,
    c: &ControlSettings,
    base: u64,
    state: &ControlState,
    user: &str,
) -> Result<(), BrokerError> {
    let entry = Entry::State {
        base,
        state: state.clone(),
    };
    append(publisher, c, &entry, user).await
}

/// Appends one entry (persistent, confirmed) as `user`.
async fn append(
    publisher: &Publisher,
    c: &ControlSettings,
    entry: &Entry,
    user: &str,
) -> Result<(), BrokerError> {
    publisher
        .publish(&Outgoing {
            exchange: c.state_exchange.clone(),
            routing_key: String::new(),
            body: serde_json::to_vec(entry).expect("serializes"),
            message_type: crate::broker::names::message_type::CONTROL_STATE,
            user_id: Some(user.to_owned()),
            ..Default::default()
        })
        .await
}

/// Appends a quarantine (`Some`) or release (`None`) of `agent`.
pub async fn write_agent(
    publisher: &Publisher,
    c: &ControlSettings,
    agent: &str,
    quarantined: Option<&super::Quarantined>,
    user: &str,
) -> Result<(), BrokerError> {
    let entry = Entry::Agent {
        agent: agent.to_owned(),
        quarantined: quarantined.cloned(),
    };
    append(publisher, c, &entry, user).await
}

/// Tells who wrote an entry from its `user_id`.
pub type Classify = Box<dyn Fn(Option<&str>) -> Writer + Send + Sync>;

/// A reader of the state stream: the initial fold up to its own marker, then (for replicas)
/// every entry that follows, as it arrives.
pub struct StateReader {
    consumer: lapin::Consumer,
    classify: Classify,
    current: Folded,
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("the state stream did not deliver this reader's marker within {0:?}")]
    Deadline(Duration),
    #[error("the state stream consumer ended")]
    Ended,
}

impl From<lapin::Error> for ReadError {
    fn from(e: lapin::Error) -> Self {
        ReadError::Broker(e.into())
    }
}

impl StateReader {
    /// Appends a marker as `user`, then folds the stream from its first entry up to that marker.
    /// `ch` is used for this reader alone (its prefetch is set here).
    pub async fn open(
        ch: &Channel,
        publisher: &Publisher,
        c: &ControlSettings,
        user: &str,
        classify: impl Fn(Option<&str>) -> Writer + Send + Sync + 'static,
    ) -> Result<Self, ReadError> {
        let nonce = uuid::Uuid::new_v4().to_string();
        publisher
            .publish(&Outgoing {
                exchange: c.state_exchange.clone(),
                routing_key: String::new(),
                body: serde_json::to_vec(&Entry::Marker {
                    nonce: nonce.clone(),
                })
                .expect("serializes"),
                message_type: crate::broker::names::message_type::CONTROL_STATE_MARKER,
                user_id: Some(user.to_owned()),
                ..Default::default()
            })
            .await?;
        ch.basic_qos(256, BasicQosOptions::default()).await?;
        let mut args = FieldTable::default();
        args.insert("x-stream-offset".into(), text("first"));
        let consumer = ch
            .basic_consume(
                c.state_queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                args,
            )
            .await?;
        let mut reader = Self {
            consumer,
            classify: Box::new(classify),
            current: Folded::Empty,
        };
        let caught_up = tokio::time::timeout(READ_DEADLINE, async {
            loop {
                match reader.next_entry().await? {
                    Some(Entry::Marker { nonce: n }) if n == nonce => return Ok(()),
                    _ => {}
                }
            }
        })
        .await;
        match caught_up {
            Ok(Ok(())) => Ok(reader),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ReadError::Deadline(READ_DEADLINE)),
        }
    }

    /// The state folded so far.
    pub fn state(&self) -> &Folded {
        &self.current
    }

    /// Waits for the next entry and folds it in; returns the state when it changed.
    pub async fn changed(&mut self) -> Result<Folded, ReadError> {
        loop {
            let before = self.current.clone();
            if let Some(Entry::State { .. } | Entry::Agent { .. }) = self.next_entry().await? {
                if self.current != before {
                    return Ok(self.current.clone());
                }
            }
        }
    }

    /// Reads one message, folds it in, acks it (a stream keeps it regardless).
    async fn next_entry(&mut self) -> Result<Option<Entry>, ReadError> {
        let d = match self.consumer.next().await {
            Some(d) => d?,
            None => return Err(ReadError::Ended),
        };
        let writer = (self.classify)(d.properties.user_id().as_ref().map(|u| u.as_str()));
        let current = std::mem::replace(&mut self.current, Folded::Empty);
        self.current = step(current, &d.data, writer);
        let _ = d.acker.ack(BasicAckOptions::default()).await;
        Ok(serde_json::from_slice::<Entry>(&d.data).ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(mode: Mode, seq: u64) -> ControlState {
        ControlState {
            mode,
            seq,
            ..ControlState::initial()
        }
    }

    fn entry(base: u64, mode: Mode) -> Vec<u8> {
        serde_json::to_vec(&Entry::State {
            base,
            state: state(mode, base + 1),
        })
        .unwrap()
    }

    fn marker() -> Vec<u8> {
        serde_json::to_vec(&Entry::Marker { nonce: "n".into() }).unwrap()
    }

    fn fold_all(entries: &[(Vec<u8>, Writer)]) -> Folded {
        fold(entries.iter().map(|(b, w)| (b.as_slice(), *w)))
    }

    fn mode(f: &Folded) -> Mode {
        match f {
            Folded::State(s) => s.mode,
            other => panic!("{other:?}"),
        }
    }

    use Writer::*;

    #[test]
    fn an_empty_stream_is_a_new_system_and_markers_change_nothing() {
        assert_eq!(fold_all(&[]), Folded::Empty);
        assert_eq!(fold_all(&[(marker(), Untrusted)]), Folded::Empty);
        let f = fold_all(&[(entry(0, Mode::Halted), Operator), (marker(), Operator)]);
        assert_eq!(mode(&f), Mode::Halted);
    }

    #[test]
    fn a_trip_written_just_after_a_halt_never_downgrades_it() {
        // Both decided on seq 1 (RUNNING): the operator's halt lands first.
        let f = fold_all(&[
            (entry(0, Mode::Running), Operator),
            (entry(1, Mode::Halted), Operator),
            (entry(1, Mode::Paused), Poller),
        ]);
        assert_eq!(mode(&f), Mode::Halted);
        // And an operator's stale pause neither.
        let f = fold_all(&[
            (entry(0, Mode::Running), Operator),
            (entry(1, Mode::Halted), Operator),
            (entry(1, Mode::Paused), Operator),
        ]);
        assert_eq!(mode(&f), Mode::Halted);
        // Nor a pause decided on the halt itself (the CLI refuses it; the fold too).
        let f = fold_all(&[
            (entry(0, Mode::Halted), Operator),
            (entry(1, Mode::Paused), Operator),
        ]);
        assert_eq!(mode(&f), Mode::Halted);
    }

    #[test]
    fn a_halt_always_wins_a_race_and_a_stale_resume_never_does() {
        let f = fold_all(&[
            (entry(0, Mode::Paused), Operator),
            (entry(1, Mode::Running), Operator),
            (entry(1, Mode::Halted), Operator),
        ]);
        assert_eq!(
            mode(&f),
            Mode::Halted,
            "a halt that lost the race still applies"
        );
        let f = fold_all(&[
            (entry(0, Mode::Running), Operator),
            (entry(1, Mode::Halted), Operator),
            (entry(1, Mode::Running), Operator),
        ]);
        assert_eq!(mode(&f), Mode::Halted, "a resume that never saw the halt");
        // Lifting needs an entry decided on the halt.
        let f = fold_all(&[
            (entry(0, Mode::Halted), Operator),
            (entry(1, Mode::Running), Operator),
        ]);
        assert_eq!(mode(&f), Mode::Running);
    }

    #[test]
    fn the_poller_may_only_pause_a_running_system() {
        let f = fold_all(&[
            (entry(0, Mode::Paused), Operator),
            (entry(1, Mode::Running), Poller),
        ]);
        assert_eq!(mode(&f), Mode::Paused);
        let f = fold_all(&[
            (entry(0, Mode::Running), Operator),
            (entry(1, Mode::Halted), Poller),
        ]);
        assert_eq!(mode(&f), Mode::Running);
        let f = fold_all(&[
            (entry(0, Mode::Running), Operator),
            (entry(1, Mode::Paused), Poller),
        ]);
        assert_eq!(mode(&f), Mode::Paused);
    }

    #[test]
    fn unreadable_or_untrusted_entries_fail_closed() {
        let f = fold_all(&[
            (entry(0, Mode::Halted), Operator),
            (b"garbage".to_vec(), Operator),
        ]);
        assert!(
            matches!(f, Folded::Untrusted(ref why) if why.contains("unreadable")),
            "{f:?}"
        );
        let f = fold_all(&[
            (entry(0, Mode::Halted), Operator),
            (entry(1, Mode::Running), Untrusted),
        ]);
        assert!(
            matches!(f, Folded::Untrusted(ref why) if why.contains("neither")),
            "{f:?}"
        );
    }

    #[test]
    fn an_operator_recovers_from_an_untrusted_entry_and_the_poller_cant() {
        let f = fold_all(&[
            (entry(0, Mode::Running), Operator),
            (b"garbage".to_vec(), Operator),
            (entry(0, Mode::Running), Poller),
        ]);
        assert!(matches!(f, Folded::Untrusted(_)));
        let f = fold_all(&[
            (b"garbage".to_vec(), Operator),
            (entry(0, Mode::Running), Operator),
        ]);
        assert_eq!(mode(&f), Mode::Running);
    }

    fn agent(name: &str, quarantine: bool) -> Vec<u8> {
        serde_json::to_vec(&Entry::Agent {
            agent: name.into(),
            quarantined: quarantine.then(|| crate::control::Quarantined {
                by: "ops".into(),
                reason: "r".into(),
                since: "t".into(),
                request_id: "q".into(),
            }),
        })
        .unwrap()
    }

    fn quarantined(f: &Folded) -> Vec<String> {
        match f {
            Folded::State(s) => s.quarantined.keys().cloned().collect(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn quarantines_fold_apart_from_the_mode() {
        // On a new system, across mode changes, and not undone by a stale mode entry.
        let f = fold_all(&[
            (agent("a", true), Operator),
            (entry(0, Mode::Paused), Operator),
            (agent("b", true), Poller),
            (entry(1, Mode::Running), Operator),
            (entry(1, Mode::Halted), Operator),
        ]);
        assert_eq!(mode(&f), Mode::Halted);
        assert_eq!(quarantined(&f), ["a", "b"]);
        if let Folded::State(s) = &f {
            assert_eq!(s.seq, 3, "agent entries never move the sequence");
        }
        // Only an operator releases; the poller's release is ignored.
        let f = fold_all(&[(agent("a", true), Poller), (agent("a", false), Poller)]);
        assert_eq!(quarantined(&f), ["a"]);
        let f = fold_all(&[(agent("a", true), Poller), (agent("a", false), Operator)]);
        assert!(quarantined(&f).is_empty());
        // A state entry's own quarantine list is never trusted over the agent entries.
        let mut forged = state(Mode::Running, 1);
        forged.quarantined.clear();
        let f = fold_all(&[
            (agent("a", true), Operator),
            (
                serde_json::to_vec(&Entry::State {
                    base: 0,
                    state: forged,
                })
                .unwrap(),
                Operator,
            ),
        ]);
        assert_eq!(quarantined(&f), ["a"]);
        // An untrusted writer fails the fold closed.
        let f = fold_all(&[(agent("a", true), Operator), (agent("a", false), Untrusted)]);
        assert!(matches!(f, Folded::Untrusted(_)), "{f:?}");
    }

    #[test]
    fn sequences_only_grow() {
        let f = fold_all(&[
            (entry(0, Mode::Running), Operator),
            (entry(1, Mode::Paused), Operator),
            (entry(2, Mode::Running), Operator),
            (entry(2, Mode::Halted), Operator),
        ]);
        match f {
            Folded::State(s) => {
                assert_eq!(s.mode, Mode::Halted);
                assert_eq!(s.seq, 4);
            }
            other => panic!("{other:?}"),
        }
    }
}
