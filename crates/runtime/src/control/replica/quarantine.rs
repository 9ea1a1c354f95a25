//! One agent held out: an operator's quarantine or release (enforced from the stored state,
//! announced from its lever once shown), and the agent-scoped automatic trip. Each is an event,
//! an audit record and an alert.

use super::render;
use super::{Cause, Replica};
use crate::broker::{BrokerError, Publisher};
use crate::control::state_log;
use crate::intake::AgentId;
use crate::outcome::{AgentView, Priority};
use poller_core::control::trip::Trip;
use poller_core::control::{transition, Actor, ControlCommand};

impl Replica {
    /// Announces a quarantine or release this replica applied: the event and audit record,
    /// and (`alert`) the alert. An operator's lever alerts from every replica that applies it,
    /// as a halt does; an automatic quarantine alerts from the replica that tripped only.
    pub(super) async fn quarantine_changed(
        &self,
        publisher: &Publisher,
        cmd: &ControlCommand,
        actor: &Actor,
        alert: bool,
    ) -> Result<(), BrokerError> {
        let (kind, agent, reason) = match cmd {
            ControlCommand::Quarantine { agent, reason, .. } => ("quarantined", agent, reason),
            ControlCommand::Release { agent, reason, .. } => ("released", agent, reason),
            _ => return Ok(()),
        };
        tracing::warn!(agent = %agent, by = %actor.name(), reason = %reason, "{kind}");
        self.event(
            publisher,
            kind,
            &actor.name(),
            cmd.request_id(),
            Some(format!("agent {agent}: {reason}")),
        )
        .await?;
        let view = agent_view(agent);
        let (team, priority, what, todo) = match (kind, actor) {
            ("quarantined", Actor::Poller(_)) => (
                "security",
                Priority::High,
                format!(
                    "Agent {agent} quarantined automatically on replica {}: {reason}",
                    self.names.instance
                ),
                "Its commands end REJECTED on every replica while the others flow. Investigate the agent's decision logs and credentials; release it with `command-poller release AGENT` when safe.",
            ),
            ("quarantined", _) => (
                "security",
                Priority::Normal,
                format!(
                    "Agent {agent} quarantined by {} on replica {}: {reason}",
                    actor.name(),
                    self.names.instance
                ),
                "Its commands end REJECTED on every replica while the others flow; release it with `command-poller release AGENT`.",
            ),
            _ => (
                "ops",
                Priority::Normal,
                format!(
                    "Agent {agent} released from quarantine by {} on replica {}{}",
                    actor.name(),
                    self.names.instance,
                    if reason.is_empty() { String::new() } else { format!(": {reason}") }
                ),
                "Its commands are decided again as any agent's.",
            ),
        };
        if let (true, Some(view)) = (alert, view) {
            let msg = render::agent_alert(
                &self.names,
                team,
                priority,
                &view,
                &what,
                todo,
                crate::clock::now_rfc3339(),
            );
            publisher.publish(&msg).await?;
        }
        Ok(())
    }

    /// The agent-scoped trip: quarantines the offender everywhere (locally first, then the
    /// stored state, then the other replicas through the lever), never pausing the fleet.
    pub(super) async fn quarantine_everywhere(
        &self,
        publisher: &Publisher,
        t: &Trip,
    ) -> Result<(), BrokerError> {
        let reason = format!(
            "automatic trip: {} unapproved {} attempts within {} s: {}",
            t.attempts.len(),
            t.command_type,
            t.rule.window.as_secs(),
            t.attempts
                .iter()
                .map(|a| a.action_id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        let cmd = ControlCommand::Quarantine {
            agent: t.agent.clone(),
            reason,
            request_id: uuid::Uuid::new_v4().to_string(),
        };
        let actor = Actor::Poller(self.names.poller_user.clone());
        let (decided, _) = self.enforce(Cause::Trip, |current| {
            match transition(current, &cmd, &actor) {
                Ok(new) if new.quarantined != current.quarantined => (Some(new.clone()), Some(new)),
                // Quarantined already, or not a change the transition allows.
                _ => (None, None),
            }
        });
        let Some(new) = decided else {
            return Ok(());
        };
        self.first_announcement(cmd.request_id());
        state_log::write(
            publisher,
            &self.control,
            self.state_position(),
            state_log::Change::Agent {
                agent: t.agent.clone(),
                quarantined: new.quarantined.get(&t.agent).cloned(),
            },
            &new,
            &self.names.poller_user,
        )
        .await?;
        publisher.publish(&render::lever(&cmd, &self.names)).await?;
        self.quarantine_changed(publisher, &cmd, &actor, true).await
    }
}

/// How many request ids a replica remembers having announced.
const ANNOUNCED: usize = 256;

impl Replica {
    /// True the first time `request_id` is seen here (then remembered).
    pub(super) fn first_announcement(&self, request_id: &str) -> bool {
        let mut seen = self.announced.lock().unwrap_or_else(|p| p.into_inner());
        if seen.iter().any(|r| r == request_id) {
            return false;
        }
        if seen.len() >= ANNOUNCED {
            seen.pop_front();
        }
        seen.push_back(request_id.to_owned());
        true
    }
}

/// The agent a quarantine names: `unverified:<id>` is the payload's unverified claim of `<id>`.
fn agent_view(agent: &str) -> Option<AgentView> {
    let (id, verified) = match agent.strip_prefix(crate::intake::UNVERIFIED_PREFIX) {
        Some(claimed) => (claimed, false),
        None => (agent, true),
    };
    AgentId::parse(id).ok().map(|id| AgentView { id, verified })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unverified_claim_is_its_own_agent_in_a_quarantine() {
        let v = agent_view("unverified:agent-marketing").unwrap();
        assert_eq!(v.id.as_str(), "agent-marketing");
        assert!(!v.verified);
        let v = agent_view("agent-marketing").unwrap();
        assert!(v.verified);
    }
}
