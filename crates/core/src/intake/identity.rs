//! Who sent a command, and where its result may go.
//!
//! In: the AMQP `user_id` (checked by RabbitMQ against the publishing connection's user), the
//! payload's `agent_id` claim, and the `reply_to` property. Out: an [`Agent`] and a
//! [`ReplyTarget`], or the reason the command is REJECTED. Pure: no I/O.

use super::command::AgentId;
use serde::Serialize;

/// The agent a command is attributed to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Agent {
    pub id: AgentId,
    /// True when the id is the broker-checked `user_id`; false when it is the payload's
    /// `agent_id`, accepted only because config allows commands without `user_id`.
    pub verified: bool,
}

impl Agent {
    /// The name trips, quarantines and the gate know this agent by: its id when the broker
    /// verified it, `unverified:<id>` when it is only the payload's claim, so unverified claims
    /// never trip or quarantine the real, verified agent of that name.
    pub fn control_key(&self) -> String {
        if self.verified {
            self.id.to_string()
        } else {
            format!("{UNVERIFIED_PREFIX}{}", self.id)
        }
    }

    /// The per-agent admission window this agent counts in: its own when verified; one for all
    /// unverified traffic (an unverified id is free to invent).
    pub fn admission_key(&self) -> String {
        if self.verified {
            format!("admission:{}", self.id)
        } else {
            "admission:unverified".into()
        }
    }
}

/// How trips and quarantines name an agent the broker did not verify.
pub const UNVERIFIED_PREFIX: &str = "unverified:";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("user_id: missing; commands must be published with the AMQP user_id property set to the publishing broker user")]
    MissingUserId,
    #[error("agent_id: missing; without a user_id an agent_id is required")]
    MissingAgentId,
    #[error("user_id: {0}")]
    InvalidUserId(String),
    #[error("agent_id: {claimed:?} does not match the authenticated publisher {actual:?}")]
    Forged { claimed: String, actual: String },
}

impl IdentityError {
    pub fn field(&self) -> &'static str {
        match self {
            IdentityError::MissingUserId | IdentityError::InvalidUserId(_) => "user_id",
            IdentityError::MissingAgentId | IdentityError::Forged { .. } => "agent_id",
        }
    }
}

/// Attributes a command to an agent. A present `user_id` always wins and must agree with any
/// `agent_id` claim; an absent one is refused unless `allow_unverified`.
pub fn identify(
    user_id: Option<&str>,
    claimed: Option<&AgentId>,
    allow_unverified: bool,
) -> Result<Agent, IdentityError> {
    match user_id {
        Some(uid) => {
            let id = AgentId::parse(uid).map_err(IdentityError::InvalidUserId)?;
            if let Some(c) = claimed {
                if c != &id {
                    return Err(IdentityError::Forged {
                        claimed: c.to_string(),
                        actual: id.to_string(),
                    });
                }
            }
            Ok(Agent { id, verified: true })
        }
        None if !allow_unverified => Err(IdentityError::MissingUserId),
        None => match claimed {
            Some(c) => Ok(Agent {
                id: c.clone(),
                verified: false,
            }),
            None => Err(IdentityError::MissingAgentId),
        },
    }
}

/// Where, besides `mcp.results`, a command's result is delivered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(tag = "kind", content = "queue", rename_all = "snake_case")]
pub enum ReplyTarget {
    None,
    /// RabbitMQ's direct reply-to (`amq.rabbitmq.reply-to…`), via the default exchange.
    DirectReplyTo(String),
    /// A queue `reply.<agent>.…` of the publishing (verified) agent, via the default exchange.
    AgentQueue(String),
}

impl ReplyTarget {
    pub fn routing_key(&self) -> Option<&str> {
        match self {
            ReplyTarget::None => None,
            ReplyTarget::DirectReplyTo(q) | ReplyTarget::AgentQueue(q) => Some(q),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("reply_to: {reason}")]
pub struct ReplyToRefused {
    pub requested: String,
    pub reason: String,
}

/// Decides whether the poller may publish to `reply_to`. It only ever publishes through the
/// default exchange, so the value names a queue; only the agent's own queues qualify.
pub fn reply_target(reply_to: Option<&str>, agent: &Agent) -> Result<ReplyTarget, ReplyToRefused> {
    let Some(rt) = reply_to.filter(|s| !s.is_empty()) else {
        return Ok(ReplyTarget::None);
    };
    let refuse = |reason: String| ReplyToRefused {
        requested: rt.chars().take(255).collect(),
        reason,
    };
    if rt.len() > 255 || rt.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(refuse("not a valid queue name".into()));
    }
    if crate::names::is_direct_reply_to(rt) {
        return Ok(ReplyTarget::DirectReplyTo(rt.to_owned()));
    }
    let own_prefix = format!("reply.{}.", agent.id);
    if let Some(rest) = rt.strip_prefix(&own_prefix) {
        if !agent.verified {
            return Err(refuse(
                "an unverified agent may only use direct reply-to (amq.rabbitmq.reply-to)".into(),
            ));
        }
        if rest.is_empty() {
            return Err(refuse(format!("{own_prefix} must be followed by a name")));
        }
        return Ok(ReplyTarget::AgentQueue(rt.to_owned()));
    }
    Err(refuse(format!(
        "only amq.rabbitmq.reply-to or a queue named {own_prefix}<name> is allowed"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> AgentId {
        AgentId::parse(s).unwrap()
    }

    #[test]
    fn user_id_is_identity() {
        let ag = identify(Some("agent-1"), None, false).unwrap();
        assert_eq!(ag.id.as_str(), "agent-1");
        assert!(ag.verified);
        assert!(identify(Some("agent-1"), Some(&a("agent-1")), false).is_ok());
    }

    #[test]
    fn forged_and_missing() {
        assert!(matches!(
            identify(Some("agent-1"), Some(&a("agent-2")), true),
            Err(IdentityError::Forged { .. })
        ));
        assert_eq!(
            identify(None, Some(&a("x")), false),
            Err(IdentityError::MissingUserId)
        );
        assert_eq!(
            identify(None, None, true),
            Err(IdentityError::MissingAgentId)
        );
        let ag = identify(None, Some(&a("x")), true).unwrap();
        assert!(!ag.verified);
        assert_eq!(
            identify(Some("a.b"), None, false).unwrap_err().field(),
            "user_id"
        );
    }

    #[test]
    fn unverified_claims_are_keyed_apart_and_share_one_admission_window() {
        let real = Agent {
            id: AgentId::parse("agent-marketing").unwrap(),
            verified: true,
        };
        let claim = Agent {
            verified: false,
            ..real.clone()
        };
        assert_eq!(real.control_key(), "agent-marketing");
        assert_eq!(claim.control_key(), "unverified:agent-marketing");
        assert_eq!(real.admission_key(), "admission:agent-marketing");
        let other = Agent {
            id: AgentId::parse("agent-sales").unwrap(),
            verified: false,
        };
        assert_eq!(claim.admission_key(), other.admission_key());
    }

    #[test]
    fn reply_to_rules() {
        let v = Agent {
            id: a("bot"),
            verified: true,
        };
        let u = Agent {
            id: a("bot"),
            verified: false,
        };
        assert_eq!(reply_target(None, &v), Ok(ReplyTarget::None));
        assert!(matches!(
            reply_target(Some("amq.rabbitmq.reply-to.g1h2AA"), &u),
            Ok(ReplyTarget::DirectReplyTo(_))
        ));
        assert!(matches!(
            reply_target(Some("reply.bot.inbox"), &v),
            Ok(ReplyTarget::AgentQueue(_))
        ));
        assert!(reply_target(Some("reply.bot.inbox"), &u).is_err());
        assert!(reply_target(Some("reply.other.inbox"), &v).is_err());
        assert!(reply_target(Some("reply.bot."), &v).is_err());
        assert!(reply_target(Some("reply.botx.inbox"), &v).is_err());
        assert!(reply_target(Some("mcp.commands"), &v).is_err());
        assert!(reply_target(Some("amq.rabbitmq.reply-toX"), &v).is_err());
    }
}
