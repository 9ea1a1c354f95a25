//! The sweeper: each replica looks at the open parked commands every `sweep_interval` (and at
//! once when its desk ends a wait), and carries out what [`rules::sweep`] says: notify or
//! remind the webhook, expire what is past its time, finalize what is decided.
//!
//! In: the open records of the shared store. Out: each decided record's one final result,
//! stored under the command's idempotency key and published like any command's (through the
//! worker's [`Settler`](crate::settle::Settler)), then the record closed. Every step is a
//! compare-and-set or happens under the command's idempotency claim, so with many replicas each
//! record is expired once and executed once; a replica that dies mid-way leaves the record
//! decided and open, and the next sweep (anywhere) finishes it: the final result already stored
//! is republished, never executed again.

use super::render::{self, ApprovalEvent};
use crate::broker::names::routing;
use crate::broker::Publisher;
use crate::control::replica::Names;
use crate::outcome::Status;
use crate::pipeline::Disposition;
use crate::settle::{Settled, Shell, Source};
use crate::store::StoredOutcome;
use poller_adapters::webhook::Notifier;
use poller_core::approval::rules::{self, Sweep};
use poller_core::approval::ApprovalSettings;
use poller_core::approval::{Parked, State};
use std::sync::Arc;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub(crate) struct Sweeper {
    pub shell: Arc<Shell>,
    pub settings: ApprovalSettings,
    pub names: Names,
    pub audit_exchange: String,
    pub notifier: Option<Notifier>,
    pub wake: Arc<Notify>,
}

impl Sweeper {
    /// Sweeps until `stop`, on the current session's publisher (none between sessions: no sweep).
    pub(crate) async fn run(self, stop: CancellationToken) {
        let mut every = tokio::time::interval(self.settings.sweep_interval);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = every.tick() => {}
                _ = self.wake.notified() => {}
            }
            let Some(publisher) = self.shell.publishers.borrow().clone() else {
                continue;
            };
            self.sweep(&publisher).await;
        }
    }

    /// One sweep over every open record.
    pub(crate) async fn sweep(&self, publisher: &Publisher) {
        let p = &self.shell.pipeline;
        let records = match p.store().open_records().await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "approvals: the store did not answer; sweeping later");
                return;
            }
        };
        let now = crate::clock::unix_now();
        let mut pending = 0;
        for sealed in records {
            let rec = match Parked::unseal(p.store_key(), &sealed) {
                Ok(r) => r,
                Err(e) => {
                    // Never acted on: it may be planted. A human looks.
                    tracing::error!(error = %e, "approvals: an open record failed its integrity check; left alone");
                    continue;
                }
            };
            if rec.state == State::Pending && now < rec.expires_at {
                pending += 1;
            }
            let remind = self.settings.remind_before.as_secs();
            match rules::sweep(&rec, now, remind, self.notifier.is_some()) {
                Sweep::Nothing => {}
                Sweep::Notify { reminder } => self.notify(&rec, &sealed, reminder, now).await,
                Sweep::Expire => {
                    let next = rules::expire(&rec, now);
                    let sealed_next = next.seal(p.store_key());
                    match p
                        .store()
                        .swap(&rec.approval_id, &sealed, &sealed_next, true)
                        .await
                    {
                        Ok(true) => {
                            self.expired(publisher, &next).await;
                            self.finalize(publisher, next, sealed_next).await;
                        }
                        Ok(false) => {} // decided or expired elsewhere meanwhile
                        Err(e) => tracing::warn!(error = %e, "approvals: could not expire"),
                    }
                }
                Sweep::Finalize => self.finalize(publisher, rec, sealed).await,
            }
        }
        self.shell.settler.state.metrics.approvals_swept(pending);
    }

    async fn notify(&self, rec: &Parked, sealed: &str, reminder: bool, now: u64) {
        let Some(n) = &self.notifier else { return };
        let p = &self.shell.pipeline;
        let mut next = rec.clone();
        if reminder {
            next.reminded = true;
        } else {
            next.notified = true;
        }
        // Marked first (compare-and-set): one replica posts it.
        if let Ok(true) = p
            .store()
            .swap(&rec.approval_id, sealed, &next.seal(p.store_key()), true)
            .await
        {
            n.post(
                render::webhook_notice(rec, reminder, now),
                if reminder { "reminder" } else { "notice" },
            );
        }
    }

    /// The expiry's event and audit record.
    async fn expired(&self, publisher: &Publisher, rec: &Parked) {
        let metrics = &self.shell.settler.state.metrics;
        metrics.approval_decision("expired");
        metrics.approval_decided(rec.expires_at.saturating_sub(rec.parked_at));
        tracing::warn!(approval_id = %rec.approval_id, action_id = %rec.action_id, "approval expired without a decision");
        let e = ApprovalEvent {
            outcome: "expired".into(),
            approval_id: Some(rec.approval_id.clone()),
            action_id: Some(rec.action_id.to_string()),
            agent: Some(rec.agent.id.to_string()),
            by: self.names.poller_user.clone(),
            decision: "expire".into(),
            digest: None,
            reason: format!(
                "no decision before {} ({} of {} approvals)",
                crate::clock::rfc3339(rec.expires_at),
                rec.approvals.len(),
                rec.required
            ),
            refusal: None,
            instance: self.names.instance.clone(),
            at: crate::clock::now_rfc3339(),
        };
        if let Err(err) = publisher.publish(&render::event(&e, &self.names)).await {
            tracing::warn!(error = %err, "approvals: the expiry event was not published");
        }
        let _ = crate::audit::publish_record(
            publisher,
            &self.audit_exchange,
            routing::AUDIT_APPROVAL,
            &self.names.dead_letter_exchange,
            &render::audit(&e, Some(rec), &self.names),
            &self.names.poller_user,
        )
        .await;
    }

    /// Security's alert for an approved record that no NEEDS_APPROVAL result backs.
    async fn unbacked(&self, publisher: &Publisher, rec: &Parked, why: &str) {
        let alert = render::unbacked_alert(rec, why, &self.names);
        if let Err(err) = publisher.publish(&alert).await {
            tracing::error!(error = %err, alert = %String::from_utf8_lossy(&alert.body), "security alert not published; here it is");
        }
    }

    /// Publishes a decided record's one final result (executing an approved command first),
    /// under the command's idempotency claim, then closes the record.
    async fn finalize(&self, publisher: &Publisher, rec: Parked, sealed: String) {
        let span = tracing::info_span!("approval", approval_id = %rec.approval_id, action_id = %rec.action_id, agent = %rec.agent.id);
        self.finalize_in_span(publisher, rec, sealed)
            .instrument(span)
            .await
    }

    async fn finalize_in_span(&self, publisher: &Publisher, rec: Parked, sealed: String) {
        let p = &self.shell.pipeline;
        if rec.state == State::Approved && !p.running() {
            // Held back until the system runs again: no claim taken, no bridge slot asked for,
            // so a paused or halted fleet leaves the command's key free (checked again under
            // the claim, before the bridge call).
            return;
        }
        let claim = match p.hold_claim(&rec.action_key).await {
            Ok(Some(c)) => c,
            Ok(None) => return, // another replica is on it
            Err(e) => {
                tracing::warn!(error = %e, "approvals: could not hold the command's claim");
                return;
            }
        };
        // What the command's key holds now: the NEEDS_APPROVAL result, or the final one stored by
        // an earlier sweep that did not get to publish it or to close the record.
        let stored = match p.store().result(&rec.action_key).await {
            Ok(s) => s.map(|s| StoredOutcome::unseal(p.store_key(), &s)),
            Err(e) => {
                tracing::warn!(error = %e, "approvals: could not read the stored result");
                let _ = claim.release().await;
                return;
            }
        };
        let disposition = match stored {
            Some(Err(e)) => {
                tracing::error!(error = ?e, "approvals: the stored result failed its check; neither executed nor published (a human checks)");
                let _ = claim.release().await;
                return;
            }
            Some(Ok(done)) if done.result.status != Status::NeedsApproval => {
                if done.published {
                    let _ = claim.release().await;
                    self.close(&rec, sealed, done.result.status).await;
                    return;
                }
                let mut result = done.result;
                result.replay = true;
                Disposition::Replay {
                    outcome: p.conclude_parked(&rec, result),
                    claim: Some(claim),
                }
            }
            parked => {
                let parked = parked.and_then(Result::ok);
                let result = match rec.state {
                    State::Approved => match rules::backed(&rec, parked.as_ref()) {
                        Err(why) => {
                            // Not parked by a poller for this command: planted, or the
                            // command's result replaced. Never executed; security hears of it.
                            tracing::error!(why = %why, "approvals: an approved record without its NEEDS_APPROVAL result; not executed");
                            self.unbacked(publisher, &rec, &why).await;
                            p.unbacked(&rec, &why)
                        }
                        Ok(()) => match p.approved(&rec).await {
                            Ok(r) => r,
                            Err(why) => {
                                // Paused or halted: held, executed once the system runs again.
                                tracing::info!(why = %why, "approved command held back");
                                let _ = claim.release().await;
                                return;
                            }
                        },
                    },
                    State::Denied | State::Expired => p.closed(&rec),
                    State::Pending => {
                        let _ = claim.release().await;
                        return;
                    }
                };
                Disposition::Conclude {
                    outcome: p.conclude_parked(&rec, result),
                    claim: Some(claim),
                }
            }
        };
        let status = disposition.result().map(|r| r.status);
        let mut d = disposition;
        let mut claim = d.take_claim();
        let settled = self
            .shell
            .settler
            .settle(&d, &mut claim, Source::Parked, publisher)
            .await;
        match (settled, status) {
            (Settled::Acked, Some(status)) => self.close(&rec, sealed, status).await,
            (other, _) => {
                tracing::warn!(settled = ?other, "approvals: the final result was not published; the next sweep tries again")
            }
        }
    }

    /// Closes the record: finalized with `status`, no longer open. Retried on what is stored
    /// now if a notice flag changed it in between.
    async fn close(&self, rec: &Parked, mut sealed: String, status: Status) {
        let p = &self.shell.pipeline;
        for _ in 0..5 {
            let mut current = match Parked::unseal(p.store_key(), &sealed) {
                Ok(r) => r,
                Err(_) => rec.clone(),
            };
            current.finalized = Some(status);
            match p
                .store()
                .swap(
                    &rec.approval_id,
                    &sealed,
                    &current.seal(p.store_key()),
                    false,
                )
                .await
            {
                Ok(true) => {
                    tracing::info!(status = %status, "approval finalized");
                    return;
                }
                Ok(false) => match p.store().record(&rec.approval_id).await {
                    Ok(Some(now)) => sealed = now,
                    _ => return,
                },
                Err(e) => {
                    tracing::warn!(error = %e, "approvals: could not close the record; the next sweep does");
                    return;
                }
            }
        }
    }
}
