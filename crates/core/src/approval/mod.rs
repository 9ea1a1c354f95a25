//! Human approval of NEEDS_APPROVAL commands (SOP-INT-02: "a human is alerted").
//!
//! In: a command the judges did not approve (parked by the pipeline in the shared store), and
//! decisions from approvers over the broker. Out: exactly one final result per parked command,
//! SUCCESS or FAILED after M distinct approvals (executed once, through the gate), DENIED after
//! one deny, EXPIRED when nobody decided in time; refusals answered with a reason; events,
//! alerts, audit records, webhook notices.
//!
//! The rules are pure ([`rules`]): a decision on a [`Parked`] record gives the next record or a
//! refusal. The shell around them: [`desk`] takes decisions off the approvals queue (any
//! replica, each decision once), [`sweeper`] expires, executes and finalizes (any replica, each
//! record once, under the command's idempotency claim), [`approver`] is the approvers' command
//! line, [`webhook`] posts notices, [`render`] builds every message (pure).

pub mod rules;
pub mod wire;

use crate::bridge::signing::Secret;
use crate::intake::{ActionId, CommandType, ReplyTarget, Service, Severity};
use crate::outcome::{AgentView, ApprovalMark, ApprovalTicket, JudgeVote, SeverityView, Status};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Where a parked command stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum State {
    /// Waiting for approvers.
    Pending,
    /// M distinct approvers approved: to be executed (once, through the gate).
    Approved,
    /// An approver denied it: never executed.
    Denied,
    /// Nobody decided before `expires_at`: never executed.
    Expired,
}

/// A parked NEEDS_APPROVAL command, as kept in the shared store (sealed with the store key, so
/// a record planted or altered without it is refused).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Parked {
    pub approval_id: String,
    /// The command's idempotency key (`<agent>/<action_id>`): the final result is stored there.
    pub action_key: String,
    pub action_id: ActionId,
    pub command_type: CommandType,
    pub service: Service,
    pub severity: Severity,
    pub agent: AgentView,
    /// The broker user that published the command (none for an unverified agent's).
    pub publisher: Option<String>,
    /// Where the command's final result goes besides the results exchange.
    pub reply: ReplyTarget,
    /// The judges' votes with their reasons.
    pub judges: Vec<JudgeVote>,
    /// How the panel decided (absent in records parked before it was kept).
    #[serde(default)]
    pub panel: Option<crate::outcome::PanelSummary>,
    pub severity_view: Option<SeverityView>,
    pub received_at: String,
    /// Why it needs approval (the NEEDS_APPROVAL rationale).
    pub rationale: String,
    /// The agent's own words on why it asks, shown to approvers as quoted text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub justification: Option<String>,
    pub command_digest: String,
    /// SHA-256 of the policy file that decided.
    pub policy_digest: String,
    /// What approvers bind to: [`digest`] of the command digest and the policy digest.
    pub digest: String,
    pub required: u32,
    /// Unix seconds.
    pub parked_at: u64,
    pub expires_at: u64,
    pub state: State,
    pub approvals: Vec<ApprovalMark>,
    pub denial: Option<ApprovalMark>,
    /// Unix seconds of the decision that ended the wait (approval M, the deny, the expiry).
    pub decided_at: Option<u64>,
    /// The webhook was told of it / reminded.
    pub notified: bool,
    pub reminded: bool,
    /// The final result's status, once it is stored and published: the record is closed.
    pub finalized: Option<Status>,
}

impl Parked {
    /// The `approval` object of the NEEDS_APPROVAL result.
    pub fn ticket(&self) -> ApprovalTicket {
        ApprovalTicket {
            approval_id: self.approval_id.clone(),
            digest: self.digest.clone(),
            approvals_required: self.required,
            expires_at: crate::clock::rfc3339(self.expires_at),
        }
    }

    /// Sealed for the store.
    pub fn seal(&self, key: &Secret) -> String {
        crate::store::seal(key, &serde_json::to_string(self).expect("serializes"))
    }

    /// A stored record, if its seal holds and it parses.
    pub fn unseal(key: &Secret, stored: &str) -> Result<Self, String> {
        let json = crate::store::unseal(key, stored)?;
        serde_json::from_str(&json).map_err(|e| format!("unreadable approval record: {e}"))
    }
}

/// Every command type's approval wait must end before the store forgets the parked command
/// (`idempotency.retention_secs`). Checked at start and by `check-config`.
pub fn check_ttls(
    policy: &crate::policy::Policy,
    retention: std::time::Duration,
) -> Result<(), String> {
    for t in CommandType::ALL {
        let ttl = policy.rule(t).approval_ttl;
        if ttl >= retention {
            return Err(format!(
                "commands.{t}.approval_ttl_secs ({} s) must be shorter than idempotency.retention_secs ({} s): a parked command must outlive its wait",
                ttl.as_secs(),
                retention.as_secs()
            ));
        }
    }
    Ok(())
}

/// The approval id of a command key: the same command parked twice (a redelivery) is one
/// approval. 24 hex characters, easy to type.
pub fn approval_id(action_key: &str) -> String {
    hex::encode(Sha256::digest(
        format!("approval-id/v1\n{action_key}").as_bytes(),
    ))[..24]
        .to_owned()
}

/// What approvers bind to: SHA-256 over the canonical command (with its agent: the command
/// digest) and the digest of the policy that parked it.
pub fn digest(command_digest: &str, policy_digest: &str) -> String {
    let canonical = serde_json::json!(["approval/v1", command_digest, policy_digest]);
    hex::encode(Sha256::digest(canonical.to_string().as_bytes()))
}

/// Human approval of NEEDS_APPROVAL commands (the `[approval]` section).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalSettings {
    /// Broker users allowed to approve or deny (their AMQP user_id is checked by the broker).
    /// Anyone else is refused and security is alerted; an agent never decides its own command.
    pub approvers: Vec<String>,
    /// Topic exchange approvers publish decisions to (`approval.<decision>`); agents must have
    /// no write permission on it.
    pub exchange: String,
    /// Durable quorum queue of decisions, shared by the replicas (each decision is handled
    /// once); dead-letters what keeps failing.
    pub queue: String,
    /// How often each replica looks for decided or expired approvals (`sweep_interval_ms`).
    #[serde(
        rename = "sweep_interval_ms",
        deserialize_with = "crate::clock::de::millis"
    )]
    pub sweep_interval: std::time::Duration,
    /// Largest decision message accepted, in bytes.
    pub max_decision_bytes: usize,
    /// Decision messages one approver may send per minute (every replica counts its own);
    /// beyond it each is refused unread, and security is alerted once a minute.
    #[serde(default = "default_decisions_per_minute")]
    pub max_decisions_per_minute: u32,
    /// Environment variable holding a Slack-compatible incoming-webhook URL that is told of
    /// every parked approval and reminded before it expires; unset or empty: no webhook.
    /// Never logged.
    pub webhook_url_env: String,
    /// The reminder goes out this long before expiry (`remind_before_secs`).
    #[serde(
        rename = "remind_before_secs",
        deserialize_with = "crate::clock::de::secs"
    )]
    pub remind_before: std::time::Duration,
    /// Each webhook post's deadline (`webhook_timeout_ms`); failed posts are retried with
    /// backoff for up to a minute, off the command path.
    #[serde(
        rename = "webhook_timeout_ms",
        deserialize_with = "crate::clock::de::millis"
    )]
    pub webhook_timeout: std::time::Duration,
}

fn default_decisions_per_minute() -> u32 {
    120
}

#[cfg(any(test, feature = "test-util"))]
pub mod test_util {
    use super::*;
    use crate::intake::AgentId;

    /// A pending record: agent `agent-7`, published by `agent-7`, 2 approvals required,
    /// parked at 1000, expiring at 1900.
    pub fn parked() -> Parked {
        let command_digest = "c".repeat(64);
        let policy_digest = "p".repeat(64);
        Parked {
            justification: Some("weekly refresh for the newsletter".into()),
            approval_id: approval_id("agent-7/a-1"),
            action_key: "agent-7/a-1".into(),
            action_id: ActionId::parse("a-1").unwrap(),
            command_type: CommandType::RefreshToken,
            service: Service::parse("google").unwrap(),
            severity: Severity::Medium,
            agent: AgentView {
                id: AgentId::parse("agent-7").unwrap(),
                verified: true,
            },
            publisher: Some("agent-7".into()),
            reply: ReplyTarget::None,
            judges: Vec::new(),
            panel: None,
            severity_view: None,
            received_at: "2026-11-27T00:00:00Z".into(),
            rationale: "not approved by the judges".into(),
            digest: digest(&command_digest, &policy_digest),
            command_digest,
            policy_digest,
            required: 2,
            parked_at: 1000,
            expires_at: 1900,
            state: State::Pending,
            approvals: Vec::new(),
            denial: None,
            decided_at: None,
            notified: false,
            reminded: false,
            finalized: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_through_its_seal_and_a_planted_one_is_refused() {
        let key = Secret::new("k");
        let p = test_util::parked();
        let sealed = p.seal(&key);
        assert_eq!(Parked::unseal(&key, &sealed).unwrap(), p);
        assert!(Parked::unseal(&Secret::new("other"), &sealed).is_err());
        let approved = sealed.replace("PENDING", "APPROVED");
        assert!(Parked::unseal(&key, &approved).is_err());
    }

    #[test]
    fn an_approval_wait_must_end_before_the_store_forgets_the_command() {
        let policy = crate::policy::Policy::load(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/policy.toml"),
        )
        .expect("the shipped policy loads");
        let week = std::time::Duration::from_secs(7 * 24 * 3600);
        assert!(check_ttls(&policy, week).is_ok());
        let e = check_ttls(&policy, std::time::Duration::from_secs(900)).unwrap_err();
        assert!(e.contains("approval_ttl_secs (900 s)"), "{e}");
    }

    #[test]
    fn the_digest_binds_the_command_and_the_policy() {
        let a = digest(&"c".repeat(64), &"p".repeat(64));
        assert_eq!(a.len(), 64);
        assert_ne!(a, digest(&"d".repeat(64), &"p".repeat(64)));
        assert_ne!(a, digest(&"c".repeat(64), &"q".repeat(64)));
        assert_eq!(approval_id("x/y").len(), 24);
        assert_ne!(approval_id("x/y"), approval_id("x/z"));
    }
}
