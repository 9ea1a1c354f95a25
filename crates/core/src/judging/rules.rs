//! Built-in rule-based judges, configured in `config/` so the poller runs offline.
//!
//! In: a [`JudgeRequest`]. Out: approve, or deny with the rule that failed. The rate rule counts
//! in a [`RateWindows`] (the shared store's: one count for the whole fleet, kept across
//! restarts); a judge that can't reach it can't answer, and the panel fails closed.

use super::{Judge, JudgeError, JudgeRequest, Verdict};
use crate::intake::CommandType;
use crate::outcome::Status;
use crate::store::RateWindows;
use futures::future::BoxFuture;
use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;

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
    /// Per-agent rate limit, for the whole fleet (counted in the shared store).
    #[serde(default)]
    pub max_per_agent: Option<RateRule>,
    /// A second, shorter per-agent limit for bursts (e.g. 3 in 600 s), counted the same way.
    #[serde(default)]
    pub max_burst: Option<RateRule>,
    /// Deny when the agent declared a severity below the type's floor (understating the risk).
    #[serde(default)]
    pub deny_understated_severity: bool,
    /// Deny when the agent's recent attempts of this type hold `count` or more that were not
    /// approved (NEEDS_APPROVAL, DENIED, EXPIRED, BLOCKED) within `window_secs`: the pattern of
    /// Emergency-INT-E01. Read from this replica's recent history.
    #[serde(default)]
    pub max_unapproved_recent: Option<RateRule>,
}

pub struct RuleJudge {
    name: String,
    rules: RuleSet,
    windows: Arc<dyn RateWindows>,
}

impl RuleJudge {
    pub fn new(name: impl Into<String>, rules: RuleSet, windows: Arc<dyn RateWindows>) -> Self {
        Self {
            name: name.into(),
            rules,
            windows,
        }
    }

    /// The rate window's key: this judge, the agent (verified or only claimed) and the type.
    fn window_key(&self, r: &JudgeRequest) -> String {
        let verified = if r.agent.verified { "v" } else { "u" };
        format!(
            "judge:{}:{verified}:{}:{}",
            self.name, r.agent.id, r.command_type
        )
    }

    async fn decide(&self, r: &JudgeRequest) -> Result<Verdict, JudgeError> {
        if let Some(v) = self.decide_static(r) {
            return Ok(v);
        }
        let limits = [
            ("max_per_agent", "", &self.rules.max_per_agent),
            ("max_burst", ":burst", &self.rules.max_burst),
        ];
        for (rule, suffix, rate) in limits {
            // A canary is not the agent's own attempt: it is never counted.
            let Some(rate) = rate.as_ref().filter(|_| !r.probe) else {
                continue;
            };
            let key = format!("{}{suffix}", self.window_key(r));
            let hit = self
                .windows
                .hit(&key, &r.action_id, rate.count, rate.window)
                .await
                .map_err(|e| JudgeError::Transport(format!("rate window: {e}")))?;
            if !hit.allowed {
                return Ok(Verdict::Veto {
                    rule,
                    reason: format!(
                        "agent {} already made {} {} requests in the last {} s (limit {}, for the whole fleet)",
                        r.agent.id,
                        hit.count,
                        r.command_type,
                        rate.window.as_secs(),
                        rate.count
                    ),
                });
            }
        }
        Ok(Verdict::Approve {
            reason: "all rules passed".into(),
        })
    }

    /// The rules that need no count: a veto, or `None` when they all pass.
    fn decide_static(&self, r: &JudgeRequest) -> Option<Verdict> {
        // Every rule here is a hard rule: a failure vetoes, it is not one vote among others.
        let veto = |rule: &'static str, reason: String| Verdict::Veto { rule, reason };
        if self.rules.require_verified_agent && !r.agent.verified {
            return Some(veto(
                "require_verified_agent",
                format!("agent {} is not verified by the broker", r.agent.id),
            ));
        }
        if self
            .rules
            .denied_agents
            .iter()
            .any(|a| a == r.agent.id.as_str())
        {
            return Some(veto(
                "denied_agents",
                format!("agent {} is on the deny list", r.agent.id),
            ));
        }
        if self.rules.denied_command_types.contains(&r.command_type) {
            return Some(veto(
                "denied_command_types",
                format!("{} is not allowed by this judge", r.command_type),
            ));
        }
        if self.rules.deny_understated_severity && r.declared_severity < r.effective_severity {
            return Some(veto(
                "deny_understated_severity",
                format!(
                    "declared {} below {}'s floor of {}: the agent understated the risk",
                    r.declared_severity, r.command_type, r.effective_severity
                ),
            ));
        }
        if let Some(rule) = &self.rules.max_unapproved_recent {
            let now = crate::store::now_millis() / 1000;
            let since = now.saturating_sub(rule.window.as_secs());
            let unapproved = r
                .recent_attempts
                .iter()
                .filter(|a| a.at >= since)
                .filter(|a| {
                    matches!(
                        a.status,
                        Status::NeedsApproval | Status::Denied | Status::Expired | Status::Blocked
                    )
                })
                .count();
            if unapproved >= rule.count {
                return Some(veto(
                    "max_unapproved_recent",
                    format!(
                        "agent {} made {unapproved} unapproved {} attempts in the last {} s (Emergency-INT-E01's pattern; limit {})",
                        r.agent.id,
                        r.command_type,
                        rule.window.as_secs(),
                        rule.count
                    ),
                ));
            }
        }
        if let Some(allowed) = &self.rules.allowed_services {
            if !allowed.iter().any(|s| s == r.service.as_str()) {
                return Some(veto(
                    "allowed_services",
                    format!(
                        "service {} is not an approved integration ({})",
                        r.service,
                        allowed.join(", ")
                    ),
                ));
            }
        }
        None
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
        Box::pin(self.decide(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intake::{Agent, AgentId, Service, Severity};
    use crate::store::local::MemWindows;

    fn req(id: &str, service: &str, verified: bool) -> JudgeRequest {
        JudgeRequest {
            justification: None,
            action_id: id.into(),
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
            probe: false,
        }
    }

    #[tokio::test]
    async fn rules_apply() {
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
            Arc::new(MemWindows::default()),
        );
        let verdict = |id: &'static str, service: &'static str, verified: bool| {
            let r = req(id, service, verified);
            let j = &j;
            async move { j.decide(&r).await.unwrap() }
        };
        assert!(matches!(
            verdict("1", "google", true).await,
            Verdict::Approve { .. }
        ));
        assert!(matches!(
            verdict("2", "salesforce", true).await,
            Verdict::Veto {
                rule: "allowed_services",
                ..
            }
        ));
        assert!(matches!(
            verdict("3", "google", false).await,
            Verdict::Veto {
                rule: "require_verified_agent",
                ..
            }
        ));
        assert!(matches!(
            verdict("4", "google", true).await,
            Verdict::Approve { .. }
        ));
        assert!(
            matches!(verdict("1", "google", true).await, Verdict::Approve { .. }),
            "the same command judged again counts once"
        );
        match verdict("5", "google", true).await {
            Verdict::Veto {
                rule: "max_per_agent",
                reason,
            } => assert!(reason.contains("limit 2"), "{reason}"),
            v => panic!("{v:?}"),
        }
    }

    /// A window store that can't be reached.
    struct Unreachable;

    impl RateWindows for Unreachable {
        fn hit<'a>(
            &'a self,
            _: &'a str,
            _: &'a str,
            _: usize,
            _: Duration,
        ) -> BoxFuture<'a, Result<crate::store::Hit, crate::store::LimitError>> {
            Box::pin(async {
                Err(crate::store::LimitError::Backend(
                    "redis: connection refused".into(),
                ))
            })
        }
    }

    #[tokio::test]
    async fn a_rate_rule_that_cant_count_gives_no_verdict() {
        let j = RuleJudge::new(
            "compliance",
            RuleSet {
                max_per_agent: Some(RateRule {
                    count: 5,
                    window: Duration::from_secs(3600),
                }),
                ..Default::default()
            },
            Arc::new(Unreachable),
        );
        let e = j.decide(&req("1", "google", true)).await.unwrap_err();
        assert!(e.to_string().contains("rate window"), "{e}");
    }

    #[tokio::test]
    async fn history_severity_and_burst_rules() {
        let j = RuleJudge::new(
            "compliance",
            RuleSet {
                deny_understated_severity: true,
                max_burst: Some(RateRule {
                    count: 2,
                    window: Duration::from_secs(600),
                }),
                max_unapproved_recent: Some(RateRule {
                    count: 2,
                    window: Duration::from_secs(3600),
                }),
                ..Default::default()
            },
            Arc::new(MemWindows::default()),
        );
        let rule_of = |v: Verdict| match v {
            Verdict::Veto { rule, .. } => rule,
            Verdict::Approve { .. } => "approved",
            Verdict::Deny { .. } => "denied",
        };
        let mut low = req("low", "google", true);
        low.declared_severity = Severity::Low;
        assert_eq!(
            rule_of(j.decide(&low).await.unwrap()),
            "deny_understated_severity"
        );

        let now = crate::store::now_millis() / 1000;
        let attempt = |status, ago: u64| crate::judging::history::Attempt {
            action_id: "earlier".into(),
            status,
            at: now - ago,
        };
        let mut e01 = req("e01", "google", true);
        e01.recent_attempts = vec![
            attempt(Status::NeedsApproval, 600),
            attempt(Status::Success, 500),
            attempt(Status::Denied, 300),
        ];
        assert_eq!(
            rule_of(j.decide(&e01).await.unwrap()),
            "max_unapproved_recent"
        );
        // Outside the window, or approved: not the pattern.
        e01.recent_attempts = vec![
            attempt(Status::NeedsApproval, 7200),
            attempt(Status::Denied, 300),
            attempt(Status::Success, 100),
        ];
        assert_eq!(rule_of(j.decide(&e01).await.unwrap()), "approved");

        // The burst window: two pass, the third is vetoed; a canary is never counted.
        let mut probe = req("probe", "google", true);
        probe.probe = true;
        for _ in 0..3 {
            assert_eq!(rule_of(j.decide(&probe).await.unwrap()), "approved");
        }
        assert_eq!(
            rule_of(j.decide(&req("b1", "google", true)).await.unwrap()),
            "approved"
        );
        assert_eq!(
            rule_of(j.decide(&req("b2", "google", true)).await.unwrap()),
            "max_burst"
        );
    }
}
