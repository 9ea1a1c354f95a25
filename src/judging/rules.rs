//! Built-in rule-based judges, configured in `config/` so the poller runs offline.
//!
//! In: a [`JudgeRequest`]. Out: approve, or deny with the rule that failed. The only state is a
//! per-agent, per-command-type count of recent requests for the rate rule.

use super::{Judge, JudgeError, JudgeRequest, Verdict};
use crate::intake::CommandType;
use futures::future::BoxFuture;
use serde::Deserialize;
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A rate rule: at most `count` requests per agent and command type within `window_secs`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RateRule {
    pub count: usize,
    /// Key `window_secs`, whole seconds.
    #[serde(rename = "window_secs", deserialize_with = "crate::clock::de::secs")]
    pub window: Duration,
}

/// The rules one judge applies; every rule set must pass for approval.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RuleSet {
    /// If set, only these services are approved.
    #[serde(default)]
    pub allowed_services: Option<Vec<String>>,
    /// Deny commands whose agent is not the broker-checked `user_id`.
    #[serde(default)]
    pub require_verified_agent: bool,
    /// Deny these agents outright.
    #[serde(default)]
    pub denied_agents: Vec<String>,
    /// Deny these command types outright.
    #[serde(default)]
    pub denied_command_types: Vec<CommandType>,
    /// Per-agent rate limit.
    #[serde(default)]
    pub max_per_agent: Option<RateRule>,
}

pub struct RuleJudge {
    name: String,
    rules: RuleSet,
    recent: Mutex<HashMap<(String, CommandType), VecDeque<Instant>>>,
}

impl RuleJudge {
    pub fn new(name: impl Into<String>, rules: RuleSet) -> Self {
        Self {
            name: name.into(),
            rules,
            recent: Mutex::new(HashMap::new()),
        }
    }

    fn decide(&self, r: &JudgeRequest) -> Verdict {
        // Every rule here is a hard rule: a failure vetoes, it is not one vote among others.
        let veto = |rule: &'static str, reason: String| Verdict::Veto { rule, reason };
        if self.rules.require_verified_agent && !r.agent.verified {
            return veto(
                "require_verified_agent",
                format!("agent {} is not verified by the broker", r.agent.id),
            );
        }
        if self
            .rules
            .denied_agents
            .iter()
            .any(|a| a == r.agent.id.as_str())
        {
            return veto(
                "denied_agents",
                format!("agent {} is on the deny list", r.agent.id),
            );
        }
        if self.rules.denied_command_types.contains(&r.command_type) {
            return veto(
                "denied_command_types",
                format!("{} is not allowed by this judge", r.command_type),
            );
        }
        if let Some(allowed) = &self.rules.allowed_services {
            if !allowed.iter().any(|s| s == r.service.as_str()) {
                return veto(
                    "allowed_services",
                    format!(
                        "service {} is not an approved integration ({})",
                        r.service,
                        allowed.join(", ")
                    ),
                );
            }
        }
        if let Some(rate) = &self.rules.max_per_agent {
            let window = rate.window;
            let now = Instant::now();
            let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
            let q = recent
                .entry((r.agent.id.to_string(), r.command_type))
                .or_default();
            while q.front().is_some_and(|t| now.duration_since(*t) > window) {
                q.pop_front();
            }
            if q.len() >= rate.count {
                return veto(
                    "max_per_agent",
                    format!(
                        "agent {} already made {} {} requests in the last {} s (limit {})",
                        r.agent.id,
                        q.len(),
                        r.command_type,
                        rate.window.as_secs(),
                        rate.count
                    ),
                );
            }
            q.push_back(now);
        }
        Verdict::Approve {
            reason: "all rules passed".into(),
        }
    }
}

impl Judge for RuleJudge {
    fn name(&self) -> &str {
        &self.name
    }

    fn can_veto(&self) -> bool {
        true
    }

    fn evaluate<'a>(
        &'a self,
        request: &'a JudgeRequest,
    ) -> BoxFuture<'a, Result<Verdict, JudgeError>> {
        Box::pin(async move { Ok(self.decide(request)) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intake::{Agent, AgentId, Service, Severity};

    fn req(service: &str, verified: bool) -> JudgeRequest {
        JudgeRequest {
            action_id: "a".into(),
            command_type: CommandType::RefreshToken,
            service: Service::parse(service).unwrap(),
            agent: Agent {
                id: AgentId::parse("bot").unwrap(),
                verified,
            },
            declared_severity: Severity::Medium,
            effective_severity: Severity::Medium,
            policy_rationale: String::new(),
            recent_attempts: Vec::new(),
        }
    }

    #[test]
    fn rules_apply() {
        let j = RuleJudge::new(
            "security",
            RuleSet {
                allowed_services: Some(vec!["google".into()]),
                require_verified_agent: true,
                max_per_agent: Some(RateRule {
                    count: 2,
                    window: Duration::from_secs(60),
                }),
                ..Default::default()
            },
        );
        assert!(matches!(
            j.decide(&req("google", true)),
            Verdict::Approve { .. }
        ));
        assert!(matches!(
            j.decide(&req("salesforce", true)),
            Verdict::Veto {
                rule: "allowed_services",
                ..
            }
        ));
        assert!(matches!(
            j.decide(&req("google", false)),
            Verdict::Veto {
                rule: "require_verified_agent",
                ..
            }
        ));
        assert!(matches!(
            j.decide(&req("google", true)),
            Verdict::Approve { .. }
        ));
        match j.decide(&req("google", true)) {
            Verdict::Veto {
                rule: "max_per_agent",
                reason,
            } => assert!(reason.contains("limit 2"), "{reason}"),
            v => panic!("{v:?}"),
        }
    }
}
