//! Judging: the third pipeline stage, for commands the policy sends to the judges.
//!
//! In: a [`JudgeRequest`] describing the command. Out: a [`PanelReport`]: approved or not, and
//! every judge's vote. Judges sit behind the [`Judge`] trait (the boundary to rule engines and
//! language models); the vote counting in [`panel::tally`] is pure.

pub mod canary;
pub use crate::history;
pub mod panel;
pub mod rules;

pub use panel::{DecisionRule, Panel, PanelOutcome, PanelReport};

use crate::intake::{Agent, CommandType, Service, Severity};
use futures::future::BoxFuture;
use serde::Serialize;

/// What a judge sees: the validated command, its agent, and the policy's view of it.
#[derive(Debug, Clone, Serialize)]
pub struct JudgeRequest {
    pub action_id: String,
    pub command_type: CommandType,
    pub service: Service,
    pub agent: Agent,
    pub declared_severity: Severity,
    pub effective_severity: Severity,
    pub policy_rationale: String,
    /// This agent's recent attempts of the same command type, newest last.
    pub recent_attempts: Vec<history::Attempt>,
    /// The agent's own words on why it asks (see [`crate::intake::Command::justification`]):
    /// for the LLM judges, as quoted data; the rule judges never read it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub justification: Option<String>,
    /// A canary (see [`canary`]): never executed, and not counted by rate rules. Judges that
    /// talk to a model never tell it.
    #[serde(skip)]
    pub probe: bool,
}

/// A judge's clear answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Approve {
        reason: String,
    },
    Deny {
        reason: String,
    },
    /// A hard rule failed (rate limit, verified agent required, denied agent, type or service):
    /// the command is not approved whatever the other judges say. `rule` names it.
    Veto {
        rule: &'static str,
        reason: String,
    },
}

/// A judge that could not give a clear verdict. Counts as not approving.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JudgeError {
    #[error("timed out after {0} ms")]
    Timeout(u64),
    #[error("transport error: {0}")]
    Transport(String),
    #[error("no clear verdict: {0}")]
    NoVerdict(String),
    /// The server refused a parameter the judge sends: a configuration to fix, not a verdict.
    #[error("request refused: {0}")]
    Refused(String),
}

impl JudgeError {
    /// Worth retrying within the judge's own deadline.
    pub fn is_transient(&self) -> bool {
        matches!(self, JudgeError::Timeout(_) | JudgeError::Transport(_))
    }
}

/// The boundary to anything that votes on a command.
pub trait Judge: Send + Sync {
    fn name(&self) -> &str;
    /// Whether this judge applies hard rules that veto. The panel never approves before every
    /// such judge has answered, and a vetoing judge that can't answer fails closed.
    fn can_veto(&self) -> bool {
        false
    }
    fn evaluate<'a>(
        &'a self,
        request: &'a JudgeRequest,
    ) -> BoxFuture<'a, Result<Verdict, JudgeError>>;
}
