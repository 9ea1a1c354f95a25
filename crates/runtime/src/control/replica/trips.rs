//! The automatic trip across replicas: every replica counts the unapproved attempts all of them
//! report; the one whose own attempt trips pauses everywhere.

use super::render;
use super::{Cause, Replica};
use crate::broker::{BrokerError, Publisher};
use crate::control::state_log;
use crate::judging::canary::Finding;
use crate::outcome::Priority;
use poller_core::control::trip::{Trip, TripScope, UnapprovedAttempt};
use poller_core::control::{transition, Actor, ControlCommand};
use poller_core::intake::CommandType;
use std::sync::Arc;

impl Replica {
    pub(super) async fn on_attempt(
        self: &Arc<Self>,
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

    /// Pauses everywhere (scope `fleet`: locally first, then the stored state, then the other
    /// replicas), or quarantines the offending agent everywhere (scope `agent`).
    pub(super) async fn trip(
        self: &Arc<Self>,
        publisher: &Publisher,
        t: Trip,
    ) -> Result<(), BrokerError> {
        if t.rule.revoke_on_trip && t.command_type == CommandType::RefreshToken {
            // Step 2 after step 1: stored now, carried out by the bridge on its own task.
            self.stop(publisher, &t).await?;
            for service in t.services() {
                self.revoke_on_trip(publisher, &service, &t).await?;
            }
            return Ok(());
        }
        self.stop(publisher, &t).await
    }

    /// Step 1 of a trip: the offending agent quarantined (scope `agent`), or the fleet paused.
    async fn stop(&self, publisher: &Publisher, t: &Trip) -> Result<(), BrokerError> {
        self.stats.tripped(match t.rule.scope {
            TripScope::Agent => "agent",
            TripScope::Fleet => "fleet",
        });
        if t.rule.scope == TripScope::Agent {
            return self.quarantine_everywhere(publisher, t).await;
        }
        let reason = t.reason();
        tracing::error!(agent = %t.agent, "{reason}");
        if !self.pause_everywhere(publisher, &reason).await? {
            return Ok(()); // halted already
        }
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
            if t.rule.revoke_on_trip {
                "Emergency-INT-E01: the services attempted are being revoked (revoke_on_trip; a separate alert says what was done to each credential); investigate the agent's decision logs, escalate to security; resume with `command-poller resume` when safe."
            } else {
                "Emergency-INT-E01: revoke the possibly compromised credentials (`command-poller revoke SERVICE`), investigate the agent's decision logs, escalate to security; resume with `command-poller resume` when safe."
            },
        )
        .await
    }

    /// `revoke_on_trip`: the service cut by the poller's own user (stored, enforced here at
    /// once), then carried out through the bridge and announced like an operator's revoke.
    async fn revoke_on_trip(
        self: &Arc<Self>,
        publisher: &Publisher,
        service: &str,
        t: &Trip,
    ) -> Result<(), BrokerError> {
        let cmd = ControlCommand::Revoke {
            service: service.to_owned(),
            reason: t.reason(),
            request_id: uuid::Uuid::new_v4().to_string(),
        };
        let actor = Actor::Poller(self.names.poller_user.clone());
        let (decided, _) = self.enforce(Cause::Trip, |current| {
            match transition(current, &cmd, &actor) {
                Ok(new) if new.revoked != current.revoked => (Some(new.clone()), Some(new)),
                // Cut already (an operator was quicker), or a service the transition refuses.
                _ => (None, None),
            }
        });
        let Some(new) = decided else {
            return Ok(());
        };
        state_log::write(
            publisher,
            &self.control,
            self.state_position(),
            state_log::Change::Service {
                service: service.to_owned(),
                revoked: new.revoked.get(service).cloned(),
            },
            &new,
            &self.names.poller_user,
        )
        .await?;
        self.carry_out_cut(super::levers::Pending::unanswered(cmd, actor), publisher);
        Ok(())
    }

    /// The poller's own pause (a trip, a failed canary): false when it doesn't apply (the
    /// system is halted or paused already).
    async fn pause_everywhere(
        &self,
        publisher: &Publisher,
        reason: &str,
    ) -> Result<bool, BrokerError> {
        let request_id = uuid::Uuid::new_v4().to_string();
        let cmd = ControlCommand::Pause {
            reason: reason.to_owned(),
            request_id: request_id.clone(),
        };
        let actor = Actor::Poller(self.names.poller_user.clone());
        let (decided, _) = self.enforce(Cause::Trip, |current| {
            match transition(current, &cmd, &actor) {
                Ok(new) => (Some(new.clone()), Some((new, current.seq))),
                Err(_) => (None, None),
            }
        });
        let Some((new, base)) = decided else {
            return Ok(false);
        };
        state_log::write(
            publisher,
            &self.control,
            self.state_position(),
            state_log::Change::Mode { base },
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
            Some(reason.to_owned()),
        )
        .await?;
        Ok(true)
    }

    /// A canary the panel got wrong: approving the known-bad one alerts `security.high` and
    /// (with `pause`) pauses every replica; denying the known-good one warns ops.
    pub async fn canary_failed(
        &self,
        publisher: &Publisher,
        finding: Finding,
        detail: &str,
        pause: bool,
    ) -> Result<(), BrokerError> {
        match finding {
            Finding::Healthy => Ok(()),
            Finding::ApprovedKnownBad => {
                let what = format!("The judge panel APPROVED the known-bad canary (an unverified agent connecting an unknown service at understated severity): {detail}");
                tracing::error!("{what}");
                let paused = pause
                    && self
                        .pause_everywhere(
                            publisher,
                            &format!(
                                "canary: the judge panel approved the known-bad canary ({detail})"
                            ),
                        )
                        .await?;
                let todo = if paused {
                    "The poller paused every replica. Check the judges (model, prompts, endpoint) with `command-poller judges eval`; resume with `command-poller resume` once the panel refuses the canary again."
                } else {
                    "Check the judges (model, prompts, endpoint) with `command-poller judges eval`; consider `command-poller pause` until the panel refuses the canary again."
                };
                self.alert(publisher, "security", Priority::High, &what, todo)
                    .await
            }
            Finding::DeniedKnownGood => {
                let what = format!("The judge panel did not approve the known-good canary (a verified agent's routine token refresh): {detail}");
                tracing::warn!("{what}");
                self.alert(
                    publisher,
                    "ops",
                    Priority::Normal,
                    &what,
                    "Judged commands will all wait for humans: check the judges' endpoints and keys (`command-poller check-config --online`) and their answers (`command-poller judges eval`).",
                )
                .await
            }
        }
    }
}
