//! The automatic trip across replicas: every replica counts the unapproved attempts all of them
//! report; the one whose own attempt trips pauses everywhere.

use super::render;
use super::Replica;
use crate::broker::{BrokerError, Publisher};
use crate::control::state_log;
use crate::control::trip::{Trip, UnapprovedAttempt};
use crate::control::{transition, Actor, ControlCommand};
use crate::outcome::Priority;

impl Replica {
    pub(super) async fn on_attempt(
        &self,
        body: &[u8],
        user: Option<&str>,
        publisher: &Publisher,
    ) -> Result<(), BrokerError> {
        // Only replicas report attempts.
        if user != Some(self.names.poller_user.as_str()) {
            tracing::warn!(user = ?user, "attempt report from a user that is not the poller; ignored");
            return Ok(());
        }
        let Ok(attempt) = serde_json::from_slice::<UnapprovedAttempt>(body) else {
            return Ok(());
        };
        let own = attempt.instance == self.names.instance;
        let trip = self
            .trip
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record(attempt);
        match trip {
            Some(t) if own => self.trip(publisher, t).await,
            _ => Ok(()),
        }
    }

    /// Pauses everywhere: locally first, then the stored state, then the other replicas.
    pub(super) async fn trip(&self, publisher: &Publisher, t: Trip) -> Result<(), BrokerError> {
        let reason = t.reason();
        let request_id = uuid::Uuid::new_v4().to_string();
        let cmd = ControlCommand::Pause {
            reason: reason.clone(),
            request_id: request_id.clone(),
        };
        let actor = Actor::Poller(self.names.poller_user.clone());
        let current = self.gate.state();
        let Ok(new) = transition(&current, &cmd, &actor) else {
            return Ok(()); // halted already
        };
        self.gate.set(new.clone());
        tracing::error!(agent = %t.agent, "{reason}");
        state_log::write(
            publisher,
            &self.control,
            current.seq,
            &new,
            &self.names.poller_user,
        )
        .await?;
        publisher.publish(&render::lever(&cmd, &self.names)).await?;
        self.event(
            publisher,
            "tripped",
            &actor.name(),
            &request_id,
            Some(reason.clone()),
        )
        .await?;
        let attempts: Vec<String> = t
            .attempts
            .iter()
            .map(|a| format!("{} ({}, {})", a.action_id, a.status, a.instance))
            .collect();
        let what = format!(
            "Poller paused automatically: agent {} made {} unapproved {} attempts within {} s: {}",
            t.agent,
            t.attempts.len(),
            t.command_type,
            t.rule.window.as_secs(),
            attempts.join("; ")
        );
        self.alert(
            publisher,
            "security",
            Priority::High,
            &what,
            "Emergency-INT-E01: revoke the possibly compromised credentials at the provider, investigate the agent's decision logs, escalate to security; resume with `command-poller resume` when safe.",
        )
        .await
    }
}
