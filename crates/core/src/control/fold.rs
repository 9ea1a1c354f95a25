//! The fold of the stored control state: the entries of the state stream (each one change and
//! the whole state after it), who wrote them, and the state every replica and operator agrees
//! on. Pure: the runtime's reader feeds it the records it read.
//!
//! **A fold starts from a snapshot.** Every entry carries the whole state after it, so the
//! fold starts at the latest *anchored* entry: written by an operator, and naming (`after`)
//! the entry just before it, so its writer had read everything before it. From there each
//! later entry is applied as a change, with compare-and-set: a mode change decided on the
//! current sequence applies; one decided on an older sequence lost a race and applies only if
//! it is stricter (a halt always wins; a pause never overwrites a halt; a resume never
//! overwrites what it didn't see). The poller's own user may only pause a running system and
//! quarantine. When the records hold no anchor, [`walk_back`] says where to read next.
//!
//! **An untrusted entry never loosens anything.** An entry that can't be read, or written by a
//! user who is neither an operator nor the poller, makes the state [`Folded::Untrusted`]: the
//! fleet keeps the last trusted state made stricter (at least PAUSED; a halt and every
//! quarantine kept) until an operator decides on that stricter state.

pub use super::anchor::*;
use super::loosening::{self, Proposal, Rules};
use super::{ControlState, Grant, Mode, Quarantined, Revocation};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One entry in the state stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// The stream offset of the last entry its writer had read (`None`: the writer read an
    /// empty stream, so this is the first entry).
    pub after: Option<u64>,
    pub change: Change,
    /// The whole state after the change, as its writer folded it: where a later read starts
    /// when the entry is anchored.
    pub state: ControlState,
}

/// What one entry changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Change {
    /// The mode (and its provenance) set to the entry's state, decided on the state whose
    /// sequence was `base`.
    Mode { base: u64 },
    /// An agent quarantined (`Some`) or released (`None`). Applied in stream order, apart from
    /// the mode's compare-and-set; the poller's own user may only quarantine.
    Agent {
        agent: String,
        quarantined: Option<Quarantined>,
    },
    /// A service cut off (`Some`: revoked or disconnected) or recorded reconnected (`None`).
    /// Applied in stream order like an agent entry; the poller's own user may only cut (a trip
    /// that revokes), never record a reconnection.
    Service {
        service: String,
        revoked: Option<Revocation>,
    },
    /// A loosening lever parked for other operators (its proposer is the entry's writer,
    /// whatever the body says). Operators only.
    Propose { id: String, proposal: Proposal },
    /// An operator (the entry's writer) seconds proposal `id`, bound to `digest`, at `at`
    /// (RFC 3339); the fold applies the lever when it has the people the rules need.
    Second {
        id: String,
        digest: String,
        at: String,
    },
    /// A grant put in force (`Some`: a lone operator's, where one operator may loosen; under
    /// two people's rules a grant is applied by the second that completes its proposal) or
    /// withdrawn (`None`). Operators only; its proposer is the entry's writer.
    Grant { id: String, grant: Option<Grant> },
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
    /// Nothing was ever stored.
    Empty,
    State(ControlState),
    /// An entry that can't be read, from a writer who may not write, or no snapshot to start
    /// from. `last` is the last trusted state (if any is known); replicas enforce it made
    /// stricter ([`Folded::effective`]).
    Untrusted {
        last: Option<ControlState>,
        why: String,
    },
}

impl Folded {
    /// What replicas enforce and operators decide on: a trusted state as it is; an untrusted
    /// one as the last trusted state made stricter (at least PAUSED, a halt and every
    /// quarantine kept); `None` for an empty stream (the caller's settings decide).
    pub fn effective(&self) -> Option<ControlState> {
        match self {
            Folded::Empty => None,
            Folded::State(s) => Some(s.clone()),
            Folded::Untrusted { last, why } => Some(stricter(last.as_ref(), why)),
        }
    }

    fn last_trusted(&self) -> Option<ControlState> {
        match self {
            Folded::Empty => None,
            Folded::State(s) => Some(s.clone()),
            Folded::Untrusted { last, .. } => last.clone(),
        }
    }
}

/// `last` made stricter because of `why`: at least PAUSED, a halt and every quarantine kept,
/// the sequence unchanged (an operator decides on it).
pub fn stricter(last: Option<&ControlState>, why: &str) -> ControlState {
    let base = last.cloned().unwrap_or_else(ControlState::initial);
    if base.mode == Mode::Halted {
        return base;
    }
    ControlState {
        mode: Mode::Paused,
        since: base.since.clone(),
        by: "(untrusted control state)".into(),
        reason: format!("the stored control state is untrusted: {why}"),
        request_id: String::new(),
        ..base
    }
}

pub(super) fn restrictiveness(m: Mode) -> u8 {
    match m {
        Mode::Running => 0,
        Mode::Paused => 1,
        Mode::Halted => 2,
    }
}

/// The state after a mode entry (`entry`, decided on `base`, written by `writer`), or `None`
/// when it doesn't apply (the current state stands).
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
        // The quarantine and revocation lists are folded from their own entries, never from a
        // mode entry.
        quarantined: current.quarantined.clone(),
        revoked: current.revoked.clone(),
        proposals: current.proposals.clone(),
        grants: current.grants.clone(),
        approved_policies: current.approved_policies.clone(),
        ..entry.clone()
    })
}

/// `list` after an entry that puts `key` on it (`Some`: the first one there stays) or takes it
/// off (`None`), or `None` when the writer may not write it: the poller's own user may only put
/// on (a trip's quarantine or revoke), never take off; an untrusted writer neither.
fn listed<V: Clone>(
    list: &BTreeMap<String, V>,
    key: &str,
    value: Option<&V>,
    writer: Writer,
) -> Option<BTreeMap<String, V>> {
    let mut new = list.clone();
    match (value, writer) {
        (_, Writer::Untrusted) | (None, Writer::Poller) => return None,
        (Some(v), _) => {
            new.entry(key.to_owned()).or_insert_with(|| v.clone());
        }
        (None, Writer::Operator) => {
            new.remove(key);
        }
    }
    Some(new)
}

/// The state after a list entry (an agent's quarantine, a service's cut, a proposal or its
/// second), `None` when the writer may not write it or the change is a mode.
fn apply_listed(
    current: &ControlState,
    change: &Change,
    writer: Writer,
    who: Who<'_>,
) -> Option<ControlState> {
    match (change, writer, who.user) {
        (Change::Mode { .. }, _, _) => None,
        (Change::Agent { agent, quarantined }, _, _) => {
            let quarantined = listed(&current.quarantined, agent, quarantined.as_ref(), writer)?;
            Some(ControlState {
                quarantined,
                ..current.clone()
            })
        }
        (Change::Service { service, revoked }, _, _) => {
            let revoked = listed(&current.revoked, service, revoked.as_ref(), writer)?;
            Some(ControlState {
                revoked,
                ..current.clone()
            })
        }
        (Change::Propose { id, proposal }, Writer::Operator, Some(user)) => {
            let mut new = current.clone();
            // The proposer is who wrote it; the digest is the lever's, never the body's word.
            let p =
                loosening::propose(&proposal.lever, user, &proposal.since, &proposal.expires_at);
            new.proposals.entry(id.clone()).or_insert(p);
            Some(new)
        }
        (Change::Second { id, digest, at }, Writer::Operator, Some(user)) => {
            loosening::second(current, id, digest, user, at, who.rules).ok()
        }
        (Change::Grant { id, grant }, Writer::Operator, user) => {
            let mut new = current.clone();
            match grant {
                Some(g) => {
                    let by = user.map_or_else(|| g.by.clone(), str::to_owned);
                    new.grants
                        .entry(id.clone())
                        .or_insert_with(|| Grant { by, ..g.clone() });
                }
                None => {
                    new.grants.remove(id);
                }
            }
            Some(new)
        }
        (Change::Propose { .. } | Change::Second { .. } | Change::Grant { .. }, _, _) => None,
    }
}

/// Who wrote an entry (its broker-checked user) and the rules it is folded under.
#[derive(Debug, Clone, Copy)]
pub struct Who<'a> {
    pub user: Option<&'a str>,
    pub rules: Rules,
}

impl Who<'_> {
    /// One operator's rules, the writer unnamed (tests, and streams written before proposals).
    pub fn anyone() -> Who<'static> {
        Who {
            user: None,
            rules: Rules::default(),
        }
    }
}

/// `new` unless it loosens `current` by an entry of its own while the rules need two people
/// (a loosening is applied only by the second that completes its proposal).
fn unless_loosened(
    current: &ControlState,
    new: ControlState,
    change: &Change,
    rules: Rules,
) -> Option<ControlState> {
    let completes = matches!(change, Change::Second { .. });
    (completes || !rules.two_people() || !loosening::loosens(current, &new)).then_some(new)
}

/// What a reader of an empty stream folds to, as `control.empty_stream` says.
pub fn empty(e: super::EmptyStream) -> Folded {
    match e {
        super::EmptyStream::Running => Folded::Empty,
        super::EmptyStream::Untrusted => Folded::Untrusted {
            last: None,
            why: "the state stream is empty: an operator's first lever (`command-poller resume`, or `pause`/`halt`) bootstraps it".into(),
        },
    }
}

/// Parses one stream message.
pub fn parse(body: &[u8]) -> Result<Entry, serde_json::Error> {
    serde_json::from_slice(body)
}

/// `current` made untrusted because of `why`, keeping the last trusted state.
pub(super) fn distrust(current: Folded, why: String) -> Folded {
    match current {
        // The first reason stays: it is what an operator has to look into.
        Folded::Untrusted { last, why: first } => Folded::Untrusted { last, why: first },
        other => Folded::Untrusted {
            last: other.last_trusted(),
            why,
        },
    }
}

/// Folds one message (body and writer) into `current`, under one operator's rules.
pub fn step(current: Folded, body: &[u8], writer: Writer) -> Folded {
    step_by(current, body, writer, Who::anyone())
}

/// Folds one message (body, writer class, and who wrote it under which rules) into `current`.
pub fn step_by(current: Folded, body: &[u8], writer: Writer, who: Who<'_>) -> Folded {
    let entry = match parse(body) {
        Ok(e) => e,
        Err(e) => return distrust(current, format!("an unreadable state entry ({e})")),
    };
    if writer == Writer::Untrusted {
        return distrust(
            current,
            format!(
                "a state entry ({}) written by a user who is neither an operator nor the poller",
                describe(&entry.change, &entry.state)
            ),
        );
    }
    match (current, entry.change) {
        // The first entry of a new system: an operator's is a snapshot; the poller's applies
        // to the initial state.
        (Folded::Empty, _) if writer == Writer::Operator => Folded::State(entry.state),
        (Folded::Empty, change) => {
            step_trusted(ControlState::initial(), change, &entry.state, writer, who)
        }
        (Folded::State(c), change) => step_trusted(c, change, &entry.state, writer, who),
        (Folded::Untrusted { last, why }, Change::Mode { base }) => {
            // Decided on the stricter state replicas enforce.
            let eff = stricter(last.as_ref(), &why);
            let change = Change::Mode { base };
            let applied = apply(&eff, base, &entry.state, writer)
                .and_then(|new| unless_loosened(&eff, new, &change, who.rules));
            match applied {
                // An operator decided on what replicas enforce: trusted again.
                Some(new) if writer == Writer::Operator && base >= eff.seq => Folded::State(new),
                Some(new) => Folded::Untrusted {
                    last: Some(new),
                    why,
                },
                None => Folded::Untrusted { last, why },
            }
        }
        // The operators a proposal needed decided on what replicas enforce: trusted again.
        (Folded::Untrusted { last, why }, change @ Change::Second { .. })
            if writer == Writer::Operator =>
        {
            let eff = stricter(last.as_ref(), &why);
            match apply_listed(&eff, &change, writer, who) {
                Some(new) if loosening::loosens(&eff, &new) => Folded::State(new),
                Some(new) => Folded::Untrusted {
                    last: Some(ControlState {
                        proposals: new.proposals,
                        ..last.unwrap_or_else(ControlState::initial)
                    }),
                    why,
                },
                None => Folded::Untrusted { last, why },
            }
        }
        (Folded::Untrusted { last, why }, change) => {
            let base = last.clone().unwrap_or_else(ControlState::initial);
            let last = apply_listed(&base, &change, writer, who)
                .and_then(|new| unless_loosened(&base, new, &change, who.rules))
                .or(last);
            Folded::Untrusted { last, why }
        }
    }
}

fn step_trusted(
    current: ControlState,
    change: Change,
    state: &ControlState,
    w: Writer,
    who: Who<'_>,
) -> Folded {
    let new = match &change {
        Change::Mode { base } => apply(&current, *base, state, w),
        listed => apply_listed(&current, listed, w, who),
    };
    match new {
        Some(new) => match unless_loosened(&current, new, &change, who.rules) {
            Some(new) => Folded::State(new),
            // A lone operator's loosening: refused, and the state no longer trusted.
            None => distrust(Folded::State(current), LONE_LOOSENING.into()),
        },
        None => Folded::State(current),
    }
}

/// Why a state is untrusted after a lone operator's loosening entry.
pub const LONE_LOOSENING: &str = "an operator's entry loosened the state (a halt lifted, an agent released, a cut lifted or a grant added) without the other operators control.loosening_approvals requires";

fn describe(change: &Change, state: &ControlState) -> String {
    match change {
        Change::Mode { .. } => state.mode.as_str().to_owned(),
        Change::Agent {
            agent,
            quarantined: Some(_),
        } => format!("quarantine {agent}"),
        Change::Agent { agent, .. } => format!("release {agent}"),
        Change::Service {
            service,
            revoked: Some(r),
        } => format!("{} {service}", r.cut.lever()),
        Change::Service { service, .. } => format!("reconnected {service}"),
        Change::Propose { id, .. } => format!("propose {id}"),
        Change::Second { id, .. } => format!("second {id}"),
        Change::Grant { id, grant: Some(_) } => format!("grant {id}"),
        Change::Grant { id, .. } => format!("ungrant {id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Writer::*;

    fn state(mode: Mode, seq: u64) -> ControlState {
        ControlState {
            mode,
            seq,
            ..ControlState::initial()
        }
    }

    fn mode_entry(after: Option<u64>, base: u64, mode: Mode) -> Vec<u8> {
        serde_json::to_vec(&Entry {
            after,
            change: Change::Mode { base },
            state: state(mode, base + 1),
        })
        .unwrap()
    }

    fn q() -> Quarantined {
        Quarantined {
            by: "ops".into(),
            reason: "r".into(),
            since: "t".into(),
            request_id: "q".into(),
        }
    }

    fn agent_entry(
        after: Option<u64>,
        name: &str,
        quarantine: bool,
        snapshot: ControlState,
    ) -> Vec<u8> {
        serde_json::to_vec(&Entry {
            after,
            change: Change::Agent {
                agent: name.into(),
                quarantined: quarantine.then(q),
            },
            state: snapshot,
        })
        .unwrap()
    }

    /// Folds from a trusted RUNNING state at seq 0.
    fn fold_all(entries: &[(Vec<u8>, Writer)]) -> Folded {
        entries
            .iter()
            .fold(Folded::State(state(Mode::Running, 0)), |f, (b, w)| {
                step(f, b, *w)
            })
    }

    fn mode(f: &Folded) -> Mode {
        match f {
            Folded::State(s) => s.mode,
            other => panic!("{other:?}"),
        }
    }

    fn rec(offset: u64, writer: Writer, body: Vec<u8>) -> Record {
        Record {
            offset,
            writer,
            body,
            user: None,
        }
    }

    const TWO: Rules = Rules {
        loosening_approvals: 2,
    };

    fn by(user: &str) -> Who<'_> {
        Who {
            user: Some(user),
            rules: TWO,
        }
    }

    fn lift() -> super::super::ControlCommand {
        super::super::ControlCommand::Resume {
            reason: "back".into(),
            lift_halt: true,
            post_mortem: Some("PM-1".into()),
            request_id: "p-1".into(),
        }
    }

    fn entry(after: Option<u64>, change: Change, state: ControlState) -> Vec<u8> {
        serde_json::to_vec(&Entry {
            after,
            change,
            state,
        })
        .unwrap()
    }

    #[test]
    fn with_two_people_a_lone_operator_never_lifts_a_halt_and_a_second_does() {
        let halted = Folded::State(state(Mode::Halted, 1));
        // One operator's lift, written straight: refused by the fold.
        let lone = step_by(
            halted.clone(),
            &mode_entry(None, 1, Mode::Running),
            Operator,
            by("alice"),
        );
        assert_eq!(lone.effective().unwrap().mode, Mode::Halted);
        assert!(
            matches!(lone, Folded::Untrusted { .. }),
            "and alerted: {lone:?}"
        );
        // Proposed, then seconded by the proposer (refused), then by another: lifted.
        let p = loosening::propose(
            &lift(),
            "claimed-by-body",
            "2026-12-07T10:00:00Z",
            "2026-12-07T11:00:00Z",
        );
        let digest = p.digest.clone();
        let proposed = step_by(
            halted,
            &entry(
                None,
                Change::Propose {
                    id: "p-1".into(),
                    proposal: p,
                },
                state(Mode::Halted, 1),
            ),
            Operator,
            by("alice"),
        );
        let Folded::State(s) = &proposed else {
            panic!("{proposed:?}")
        };
        assert_eq!(
            s.proposals["p-1"].by, "alice",
            "the writer, not the body's word"
        );
        let second = |f: Folded, who: &str| {
            step_by(
                f,
                &entry(
                    None,
                    Change::Second {
                        id: "p-1".into(),
                        digest: digest.clone(),
                        at: "2026-12-07T10:05:00Z".into(),
                    },
                    state(Mode::Running, 2),
                ),
                Operator,
                by(who),
            )
        };
        assert_eq!(mode(&second(proposed.clone(), "alice")), Mode::Halted);
        let done = second(proposed.clone(), "bob");
        assert_eq!(mode(&done), Mode::Running);
        // The poller's user can neither second nor lift.
        let poller_second = step_by(
            proposed,
            &entry(
                None,
                Change::Second {
                    id: "p-1".into(),
                    digest: digest.clone(),
                    at: "2026-12-07T10:05:00Z".into(),
                },
                state(Mode::Running, 2),
            ),
            Poller,
            by("poller"),
        );
        assert_eq!(mode(&poller_second), Mode::Halted);
        let as_poller = step_by(
            Folded::State(state(Mode::Halted, 1)),
            &mode_entry(None, 1, Mode::Running),
            Poller,
            by("poller"),
        );
        assert_eq!(mode(&as_poller), Mode::Halted);
    }

    #[test]
    fn with_two_people_a_lone_release_or_reconnection_is_refused_and_a_quarantine_is_not() {
        let mut held = state(Mode::Running, 0);
        held.quarantined.insert("agent-bad".into(), q());
        let held = Folded::State(held);
        let released = step_by(
            held.clone(),
            &agent_entry(None, "agent-bad", false, state(Mode::Running, 0)),
            Operator,
            by("alice"),
        );
        assert!(released
            .effective()
            .unwrap()
            .quarantined
            .contains_key("agent-bad"));
        assert!(matches!(released, Folded::Untrusted { .. }));
        let more = step_by(
            held,
            &agent_entry(None, "agent-2", true, state(Mode::Running, 0)),
            Operator,
            by("alice"),
        );
        assert!(
            matches!(more, Folded::State(_)),
            "tightening stays one operator's"
        );
        let cut = fold_all(&[(service_entry("google", true), Operator)]);
        let back = step_by(cut, &service_entry("google", false), Operator, by("alice"));
        assert!(back.effective().unwrap().revoked.contains_key("google"));
    }

    #[test]
    fn an_anchor_that_loosens_without_its_second_makes_the_state_untrusted() {
        let halted = entry(None, Change::Mode { base: 0 }, state(Mode::Halted, 1));
        let lone_lift = entry(Some(0), Change::Mode { base: 1 }, state(Mode::Running, 2));
        let mut records = vec![rec(0, Operator, halted), rec(1, Operator, lone_lift)];
        records[1].user = Some("alice".into());
        let f = fold_records_by(&records, ReadFrom::First, TWO).unwrap();
        let Folded::Untrusted { last, why } = &f else {
            panic!("{f:?}")
        };
        assert_eq!(last.as_ref().unwrap().mode, Mode::Halted);
        assert!(why.contains("loosening_approvals"), "{why}");
        assert_eq!(f.effective().unwrap().mode, Mode::Halted, "still halted");
        // Nor does a later entry of its own (anchored on the lone lift) make it stick.
        let mut quiet = state(Mode::Running, 2);
        quiet.reason = "nothing to see".into();
        records.push(rec(
            2,
            Operator,
            entry(Some(1), Change::Mode { base: 2 }, quiet),
        ));
        records[2].user = Some("alice".into());
        let f = fold_records_by(&records, ReadFrom::First, TWO).unwrap();
        assert_eq!(f.effective().unwrap().mode, Mode::Halted, "{f:?}");
        assert!(matches!(f, Folded::Untrusted { .. }));
        records.pop();
        // With one person's rules the same records lift it, as before.
        let one = fold_records(&records, ReadFrom::First).unwrap();
        assert_eq!(mode(&one), Mode::Running);
        // An anchor that is the completing second is taken as written.
        let p = loosening::propose(
            &lift(),
            "alice",
            "2026-12-07T10:00:00Z",
            "2026-12-07T11:00:00Z",
        );
        let mut with_p = state(Mode::Halted, 1);
        with_p.proposals.insert("p-1".into(), p.clone());
        let proposed = entry(
            Some(0),
            Change::Propose {
                id: "p-1".into(),
                proposal: p.clone(),
            },
            with_p,
        );
        let seconded = entry(
            Some(1),
            Change::Second {
                id: "p-1".into(),
                digest: p.digest.clone(),
                at: "2026-12-07T10:05:00Z".into(),
            },
            state(Mode::Running, 2),
        );
        let mut records = vec![
            rec(
                0,
                Operator,
                entry(None, Change::Mode { base: 0 }, state(Mode::Halted, 1)),
            ),
            rec(1, Operator, proposed),
            rec(2, Operator, seconded),
        ];
        records[1].user = Some("alice".into());
        records[2].user = Some("bob".into());
        assert_eq!(
            mode(&fold_records_by(&records, ReadFrom::First, TWO).unwrap()),
            Mode::Running
        );
        // The same second written by the proposer: untrusted.
        records[2].user = Some("alice".into());
        let f = fold_records_by(&records, ReadFrom::First, TWO).unwrap();
        assert!(matches!(f, Folded::Untrusted { .. }), "{f:?}");
    }

    #[test]
    fn a_trip_written_just_after_a_halt_never_downgrades_it() {
        let f = fold_all(&[
            (mode_entry(None, 0, Mode::Halted), Operator),
            (mode_entry(None, 0, Mode::Paused), Poller),
        ]);
        assert_eq!(mode(&f), Mode::Halted);
        let f = fold_all(&[
            (mode_entry(None, 0, Mode::Halted), Operator),
            (mode_entry(None, 0, Mode::Paused), Operator),
        ]);
        assert_eq!(mode(&f), Mode::Halted);
        // Nor a pause decided on the halt itself.
        let f = fold_all(&[
            (mode_entry(None, 0, Mode::Halted), Operator),
            (mode_entry(None, 1, Mode::Paused), Operator),
        ]);
        assert_eq!(mode(&f), Mode::Halted);
    }

    #[test]
    fn a_halt_always_wins_a_race_and_a_stale_resume_never_does() {
        let f = fold_all(&[
            (mode_entry(None, 0, Mode::Paused), Operator),
            (mode_entry(None, 1, Mode::Running), Operator),
            (mode_entry(None, 1, Mode::Halted), Operator),
        ]);
        assert_eq!(mode(&f), Mode::Halted, "a halt that lost the race applies");
        let f = fold_all(&[
            (mode_entry(None, 0, Mode::Halted), Operator),
            (mode_entry(None, 0, Mode::Running), Operator),
        ]);
        assert_eq!(mode(&f), Mode::Halted, "a resume that never saw the halt");
        let f = fold_all(&[
            (mode_entry(None, 0, Mode::Halted), Operator),
            (mode_entry(None, 1, Mode::Running), Operator),
        ]);
        assert_eq!(mode(&f), Mode::Running);
    }

    #[test]
    fn the_poller_may_only_pause_a_running_system_and_quarantine() {
        let f = fold_all(&[
            (mode_entry(None, 0, Mode::Paused), Operator),
            (mode_entry(None, 1, Mode::Running), Poller),
        ]);
        assert_eq!(mode(&f), Mode::Paused);
        let f = fold_all(&[(mode_entry(None, 0, Mode::Halted), Poller)]);
        assert_eq!(mode(&f), Mode::Running);
        let f = fold_all(&[(mode_entry(None, 0, Mode::Paused), Poller)]);
        assert_eq!(mode(&f), Mode::Paused);
        let any = state(Mode::Running, 0);
        let f = fold_all(&[
            (agent_entry(None, "a", true, any.clone()), Poller),
            (agent_entry(None, "a", false, any), Poller),
        ]);
        let Folded::State(s) = f else { panic!() };
        assert!(s.quarantined.contains_key("a"), "the poller can't release");
    }

    #[test]
    fn an_untrusted_entry_never_loosens_anything() {
        let mut halted = state(Mode::Halted, 1);
        halted.quarantined.insert("agent-bad".into(), q());
        let start = Folded::State(halted.clone());
        for (junk, writer) in [
            (b"{\"decision\":\"list\"}".to_vec(), Poller),
            (b"garbage".to_vec(), Operator),
            (mode_entry(None, 1, Mode::Running), Untrusted),
        ] {
            let f = step(start.clone(), &junk, writer);
            let Folded::Untrusted { last, .. } = &f else {
                panic!("{f:?}")
            };
            assert_eq!(last.as_ref(), Some(&halted));
            let eff = f.effective().unwrap();
            assert_eq!(eff.mode, Mode::Halted, "the halt is kept");
            assert!(eff.quarantined.contains_key("agent-bad"));
            // The poller's pause, a stale resume: nothing changes.
            let f2 = step(f.clone(), &mode_entry(None, 0, Mode::Running), Operator);
            assert_eq!(f2.effective().unwrap().mode, Mode::Halted);
            let f2 = step(f.clone(), &mode_entry(None, 1, Mode::Paused), Poller);
            assert_eq!(f2.effective().unwrap().mode, Mode::Halted);
            // A later readable entry doesn't hide it.
            let f3 = step(
                f.clone(),
                &agent_entry(None, "x", true, halted.clone()),
                Poller,
            );
            assert!(matches!(f3, Folded::Untrusted { .. }));
            assert_eq!(f3.effective().unwrap().quarantined.len(), 2);
        }
        // A running system with a quarantine: untrusted means paused, the quarantine kept.
        let mut running = state(Mode::Running, 3);
        running.quarantined.insert("agent-bad".into(), q());
        let f = step(Folded::State(running), b"nope", Poller);
        let eff = f.effective().unwrap();
        assert_eq!(eff.mode, Mode::Paused);
        assert_eq!(eff.seq, 3);
        assert!(eff.quarantined.contains_key("agent-bad"));
        // An operator deciding on it makes it trusted again; the quarantine needs its release.
        let resumed = ControlState {
            mode: Mode::Running,
            seq: 4,
            ..eff.clone()
        };
        let entry = serde_json::to_vec(&Entry {
            after: None,
            change: Change::Mode { base: 3 },
            state: resumed,
        })
        .unwrap();
        let f = step(f, &entry, Operator);
        let Folded::State(s) = f else { panic!("{f:?}") };
        assert_eq!(s.mode, Mode::Running);
        assert!(s.quarantined.contains_key("agent-bad"));
    }

    /// A service entry whose snapshot holds what it changes, as its writer folded it.
    fn service_entry(name: &str, cut: bool) -> Vec<u8> {
        let revoked = cut.then(|| Revocation {
            cut: super::super::Cut::Revoked,
            by: "ops".into(),
            reason: "E01".into(),
            since: "t".into(),
            request_id: "r".into(),
        });
        let mut snapshot = state(Mode::Running, 0);
        if let Some(r) = &revoked {
            snapshot.revoked.insert(name.into(), r.clone());
        }
        serde_json::to_vec(&Entry {
            after: None,
            change: Change::Service {
                service: name.into(),
                revoked,
            },
            state: snapshot,
        })
        .unwrap()
    }

    #[test]
    fn a_cut_service_stays_cut_until_an_operator_records_it_reconnected() {
        let cut = |f: &Folded, s: &str| f.effective().unwrap().revoked.contains_key(s);
        // The poller (a trip that revokes) may cut; only an operator lifts it.
        let f = fold_all(&[(service_entry("google", true), Poller)]);
        assert!(cut(&f, "google"));
        let f2 = step(f.clone(), &service_entry("google", false), Poller);
        assert!(cut(&f2, "google"), "the poller can't record a reconnection");
        let f3 = step(f.clone(), &service_entry("google", false), Operator);
        assert!(!cut(&f3, "google"));
        // A mode entry's snapshot never carries a cut in or out.
        let f4 = step(f.clone(), &mode_entry(None, 0, Mode::Paused), Operator);
        assert!(cut(&f4, "google"));
        // An untrusted writer can neither cut nor lift, and the untrusted state keeps the cut.
        let f5 = step(f.clone(), &service_entry("google", false), Untrusted);
        assert!(matches!(f5, Folded::Untrusted { .. }));
        assert!(cut(&f5, "google"));
        let f6 = step(f5.clone(), &service_entry("google", false), Operator);
        assert!(
            !cut(&f6, "google"),
            "an operator's entry applies to the last trusted state"
        );
        assert!(
            matches!(f6, Folded::Untrusted { .. }),
            "but trusts nothing yet"
        );
        // With no anchor left, a best guess keeps every cut any trusted entry held.
        let recs = [
            rec(0, Poller, service_entry("meta", true)),
            rec(1, Poller, mode_entry(None, 0, Mode::Running)),
        ];
        assert!(best_guess(&recs).unwrap().revoked.contains_key("meta"));
    }

    #[test]
    fn quarantines_fold_apart_from_the_mode() {
        let any = state(Mode::Running, 0);
        let f = fold_all(&[
            (agent_entry(None, "a", true, any.clone()), Operator),
            (mode_entry(None, 0, Mode::Paused), Operator),
            (agent_entry(None, "b", true, any.clone()), Poller),
            (mode_entry(None, 1, Mode::Running), Operator),
            (mode_entry(None, 1, Mode::Halted), Operator),
        ]);
        let Folded::State(s) = &f else { panic!() };
        assert_eq!(s.mode, Mode::Halted);
        assert_eq!(s.quarantined.keys().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(s.seq, 3, "agent entries never move the sequence");
        // A mode entry's own quarantine list is never trusted over the agent entries.
        let f = fold_all(&[
            (agent_entry(None, "a", true, any.clone()), Operator),
            (mode_entry(None, 0, Mode::Running), Operator),
        ]);
        let Folded::State(s) = &f else { panic!() };
        assert!(s.quarantined.contains_key("a"));
    }

    #[test]
    fn a_fold_starts_at_the_latest_entry_an_operator_anchored() {
        let halted = {
            let mut s = state(Mode::Halted, 7);
            s.quarantined.insert("a".into(), q());
            s
        };
        let snapshot = |after| {
            serde_json::to_vec(&Entry {
                after,
                change: Change::Mode { base: 6 },
                state: halted.clone(),
            })
            .unwrap()
        };
        // The last chunk alone: nothing before it to anchor on.
        let last = [rec(40, Operator, snapshot(Some(30)))];
        assert_eq!(anchor(&last, ReadFrom::Last), None);
        assert_eq!(walk_back(&last, ReadFrom::Last), Some(ReadFrom::Offset(30)));
        // Read from 30: the entry before it is the one it names.
        let from_30 = [
            rec(30, Operator, b"whatever it was".to_vec()),
            rec(40, Operator, snapshot(Some(30))),
        ];
        assert_eq!(anchor(&from_30, ReadFrom::Offset(30)), Some(1));
        let f = fold_records(&from_30, ReadFrom::Offset(30)).unwrap();
        assert_eq!(
            f,
            Folded::State(halted.clone()),
            "an old entry before it costs nothing"
        );
        // A concurrent entry between them: the later one isn't anchored, read further back.
        let raced = [
            rec(30, Operator, mode_entry(Some(20), 6, Mode::Halted)),
            rec(35, Operator, mode_entry(Some(20), 6, Mode::Paused)),
            rec(40, Operator, snapshot(Some(30))),
        ];
        assert_eq!(anchor(&raced, ReadFrom::Offset(30)), None);
        assert_eq!(
            walk_back(&raced, ReadFrom::Offset(30)),
            Some(ReadFrom::Offset(20))
        );
        // The poller's entries never anchor: its snapshot could claim anything.
        let poller = [
            rec(30, Operator, b"x".to_vec()),
            rec(40, Poller, mode_entry(Some(30), 0, Mode::Running)),
        ];
        assert_eq!(anchor(&poller, ReadFrom::Offset(30)), None);
        // The stream's first entry anchors with `after: None`, anywhere else it doesn't.
        let genesis = [rec(0, Operator, mode_entry(None, 0, Mode::Running))];
        assert_eq!(anchor(&genesis, ReadFrom::First), Some(0));
        assert_eq!(anchor(&genesis, ReadFrom::Last), None);
        assert_eq!(walk_back(&genesis, ReadFrom::Last), Some(ReadFrom::First));
        // Retention dropped the start: nothing earlier, untrusted with the best guess.
        let dropped = [
            rec(
                500,
                Poller,
                agent_entry(Some(400), "b", true, halted.clone()),
            ),
            rec(501, Operator, b"unreadable".to_vec()),
        ];
        assert_eq!(walk_back(&dropped, ReadFrom::First), None);
        let guess = best_guess(&dropped).unwrap();
        assert_eq!(guess.mode, Mode::Halted);
        assert!(guess.quarantined.contains_key("a"));
    }

    #[test]
    fn an_anchor_then_changes_fold_like_a_full_history() {
        // The same history folded from its start and from a snapshot in its middle.
        let s1 = state(Mode::Paused, 1);
        let history = [
            rec(1, Operator, mode_entry(None, 0, Mode::Paused)),
            rec(
                2,
                Operator,
                serde_json::to_vec(&Entry {
                    after: Some(1),
                    change: Change::Agent {
                        agent: "a".into(),
                        quarantined: Some(q()),
                    },
                    state: ControlState {
                        quarantined: [("a".to_string(), q())].into(),
                        ..s1.clone()
                    },
                })
                .unwrap(),
            ),
            rec(3, Poller, agent_entry(Some(2), "b", true, s1.clone())),
            rec(4, Operator, mode_entry(Some(2), 1, Mode::Halted)),
        ];
        let from_first = history
            .iter()
            .fold(Folded::Empty, |f, r| step(f, &r.body, r.writer));
        assert_eq!(
            anchor(&history, ReadFrom::First),
            Some(1),
            "the latest anchor"
        );
        let from_2 = fold_records(&history, ReadFrom::First).unwrap();
        assert_eq!(from_first, from_2);
        let Folded::State(s) = from_first else {
            panic!()
        };
        assert_eq!(s.mode, Mode::Halted);
        assert_eq!(s.quarantined.len(), 2);
    }

    #[test]
    fn a_grant_entry_is_an_operators_and_under_two_people_never_a_lone_ones() {
        let g = Grant {
            agent: "agent-7".into(),
            command_type: crate::intake::CommandType::RefreshToken,
            service: "google".into(),
            uses: 1000,
            from: 0,
            until: u64::MAX,
            reason: "forever".into(),
            by: "(body)".into(),
            seconded_by: Default::default(),
        };
        let grant = |some: bool| {
            entry(
                None,
                Change::Grant {
                    id: "g-1".into(),
                    grant: some.then(|| g.clone()),
                },
                state(Mode::Running, 0),
            )
        };
        let running = Folded::State(state(Mode::Running, 0));
        // The poller's own user (a replica's credentials) can't grant anything.
        let from_poller = step_by(running.clone(), &grant(true), Poller, by("poller"));
        assert!(from_poller.effective().unwrap().grants.is_empty());
        // One operator where two are needed: refused, and the state no longer trusted.
        let lone = step_by(running.clone(), &grant(true), Operator, by("alice"));
        assert!(matches!(lone, Folded::Untrusted { .. }));
        assert!(lone.effective().unwrap().grants.is_empty());
        // Where one operator may loosen, it applies, its proposer the entry's writer.
        let one = Who {
            user: Some("alice"),
            rules: Rules::default(),
        };
        let granted = step_by(running, &grant(true), Operator, one);
        assert_eq!(granted.effective().unwrap().grants["g-1"].by, "alice");
        // A withdrawal tightens: one operator, even under two people's rules.
        let gone = step_by(granted, &grant(false), Operator, by("bob"));
        assert!(matches!(gone, Folded::State(ref s) if s.grants.is_empty()));
    }
}
