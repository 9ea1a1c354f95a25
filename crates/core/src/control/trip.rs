//! The automatic trip of Emergency-INT-E01: N unapproved attempts of a command type by one
//! agent within a window pause the system. Pure: fed attempts, answers whether this one trips.

use crate::intake::CommandType;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::time::Duration;

/// One automatic trip (Emergency-INT-E01) from config: `count` unapproved attempts
/// (NEEDS_APPROVAL or BLOCKED) of `command_type` by one agent within `window_secs` pause the
/// system.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TripRule {
    pub command_type: crate::intake::CommandType,
    /// Unapproved attempts (NEEDS_APPROVAL or BLOCKED) that trip.
    pub count: usize,
    /// The window the attempts fall in (key `window_secs`, whole seconds).
    #[serde(rename = "window_secs", deserialize_with = "crate::clock::de::secs")]
    pub window: Duration,
    /// `fleet` (the default, Emergency-INT-E01): pause every replica. `agent`: quarantine the
    /// offending agent everywhere, and every other agent's commands keep flowing.
    #[serde(default)]
    pub scope: TripScope,
    /// REFRESH_TOKEN trips only: also revoke the services the attempts were for, as step 2 of
    /// Emergency-INT-E01 (`command-poller revoke`, pulled by the replica that tripped). Off by
    /// default: a revoke takes the service away from every agent until a human reconnects it.
    #[serde(default)]
    pub revoke_on_trip: bool,
}

/// What an automatic trip stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TripScope {
    #[default]
    Fleet,
    Agent,
}

/// An unapproved attempt, as replicas share it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnapprovedAttempt {
    pub agent: String,
    pub command_type: CommandType,
    pub action_id: String,
    pub status: crate::outcome::Status,
    /// Seconds since the Unix epoch.
    pub at: u64,
    /// The replica that processed it.
    pub instance: String,
    /// The service it was for (absent from replicas of an older version).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
}

/// The decision to trip, with the evidence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trip {
    pub agent: String,
    pub command_type: CommandType,
    pub attempts: Vec<UnapprovedAttempt>,
    pub rule: TripRule,
}

impl Trip {
    /// The services the attempts were for, each once, in the order first attempted.
    pub fn services(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for s in self.attempts.iter().filter_map(|a| a.service.as_ref()) {
            if !out.contains(s) {
                out.push(s.clone());
            }
        }
        out
    }

    pub fn reason(&self) -> String {
        let ids: Vec<&str> = self.attempts.iter().map(|a| a.action_id.as_str()).collect();
        format!(
            "automatic trip (Emergency-INT-E01): agent {} made {} unapproved {} attempts within {} s: {}",
            self.agent,
            self.attempts.len(),
            self.command_type,
            self.rule.window.as_secs(),
            ids.join(", ")
        )
    }
}

/// Whether any of `rules` counts attempts of type `t` (only those are shared with replicas).
pub fn watched(rules: &[TripRule], t: CommandType) -> bool {
    rules.iter().any(|r| r.command_type == t)
}

#[derive(Debug, Default)]
pub struct TripWire {
    rules: Vec<TripRule>,
    seen: HashMap<(String, CommandType), VecDeque<UnapprovedAttempt>>,
    /// Attempts that already tripped, by action_id and time, within the window.
    spent: HashMap<(String, CommandType), Vec<(String, u64)>>,
}

impl TripWire {
    pub fn new(rules: Vec<TripRule>) -> Self {
        Self {
            rules,
            seen: HashMap::new(),
            spent: HashMap::new(),
        }
    }

    pub fn watches(&self, t: CommandType) -> bool {
        watched(&self.rules, t)
    }

    /// Records one attempt; returns the trip when the attempts in the window reach N. The
    /// attempts that tripped are then spent: the wire re-arms, and the next N within a window
    /// (after an operator resumes, say) trip again, however many trips came before.
    pub fn record(&mut self, a: UnapprovedAttempt) -> Option<Trip> {
        let rule = self
            .rules
            .iter()
            .find(|r| r.command_type == a.command_type)?
            .clone();
        let q = self
            .seen
            .entry((a.agent.clone(), a.command_type))
            .or_default();
        let cutoff = a.at.saturating_sub(rule.window.as_secs());
        let spent = self
            .spent
            .entry((a.agent.clone(), a.command_type))
            .or_default();
        spent.retain(|(_, at)| *at >= cutoff);
        if q.iter().any(|s| s.action_id == a.action_id)
            || spent.iter().any(|(id, _)| *id == a.action_id)
        {
            return None; // the same attempt seen twice (a redelivery) counts once
        }
        q.retain(|s| s.at >= cutoff);
        q.push_back(a.clone());
        if q.len() < rule.count.max(1) {
            return None;
        }
        // Spent, but remembered by id so a redelivered copy of one of them can't count again.
        let attempts: Vec<UnapprovedAttempt> = q.drain(..).collect();
        self.spent
            .entry((a.agent.clone(), a.command_type))
            .or_default()
            .extend(attempts.iter().map(|s| (s.action_id.clone(), s.at)));
        Some(Trip {
            agent: a.agent.clone(),
            command_type: a.command_type,
            attempts,
            rule,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::Status;

    fn attempt(agent: &str, id: &str, at: u64) -> UnapprovedAttempt {
        UnapprovedAttempt {
            agent: agent.into(),
            command_type: CommandType::RefreshToken,
            action_id: id.into(),
            status: Status::NeedsApproval,
            at,
            instance: "r1".into(),
            service: Some(if id.ends_with('m') { "meta" } else { "google" }.into()),
        }
    }

    fn wire() -> TripWire {
        TripWire::new(vec![TripRule {
            command_type: CommandType::RefreshToken,
            count: 3,
            window: std::time::Duration::from_secs(600),
            scope: TripScope::Fleet,
            revoke_on_trip: false,
        }])
    }

    #[test]
    fn a_trip_names_each_service_attempted_once() {
        let mut w = wire();
        assert!(w.record(attempt("a", "1", 10)).is_none());
        assert!(w.record(attempt("a", "2m", 11)).is_none());
        let t = w.record(attempt("a", "3", 12)).expect("trips");
        assert_eq!(t.services(), vec!["google".to_string(), "meta".to_string()]);
    }

    #[test]
    fn trips_on_the_nth_and_not_before() {
        let mut w = wire();
        assert!(w.record(attempt("a", "1", 100)).is_none());
        assert!(w.record(attempt("a", "2", 200)).is_none());
        assert!(w.record(attempt("b", "x", 250)).is_none(), "another agent");
        let t = w.record(attempt("a", "3", 300)).expect("third trips");
        assert_eq!(t.attempts.len(), 3);
        assert!(t
            .reason()
            .contains("agent a made 3 unapproved REFRESH_TOKEN attempts"));
        assert!(
            w.record(attempt("a", "3", 305)).is_none(),
            "a redelivered copy of a spent attempt counts once"
        );
        assert!(w.record(attempt("a", "4", 310)).is_none());
        assert!(w.record(attempt("a", "5", 320)).is_none());
        assert!(
            w.record(attempt("a", "6", 330)).is_some(),
            "re-armed: the next three trip again"
        );
    }

    #[test]
    fn keeps_tripping_after_every_resume() {
        // The attack: after an operator resumes, ten more unapproved attempts in the same
        // window must not go unnoticed.
        let mut w = wire();
        let trips = (0..13)
            .filter(|i| {
                w.record(attempt("a", &format!("id-{i}"), 100 + i))
                    .is_some()
            })
            .count();
        assert_eq!(trips, 4, "3 + 10 attempts: a trip at every third");
    }

    #[test]
    fn the_window_slides_and_duplicates_count_once() {
        let mut w = wire();
        w.record(attempt("a", "1", 0));
        w.record(attempt("a", "2", 10));
        assert!(w.record(attempt("a", "2", 11)).is_none());
        assert!(
            w.record(attempt("a", "3", 700)).is_none(),
            "1 and 2 are outside the window"
        );
        let mut other = wire();
        other.rules.clear();
        assert!(
            other.record(attempt("a", "1", 0)).is_none(),
            "no rule, no trip"
        );
    }
}
