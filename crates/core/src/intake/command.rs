//! Validated command types. Each newtype can only be built through its `parse`, so a value of
//! these types is valid by construction.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The three command types of the runbook (section 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CommandType {
    CheckIntegrationStatus,
    RefreshToken,
    ConnectIntegration,
}

/// The bridge operations only operators ask for (`command-poller revoke` and `disconnect`,
/// through the control exchange), by their wire names: intake refuses them from agents.
pub const OPERATOR_ONLY_TYPES: [&str; 2] = ["REVOKE_CREDENTIALS", "DISCONNECT_INTEGRATION"];

impl CommandType {
    pub const ALL: [CommandType; 3] = [
        CommandType::CheckIntegrationStatus,
        CommandType::RefreshToken,
        CommandType::ConnectIntegration,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CommandType::CheckIntegrationStatus => "CHECK_INTEGRATION_STATUS",
            CommandType::RefreshToken => "REFRESH_TOKEN",
            CommandType::ConnectIntegration => "CONNECT_INTEGRATION",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// The routing key agents publish this type with: `command.<type in lower case>`.
    pub fn routing_key(self) -> String {
        format!("command.{}", self.as_str().to_ascii_lowercase())
    }
}

/// A type by its wire name, in any case (the command line's).
impl std::str::FromStr for CommandType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::parse(&s.to_ascii_uppercase()).ok_or_else(|| {
            "one of CHECK_INTEGRATION_STATUS, REFRESH_TOKEN, CONNECT_INTEGRATION".to_owned()
        })
    }
}

impl fmt::Display for CommandType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Declared or effective severity. Ordered: `Low < Medium < High`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Severity {
    Low,
    Medium,
    High,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Low => "LOW",
            Severity::Medium => "MEDIUM",
            Severity::High => "HIGH",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Severity::Low, Severity::Medium, Severity::High]
            .into_iter()
            .find(|v| v.as_str() == s)
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

macro_rules! validated_string {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, serde::Deserialize)]
        #[serde(into = "String", try_from = "String")]
        pub struct $name(String);

        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.0
            }
        }

        /// Read back through `parse`: a value that would not pass intake is refused.
        impl TryFrom<String> for $name {
            type Error = String;
            fn try_from(s: String) -> Result<Self, String> {
                $name::parse(&s)
            }
        }

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        /// Read-only access to the validated text (it can't be changed through this).
        impl std::ops::Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }

        impl PartialEq<String> for $name {
            fn eq(&self, other: &String) -> bool {
                &self.0 == other
            }
        }
    };
}

validated_string!(
    /// `action_id`: 1 to 128 characters of `[A-Za-z0-9._:-]`.
    ActionId
);
validated_string!(
    /// `params.service`: a lowercase slug (`[a-z0-9]` words joined by `-` or `_`), at most 64 chars.
    Service
);
validated_string!(
    /// An agent: the broker user that published the command (or, where config allows it, the
    /// payload's unverified `agent_id`). 1 to 64 characters of `[A-Za-z0-9_@:-]`; no `.`, so the
    /// reply-queue prefix `reply.<agent>.` can't be shared by two agents.
    AgentId
);

impl ActionId {
    pub const MAX_LEN: usize = 128;

    pub fn parse(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("must not be empty".into());
        }
        if s.chars().count() > Self::MAX_LEN {
            return Err(format!("is longer than {} characters", Self::MAX_LEN));
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')))
        {
            return Err(format!("contains {c:?}; only [A-Za-z0-9._:-] are allowed"));
        }
        Ok(Self(s.to_owned()))
    }
}

impl Service {
    pub const MAX_LEN: usize = 64;

    pub fn parse(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("must not be empty".into());
        }
        if s.len() > Self::MAX_LEN {
            return Err(format!("is longer than {} characters", Self::MAX_LEN));
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_')))
        {
            return Err(format!(
                "contains {c:?}; a service is a lowercase slug of [a-z0-9_-]"
            ));
        }
        let first = s.as_bytes()[0];
        let last = s.as_bytes()[s.len() - 1];
        if !first.is_ascii_alphanumeric() || !last.is_ascii_alphanumeric() {
            return Err("must start and end with a letter or digit".into());
        }
        Ok(Self(s.to_owned()))
    }
}

impl AgentId {
    pub const MAX_LEN: usize = 64;

    pub fn parse(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("must not be empty".into());
        }
        if s.len() > Self::MAX_LEN {
            return Err(format!("is longer than {} characters", Self::MAX_LEN));
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '@' | ':' | '-')))
        {
            return Err(format!("contains {c:?}; only [A-Za-z0-9_@:-] are allowed"));
        }
        Ok(Self(s.to_owned()))
    }
}

/// A command that passed validation. Built only by [`crate::intake::decode`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    pub action_id: ActionId,
    pub command_type: CommandType,
    pub service: Service,
    pub severity: Severity,
    /// The payload's own `agent_id`, if it carried one. Never trusted as identity: it must
    /// match the broker-checked `user_id`, or is used (marked unverified) only where config
    /// allows commands without `user_id`.
    pub claimed_agent: Option<AgentId>,
    /// Why the agent asks, in its own words (plain text, at most
    /// [`Command::MAX_JUSTIFICATION`] characters): shown to approvers and to the LLM judges as
    /// quoted data, never to the rule judges, never executed or followed as instructions.
    pub justification: Option<String>,
}

impl Command {
    pub const MAX_JUSTIFICATION: usize = 500;

    /// A justification as an agent may send it: non-empty plain text within the cap, no
    /// control characters but line breaks and tabs.
    pub fn parse_justification(s: &str) -> Result<String, String> {
        if s.trim().is_empty() {
            return Err("must not be empty (leave it out instead)".into());
        }
        let n = s.chars().count();
        if n > Self::MAX_JUSTIFICATION {
            return Err(format!(
                "is {n} characters; at most {} are allowed",
                Self::MAX_JUSTIFICATION
            ));
        }
        if let Some(c) = s
            .chars()
            .find(|c| c.is_control() && !matches!(c, '\n' | '\t'))
        {
            return Err(format!(
                "contains the control character {:?}; plain text only",
                c
            ));
        }
        Ok(s.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn action_id_rules() {
        assert!(ActionId::parse("status-check-mailchimp-123").is_ok());
        assert!(ActionId::parse("a.b_c:d-E9").is_ok());
        assert!(ActionId::parse(&"x".repeat(128)).is_ok());
        assert!(ActionId::parse(&"x".repeat(129))
            .unwrap_err()
            .contains("128"));
        assert!(ActionId::parse("").unwrap_err().contains("empty"));
        assert!(ActionId::parse("a b").unwrap_err().contains("' '"));
        assert!(ActionId::parse("é").is_err());
    }

    #[test]
    fn service_rules() {
        assert!(Service::parse("mailchimp").is_ok());
        assert!(Service::parse("google-ads_2").is_ok());
        assert!(Service::parse("Mailchimp").is_err());
        assert!(Service::parse("-x").is_err());
        assert!(Service::parse("x-").is_err());
        assert!(Service::parse(&"a".repeat(65)).is_err());
        assert!(Service::parse("mail chimp").is_err());
    }

    #[test]
    fn agent_rules() {
        assert!(AgentId::parse("agent-7").is_ok());
        assert!(AgentId::parse("ops@corp").is_ok());
        assert!(AgentId::parse("a.b").is_err());
        assert!(AgentId::parse("").is_err());
    }

    #[test]
    fn severity_orders() {
        assert!(Severity::Low < Severity::Medium && Severity::Medium < Severity::High);
        assert_eq!(
            CommandType::RefreshToken.routing_key(),
            "command.refresh_token"
        );
    }
}
