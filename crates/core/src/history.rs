//! Recent attempts per agent and command type, kept in memory, so judges can weigh an agent's
//! recent behaviour ("third refresh in ten minutes, the last two not approved").
//!
//! In: each concluded command's agent, type, action_id and status. Out: the recent attempts of
//! one agent and type, newest last.

use crate::intake::CommandType;
use crate::outcome::Status;
use serde::Serialize;
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Attempt {
    pub action_id: String,
    pub status: Status,
    /// Seconds since the Unix epoch.
    pub at: u64,
}

pub struct AttemptHistory {
    window: Duration,
    per_key: usize,
    entries: Mutex<HashMap<(String, CommandType), VecDeque<Attempt>>>,
}

impl AttemptHistory {
    /// Keeps at most `per_key` attempts per agent and type, none older than `window`.
    pub fn new(window: Duration, per_key: usize) -> Self {
        Self {
            window,
            per_key,
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }

    pub fn record(&self, agent: &str, t: CommandType, action_id: &str, status: Status) {
        let mut e = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let q = e.entry((agent.to_owned(), t)).or_default();
        q.push_back(Attempt {
            action_id: action_id.to_owned(),
            status,
            at: Self::now(),
        });
        while q.len() > self.per_key {
            q.pop_front();
        }
    }

    /// How many attempts of `t` by `agent` were recorded within the last `within`.
    pub fn count_within(&self, agent: &str, t: CommandType, within: Duration) -> usize {
        let cutoff = Self::now().saturating_sub(within.as_secs().min(self.window.as_secs()));
        let e = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        e.get(&(agent.to_owned(), t))
            .map(|q| q.iter().filter(|a| a.at >= cutoff).count())
            .unwrap_or(0)
    }

    pub fn recent(&self, agent: &str, t: CommandType) -> Vec<Attempt> {
        let cutoff = Self::now().saturating_sub(self.window.as_secs());
        let e = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        e.get(&(agent.to_owned(), t))
            .map(|q| q.iter().filter(|a| a.at >= cutoff).cloned().collect())
            .unwrap_or_default()
    }
}

/// How long the pipeline's history keeps attempts, and how many per agent and type.
pub const WINDOW: Duration = Duration::from_secs(3600);
pub const PER_KEY: usize = 20;

impl Default for AttemptHistory {
    fn default() -> Self {
        Self::new(WINDOW, PER_KEY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_per_agent_and_type() {
        let h = AttemptHistory::new(Duration::from_secs(60), 2);
        h.record("a", CommandType::RefreshToken, "1", Status::NeedsApproval);
        h.record("a", CommandType::RefreshToken, "2", Status::Success);
        h.record("a", CommandType::RefreshToken, "3", Status::Blocked);
        h.record("b", CommandType::RefreshToken, "4", Status::Success);
        let r = h.recent("a", CommandType::RefreshToken);
        assert_eq!(
            r.iter().map(|a| a.action_id.as_str()).collect::<Vec<_>>(),
            ["2", "3"]
        );
        assert!(h
            .recent("a", CommandType::CheckIntegrationStatus)
            .is_empty());
    }
}
