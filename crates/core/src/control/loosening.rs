//! Two people to loosen: a lever that loosens enforcement (lifting a halt, releasing a
//! quarantined agent, recording a cut service reconnected, a scoped grant, approving a policy
//! file that lets through what the policy in force refuses) is not applied when one operator
//! pulls it. It is parked in the stored state as a [`Proposal`], bound to a digest of exactly what it
//! changes, and applied by the fold itself when operators other than the proposer have seconded
//! it (`control.loosening_approvals` people in all, the proposer the first), before it expires.
//! Tightening levers (pause, halt, quarantine, revoke, disconnect) stay one operator, instant.
//!
//! In: the state, the lever, who (the broker-checked user of each entry) and when. Out: whether
//! a change loosens, the proposal, and what a second does to it. Pure: the fold and the
//! operator's client decide with the same functions, so they never disagree.

use super::{transition, Actor, ControlCommand, ControlState, Mode, Refusal};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// The fold's rules for loosening, from `[control]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    /// People a loosening lever needs, the proposer included; 1: one operator, as before.
    pub loosening_approvals: usize,
}

impl Default for Rules {
    fn default() -> Self {
        Self {
            loosening_approvals: 1,
        }
    }
}

impl Rules {
    pub fn two_people(&self) -> bool {
        self.loosening_approvals > 1
    }
}

/// A loosening lever waiting for its seconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Proposal {
    pub lever: ControlCommand,
    /// The proposer: the broker-checked writer of the proposal's entry.
    pub by: String,
    /// RFC 3339.
    pub since: String,
    /// RFC 3339; a second after it is refused and the proposal dropped.
    pub expires_at: String,
    /// [`digest`] of the lever: what a seconder binds to.
    pub digest: String,
    /// Operators who seconded it (never the proposer).
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub seconds: BTreeSet<String>,
}

/// Whether `to` enforces less than `from`: a halt lifted, an agent released, a cut lifted, a
/// grant added.
pub fn loosens(from: &ControlState, to: &ControlState) -> bool {
    (from.mode == Mode::Halted && to.mode != Mode::Halted)
        || from
            .quarantined
            .keys()
            .any(|a| !to.quarantined.contains_key(a))
        || from.revoked.keys().any(|s| !to.revoked.contains_key(s))
        || to.grants.keys().any(|g| !from.grants.contains_key(g))
        || to
            .approved_policies
            .iter()
            .any(|d| !from.approved_policies.contains(d))
}

/// SHA-256 (hex) over the lever as it will be applied (its kind, target, reason, post-mortem
/// reference and request id): a seconder binds to exactly this.
pub fn digest(lever: &ControlCommand) -> String {
    use sha2::{Digest, Sha256};
    let canonical = serde_json::to_string(&("loosen/v1", lever)).expect("a lever serializes");
    hex::encode(Sha256::digest(canonical.as_bytes()))
}

/// Why a second is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecondRefused {
    #[error("no pending proposal {0} (applied, expired, or never made)")]
    Unknown(String),
    #[error("the proposer can't second their own proposal: another operator must")]
    Own,
    #[error("{0} already seconded it: it needs another operator")]
    Twice(String),
    #[error("the digest differs from the proposal's ({0}): it binds to exactly what changes")]
    Digest(String),
    #[error("proposal expired at {0}: propose it again")]
    Expired(String),
}

/// `state` after `by` seconds proposal `id` (binding to `digest`) at `at`: counted, and applied
/// (the lever's transition as its proposer, the proposal gone) once it has the people `rules`
/// need. An expired proposal is dropped.
pub fn second(
    state: &ControlState,
    id: &str,
    digest: &str,
    by: &str,
    at: &str,
    rules: Rules,
) -> Result<ControlState, SecondRefused> {
    let p = state
        .proposals
        .get(id)
        .ok_or_else(|| SecondRefused::Unknown(id.to_owned()))?;
    // Compared as times (a time that can't be read is past it: fail closed).
    let parse = |t: &str| {
        time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
    };
    let seconded_at = match (parse(at), parse(&p.expires_at)) {
        (Some(at), Some(until)) if at <= until => at.unix_timestamp().max(0) as u64,
        _ => return Err(SecondRefused::Expired(p.expires_at.clone())),
    };
    if p.by == by {
        return Err(SecondRefused::Own);
    }
    if p.seconds.contains(by) {
        return Err(SecondRefused::Twice(by.to_owned()));
    }
    if p.digest != digest {
        return Err(SecondRefused::Digest(p.digest.clone()));
    }
    let mut new = state.clone();
    let mut p = new.proposals.remove(id).expect("found above");
    p.seconds.insert(by.to_owned());
    if p.seconds.len() + 1 < rules.loosening_approvals {
        new.proposals.insert(id.to_owned(), p);
        return Ok(new);
    }
    // Enough people: the lever as its proposer pulled it, decided on the state now. A grant's
    // clock starts at this second (the entry's time, the same for every reader of the stream).
    let applied = match &p.lever {
        ControlCommand::Grant { .. } => {
            super::grant::add(&new, &p.lever, &p.by, p.seconds.clone(), seconded_at)
        }
        lever => transition(&new, lever, &Actor::Operator(p.by.clone())),
    };
    Ok(match applied {
        Ok(mut applied) => {
            applied.proposals = new.proposals;
            applied
        }
        Err(_) => new,
    })
}

/// The proposal of `lever` by `by` at `at`, expiring at `expires_at`.
pub fn propose(lever: &ControlCommand, by: &str, at: &str, expires_at: &str) -> Proposal {
    Proposal {
        lever: lever.clone(),
        by: by.to_owned(),
        since: at.to_owned(),
        expires_at: expires_at.to_owned(),
        digest: digest(lever),
        seconds: BTreeSet::new(),
    }
}

/// Approved looser policy files kept (the newest).
pub const APPROVED_POLICIES_KEPT: usize = 16;

/// `current` with the policy file `digest` approved for loading.
pub(super) fn approve_policy(
    current: &ControlState,
    digest: &str,
    reason: &str,
) -> Result<ControlState, Refusal> {
    if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Refusal::BadDigest(digest.to_owned()));
    }
    if reason.trim().is_empty() {
        return Err(Refusal::NoReason);
    }
    let mut new = current.clone();
    let digest = digest.to_ascii_lowercase();
    new.approved_policies.retain(|d| *d != digest);
    new.approved_policies.push(digest);
    let over = new
        .approved_policies
        .len()
        .saturating_sub(APPROVED_POLICIES_KEPT);
    new.approved_policies.drain(..over);
    Ok(new)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO: Rules = Rules {
        loosening_approvals: 2,
    };
    const THREE: Rules = Rules {
        loosening_approvals: 3,
    };

    fn lift() -> ControlCommand {
        ControlCommand::Resume {
            reason: "done".into(),
            lift_halt: true,
            post_mortem: Some("PM-1".into()),
            request_id: "p-1".into(),
        }
    }

    fn halted_with(p: Proposal) -> ControlState {
        let mut s = ControlState {
            mode: Mode::Halted,
            ..ControlState::initial()
        };
        s.proposals.insert("p-1".into(), p);
        s
    }

    #[test]
    fn what_loosens() {
        let running = ControlState::initial();
        let halted = ControlState {
            mode: Mode::Halted,
            ..ControlState::initial()
        };
        let paused = ControlState {
            mode: Mode::Paused,
            ..ControlState::initial()
        };
        assert!(loosens(&halted, &running));
        assert!(loosens(&halted, &paused));
        assert!(
            !loosens(&paused, &running),
            "a resume from a pause is one operator's"
        );
        assert!(!loosens(&running, &halted));
        let mut q = running.clone();
        q.quarantined.insert(
            "a".into(),
            super::super::Quarantined {
                by: "o".into(),
                reason: "r".into(),
                since: "t".into(),
                request_id: "q".into(),
            },
        );
        assert!(loosens(&q, &running));
        assert!(!loosens(&running, &q));
    }

    #[test]
    fn a_lift_needs_another_operator_never_the_proposer_and_exactly_what_was_proposed() {
        let p = propose(
            &lift(),
            "alice",
            "2026-12-07T10:00:00Z",
            "2026-12-07T11:00:00Z",
        );
        let s = halted_with(p.clone());
        let at = "2026-12-07T10:05:00Z";
        assert_eq!(
            second(&s, "p-1", &p.digest, "alice", at, TWO),
            Err(SecondRefused::Own)
        );
        assert!(matches!(
            second(&s, "p-1", "0".repeat(64).as_str(), "bob", at, TWO),
            Err(SecondRefused::Digest(_))
        ));
        assert!(matches!(
            second(&s, "p-1", &p.digest, "bob", "2026-12-07T11:00:01Z", TWO),
            Err(SecondRefused::Expired(_))
        ));
        assert!(matches!(
            second(&s, "nope", &p.digest, "bob", at, TWO),
            Err(SecondRefused::Unknown(_))
        ));
        let done = second(&s, "p-1", &p.digest, "bob", at, TWO).unwrap();
        assert_eq!(done.mode, Mode::Running);
        assert_eq!(done.by, "alice", "applied as its proposer pulled it");
        assert!(done.proposals.is_empty());
    }

    #[test]
    fn three_people_means_two_seconds_from_two_others() {
        let p = propose(
            &lift(),
            "alice",
            "2026-12-07T10:00:00Z",
            "2026-12-07T11:00:00Z",
        );
        let s = halted_with(p.clone());
        let at = "2026-12-07T10:05:00Z";
        let one = second(&s, "p-1", &p.digest, "bob", at, THREE).unwrap();
        assert_eq!(one.mode, Mode::Halted, "one second of two");
        assert_eq!(
            second(&one, "p-1", &p.digest, "bob", at, THREE),
            Err(SecondRefused::Twice("bob".into()))
        );
        let two = second(&one, "p-1", &p.digest, "carol", at, THREE).unwrap();
        assert_eq!(two.mode, Mode::Running);
    }

    #[test]
    fn a_digest_binds_the_reason_and_the_target() {
        let other = ControlCommand::Resume {
            reason: "done".into(),
            lift_halt: true,
            post_mortem: Some("PM-2".into()),
            request_id: "p-1".into(),
        };
        assert_ne!(digest(&lift()), digest(&other));
        assert_eq!(digest(&lift()).len(), 64);
    }

    #[test]
    fn a_grant_loosens_and_its_clock_starts_at_the_second_that_completes_it() {
        let g = ControlCommand::Grant {
            agent: "agent-7".into(),
            command_type: crate::intake::CommandType::RefreshToken,
            service: "google".into(),
            uses: 5,
            for_secs: 600,
            reason: "routine refreshes".into(),
            request_id: "g-1".into(),
        };
        let p = propose(&g, "alice", "2026-12-07T10:00:00Z", "2026-12-07T11:00:00Z");
        let mut s = ControlState::initial();
        s.proposals.insert("g-1".into(), p.clone());
        assert_eq!(
            second(&s, "g-1", &p.digest, "alice", "2026-12-07T10:05:00Z", TWO),
            Err(SecondRefused::Own)
        );
        let one = second(&s, "g-1", &p.digest, "bob", "2026-12-07T10:05:00Z", THREE).unwrap();
        assert!(one.grants.is_empty(), "one second of two");
        let done = second(
            &one,
            "g-1",
            &p.digest,
            "carol",
            "2026-12-07T10:30:00Z",
            THREE,
        )
        .unwrap();
        let granted = &done.grants["g-1"];
        let at = time::macros::datetime!(2026-12-07 10:30:00 UTC).unix_timestamp() as u64;
        assert_eq!((granted.from, granted.until), (at, at + 600));
        assert_eq!(granted.by, "alice");
        assert_eq!(granted.seconded_by.len(), 2);
        assert!(loosens(&s, &done));
        assert!(!loosens(&done, &s), "a grant withdrawn tightens");
    }

    #[test]
    fn a_policy_approval_names_a_digest_and_keeps_the_newest() {
        let s = ControlState::initial();
        assert!(matches!(
            approve_policy(&s, "not-a-digest", "r"),
            Err(Refusal::BadDigest(_))
        ));
        assert_eq!(
            approve_policy(&s, &"a".repeat(64), " "),
            Err(Refusal::NoReason)
        );
        let mut s = s;
        for i in 0..APPROVED_POLICIES_KEPT + 2 {
            s = approve_policy(&s, &format!("{i:064x}"), "r").unwrap();
        }
        assert_eq!(s.approved_policies.len(), APPROVED_POLICIES_KEPT);
        assert_eq!(
            s.approved_policies.last().unwrap(),
            &format!("{:064x}", APPROVED_POLICIES_KEPT + 1)
        );
        let again = approve_policy(&s, &"0".repeat(63), "r");
        assert!(again.is_err());
        assert!(loosens(&ControlState::initial(), &s));
    }
}
