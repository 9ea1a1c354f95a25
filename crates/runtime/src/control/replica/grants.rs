//! A scoped grant put in force or withdrawn (enforced from the stored state, announced from its
//! lever once shown): the event with its audit record, and an alert to security saying who may
//! now skip the human approval, how often and until when.

use super::Replica;
use crate::broker::{BrokerError, Publisher};
use crate::outcome::Priority;
use poller_core::control::{Actor, ControlCommand, ControlState};

impl Replica {
    /// Announces a grant this replica enforces from now on (its lever where one operator may
    /// grant, or the second that completed its proposal), or its withdrawal.
    pub(super) async fn grant_changed(
        &self,
        publisher: &Publisher,
        cmd: &ControlCommand,
        actor: &Actor,
        state: &ControlState,
    ) -> Result<(), BrokerError> {
        let (kind, what, todo) = match cmd {
            ControlCommand::Grant {
                request_id: id, ..
            }
            | ControlCommand::Second { proposal: id, .. } => {
                let Some(g) = state.grants.get(id) else {
                    return Ok(());
                };
                let request_id = id;
                (
                    "granted",
                    format!(
                        "Grant {request_id} in force: agent {}'s {} for {} skips the human approval up to {} times until {} (granted by {}): {}",
                        g.agent,
                        g.command_type,
                        g.service,
                        g.uses,
                        crate::clock::rfc3339(g.until),
                        g.approvers().join(", "),
                        g.reason
                    ),
                    format!("The rule judges' vetoes, quarantines, cuts, pauses, halts and trips still apply. Withdraw it with `command-poller ungrant {request_id} --reason \"...\"`."),
                )
            }
            ControlCommand::Ungrant { grant, reason, .. } => (
                "ungranted",
                format!("Grant {grant} withdrawn by {}: {reason}", actor.name()),
                "Its next use is refused: the agent's commands the judges don't approve wait for approvers again.".to_owned(),
            ),
            _ => return Ok(()),
        };
        tracing::warn!(by = %actor.name(), "{what}");
        self.event(
            publisher,
            kind,
            &actor.name(),
            cmd.request_id(),
            Some(what.clone()),
        )
        .await?;
        self.alert(publisher, "security", Priority::Normal, &what, &todo)
            .await
    }
}
