//! A service revoked or disconnected at the provider, and reconnected: the cut lever, once the
//! enforced state shows it, carried out through the bridge ([`crate::control::cut`]) on a task
//! of its own (a slow bridge never holds back the next lever or the followed state), then
//! announced by the replica that carried it out: an event, an audit record, a security alert
//! saying what was done to each credential, and the operator's answer with the report.

use super::levers::Pending;
use super::render::ControlEvent;
use super::Replica;
use crate::broker::{BrokerError, Publisher};
use crate::control::cut::{Carried, CutReport};
use crate::outcome::Priority;
use poller_core::control::{Actor, ControlCommand};
use std::sync::Arc;

impl Replica {
    /// Carries out a shown revoke or disconnect on its own task and answers the operator when
    /// the bridge has (the replica that carried it out with the report; the others at once).
    pub(super) fn carry_out_cut(self: &Arc<Self>, p: Pending, publisher: &Publisher) {
        use tracing::Instrument;
        let (this, publisher) = (self.clone(), publisher.clone());
        let task = async move {
            if let Err(e) = this.cut_and_answer(&p, &publisher).await {
                tracing::warn!(error = %e, "a cut's announcement or answer was not published");
            }
        };
        tokio::spawn(task.instrument(tracing::Span::current()));
    }

    async fn cut_and_answer(&self, p: &Pending, publisher: &Publisher) -> Result<(), BrokerError> {
        let Some((cut, service)) = p.cmd.cut() else {
            return Ok(());
        };
        let request_id = p.cmd.request_id();
        let carried = self
            .cutter
            .carry_out(cut, service, request_id, &p.actor.name())
            .await;
        let mut reply = self.reply(request_id, true, None);
        match carried {
            Carried::Here(report) => {
                self.cut_carried(publisher, &p.cmd, &p.actor, &report)
                    .await?;
                reply.cut = Some(report);
            }
            Carried::Stored(report) => reply.cut = Some(report),
            Carried::Elsewhere(owner) => {
                tracing::info!(owner = %owner, "the cut is carried out by another replica");
            }
        }
        self.answer(publisher, p.reply_to.as_deref(), reply).await
    }

    /// Announces a cut this replica carried out: event, audit record, security alert.
    async fn cut_carried(
        &self,
        publisher: &Publisher,
        cmd: &ControlCommand,
        actor: &Actor,
        report: &CutReport,
    ) -> Result<(), BrokerError> {
        let (what, todo) = cut_alert(cmd, actor, report, &self.names.instance);
        tracing::warn!(service = %report.service, error = ?report.error, "{what}");
        let (kind, reason) = match cmd {
            ControlCommand::Revoke { reason, .. } => ("revoked", reason),
            ControlCommand::Disconnect { reason, .. } => ("disconnected", reason),
            _ => return Ok(()),
        };
        let e = ControlEvent {
            kind: kind.to_owned(),
            instance: self.names.instance.clone(),
            actor: actor.name(),
            request_id: cmd.request_id().to_owned(),
            state: self.gate.state(),
            detail: Some(format!(
                "service {}: {reason}; {}",
                report.service,
                serde_json::to_string(report).expect("a report serializes")
            )),
            at: crate::clock::now_rfc3339(),
        };
        let (msg, record) = super::render::event(&e, &self.names);
        publisher.publish(&msg).await?;
        self.audit(publisher, &record).await?;
        self.alert(publisher, "security", Priority::High, &what, &todo)
            .await
    }

    /// Announces a service recorded reconnected (every replica that applies it, as a release).
    pub(super) async fn reconnected(
        &self,
        publisher: &Publisher,
        cmd: &ControlCommand,
        actor: &Actor,
    ) -> Result<(), BrokerError> {
        let ControlCommand::Reconnected {
            service, reason, ..
        } = cmd
        else {
            return Ok(());
        };
        tracing::warn!(service = %service, by = %actor.name(), reason = %reason, "reconnected");
        self.event(
            publisher,
            "reconnected",
            &actor.name(),
            cmd.request_id(),
            Some(format!("service {service}: {reason}")),
        )
        .await?;
        let what = format!(
            "Service {service} recorded reconnected by {} on replica {}: {reason}",
            actor.name(),
            self.names.instance
        );
        self.alert(publisher, "security", Priority::Normal, &what, "Its REFRESH_TOKEN commands are decided again as before the cut. Check that the reconnection followed SOP-INT-03's manual security and permissions review.").await
    }
}

/// The alert's sentence and what the security team does next, per credential.
fn cut_alert(
    cmd: &ControlCommand,
    actor: &Actor,
    report: &CutReport,
    instance: &str,
) -> (String, String) {
    let verb = match cmd {
        ControlCommand::Disconnect { .. } => "disconnected",
        _ => "revoked",
    };
    let service = &report.service;
    let head = format!(
        "Service {service} {verb} by {} (request {}), carried out by replica {instance}",
        actor.name(),
        cmd.request_id()
    );
    let refused = format!("REFRESH_TOKEN for {service} is refused on every replica until it is reconnected by hand (SOP-INT-03) and recorded with `command-poller reconnected {service}`.");
    match &report.error {
        Some(e) => (
            format!("{head}: the bridge call failed ({e})"),
            format!("Nothing is known to be revoked at the provider: revoke the credentials by hand in {service}'s admin panel now, or run the lever again. {refused}"),
        ),
        None if report.complete_at_provider() => (
            format!("{head}: {}", report.credentials().join("; ")),
            format!("Every credential was revoked at the provider. Investigate the agent's decision logs (E01 step 3) and escalate for a full audit (step 4). {refused}"),
        ),
        None => (
            format!("{head}: {}", report.credentials().join("; ")),
            format!("Revoke by hand where a credential says so (the provider offers no revocation the bridge can call). {refused}"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bridge::Operation;

    fn report(answer: Option<serde_json::Value>, error: Option<&str>) -> CutReport {
        CutReport {
            carried_out_by: "r1".into(),
            operation: Operation::RevokeCredentials,
            service: "mailchimp".into(),
            answer,
            error: error.map(str::to_owned),
            at: "t".into(),
        }
    }

    #[test]
    fn the_alert_says_what_is_left_to_do_by_hand() {
        let cmd = ControlCommand::Revoke {
            service: "mailchimp".into(),
            reason: "E01".into(),
            request_id: "v1".into(),
        };
        let ops = Actor::Operator("ops".into());
        let by_hand = report(
            Some(
                serde_json::json!({"credentials": [{"credential": "MAILCHIMP_API_KEY", "outcome": "deleted locally, revoke by hand at https://admin.mailchimp.com/account/api/"}]}),
            ),
            None,
        );
        let (what, todo) = cut_alert(&cmd, &ops, &by_hand, "r1");
        assert!(what.contains("revoked by ops"), "{what}");
        assert!(what.contains("MAILCHIMP_API_KEY: deleted locally, revoke by hand at https://admin.mailchimp.com/account/api/"), "{what}");
        assert!(todo.starts_with("Revoke by hand"), "{todo}");
        assert!(
            todo.contains("command-poller reconnected mailchimp"),
            "{todo}"
        );
        let (what, todo) = cut_alert(&cmd, &ops, &report(None, Some("bridge error: down")), "r1");
        assert!(
            what.contains("the bridge call failed (bridge error: down)"),
            "{what}"
        );
        assert!(
            todo.contains("by hand in mailchimp's admin panel"),
            "{todo}"
        );
    }
}
