//! Settlement of one delivery: run it through the pipeline, then carry the [`Disposition`] out
//! in one `match`: requeue a deferred command (its claim released), or store the result under
//! the claim, publish everything with confirms, mark it published, and only then ack.
//!
//! In: a delivery and the session's publisher. Out: messages on the broker, the store updated,
//! the delivery acked or requeued. A publish that fails on the connection is retried on the
//! next session; one the broker refuses requeues the command after a pause (the queue's
//! delivery limit dead-letters it if it never succeeds).

use super::publish;
use super::render::{self, Names, Rendered};
use super::state::{InFlight, PollerState};
use crate::audit::AuditOutcome;
use crate::broker::{BrokerError, Publisher};
use crate::control::trip::{self, TripRule};
use crate::idempotency::{ClaimGuard, StoredOutcome};
use crate::pipeline::{Concluded, DeadLetterBody, Disposition, Inbound, Pipeline, Publication};
use lapin::message::Delivery;
use lapin::options::BasicAckOptions;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// What settling needs, shared by every delivery of a poller.
pub(crate) struct Shell {
    pub pipeline: Arc<Pipeline>,
    pub state: Arc<PollerState>,
    pub names: Names,
    /// The trip rules: only attempts of watched types are shared with replicas.
    pub trips: Vec<TripRule>,
    /// Pause before requeueing a command whose outcome could not be stored or published.
    pub publish_failure_pause: Duration,
    /// The current session's publisher (None between sessions): a command whose session was
    /// lost while it was in flight publishes its outcome on the next one.
    pub publishers: Arc<watch::Sender<Option<Publisher>>>,
}

/// Processes and settles one delivery.
pub(crate) async fn delivery(
    shell: Arc<Shell>,
    mut delivery: Delivery,
    publisher: Publisher,
    broken: CancellationToken,
) {
    let state = &shell.state;
    let _in_flight = InFlight::enter(&state.in_flight);
    let mut next_publisher = shell.publishers.subscribe();
    let props = &delivery.properties;
    let mut inbound = Inbound {
        // Moved, not copied: the delivery's body is held once.
        payload: std::mem::take(&mut delivery.data),
        user_id: props.user_id().as_ref().map(|u| u.to_string()),
        reply_to: props.reply_to().as_ref().map(|u| u.to_string()),
        content_type: props.content_type().as_ref().map(|u| u.to_string()),
        routing_key: delivery.routing_key.to_string(),
        redelivered: delivery.redelivered,
    };
    let mut disposition = shell.pipeline.process(&inbound).await;
    let claim = disposition.take_claim();
    let outcome = match &disposition {
        Disposition::Defer { .. } => {
            state.metrics.observe(&disposition);
            if let Some(c) = claim {
                if let Err(e) = c.release().await {
                    tracing::warn!(error = %e, "could not release the idempotency claim; it expires on its own");
                }
            }
            // Paused or halted before judges or bridge: back to the queue, unprocessed.
            if !publish::requeue(&delivery).await {
                tracing::warn!("requeue not sent (channel gone); the broker requeues it on close");
            }
            return;
        }
        Disposition::DeadLetter { letter, .. } => {
            if matches!(letter.body, DeadLetterBody::Withheld { .. }) {
                // An oversized body is released at once; only its digest goes on.
                inbound.payload = Vec::new();
            }
            None
        }
        Disposition::Conclude { outcome, .. } => {
            // Stored (unpublished) before it is published: a crash in between publishes the
            // stored outcome instead of redoing the action.
            if let Some(c) = &claim {
                if let Err(e) = c
                    .store(&stored(outcome, false), &shell.pipeline.store_key)
                    .await
                {
                    // Unpublished and unstored: requeue it (the claim is released as it drops).
                    tracing::error!(error = %e, "could not store the result; not publishing it, requeueing");
                    state.metrics.publish_failed();
                    drop(claim);
                    publish::requeue_after_pause(&delivery, shell.publish_failure_pause, &broken)
                        .await;
                    return;
                }
            }
            Some(outcome)
        }
        Disposition::Replay { outcome, .. } => Some(outcome),
    };
    let publication = disposition
        .publication()
        .expect("only a deferral publishes nothing");
    let rendered = render::command(publication, &inbound, &shell.names);
    match publish::rendered(&publisher, &rendered, &shell.names).await {
        Ok(audited) => {
            if audited != AuditOutcome::Delivered {
                state.metrics.audit_diverted();
            }
            mark_published(claim, outcome, &shell).await;
            state.processed.fetch_add(1, Ordering::SeqCst);
            state.metrics.observe(&disposition);
            if let Some(r) = disposition.result() {
                state.record(r.action_id.as_ref().map(|a| a.as_str()), r.status);
            }
            if let Disposition::Conclude { outcome, .. } = &disposition {
                report_unapproved(&publisher, outcome, &shell).await;
            }
            match delivery.acker.ack(BasicAckOptions::default()).await {
                Ok(true) => {}
                Ok(false) => tracing::warn!("ack not sent (channel gone); expect a redelivery"),
                Err(e) => tracing::warn!(error = %e, "ack failed; expect a redelivery"),
            }
        }
        Err(e) => {
            state.metrics.publish_failed();
            tracing::error!(error = %e, "could not publish the outcome; the command is not acked");
            if !e.is_connection() {
                // Message-level refusal (unroutable, nacked): retry later; the queue's
                // delivery limit dead-letters it if it never succeeds.
                publish::requeue_after_pause(&delivery, shell.publish_failure_pause, &broken).await;
                return;
            }
            broken.cancel();
            // The broker requeues this delivery, but its copy may wait on our claim until it is
            // dead-lettered: publish the outcome on the next session's channel, marked as a
            // replay (part of it may have gone out).
            let Some(next) = publish::next_publisher(&mut next_publisher).await else {
                tracing::error!("no new broker session to publish the outcome on; a redelivered copy publishes it from the store");
                return;
            };
            match republish(&next, &disposition, &inbound, &shell.names).await {
                Ok(_) => {
                    tracing::info!("outcome published on the new session");
                    mark_published(claim, outcome, &shell).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not publish on the new session either; a redelivered copy publishes it from the store")
                }
            }
        }
    }
}

/// The stored form of a concluded outcome.
fn stored(outcome: &Concluded, published: bool) -> StoredOutcome {
    let mut result = outcome.result.clone();
    // A replay is marked when it is published, not in the store.
    result.replay = false;
    StoredOutcome {
        published,
        result,
        command_digest: outcome.command_digest.clone(),
    }
}

/// Marks the outcome published and ends the claim. Failing is harmless: a later duplicate
/// publishes it again, alerts included.
async fn mark_published(claim: Option<ClaimGuard>, outcome: Option<&Concluded>, shell: &Shell) {
    let (Some(claim), Some(outcome)) = (claim, outcome) else {
        return;
    };
    if let Err(e) = claim
        .complete(&stored(outcome, true), &shell.pipeline.store_key)
        .await
    {
        tracing::warn!(error = %e, "could not mark the result published");
    }
}

/// The disposition rendered again with its result marked as a replay, and published.
async fn republish(
    publisher: &Publisher,
    d: &Disposition,
    inbound: &Inbound,
    names: &Names,
) -> Result<AuditOutcome, BrokerError> {
    let p = d.publication().expect("only a deferral publishes nothing");
    let mut result = p.result.cloned();
    if let Some(r) = result.as_mut() {
        r.replay = true;
    }
    let again: Rendered = render::command(
        Publication {
            result: result.as_ref(),
            ..p
        },
        inbound,
        names,
    );
    publish::rendered(publisher, &again, names).await
}

/// Shares an unapproved attempt of a watched type with every replica, so the trip counts
/// attempts across all of them.
async fn report_unapproved(publisher: &Publisher, outcome: &Concluded, shell: &Shell) {
    let Some(a) = &outcome.unapproved else {
        return;
    };
    if !trip::watched(&shell.trips, a.command_type) {
        return;
    }
    if let Err(e) = publisher
        .publish(&render::unapproved_attempt(a, &shell.names))
        .await
    {
        tracing::warn!(error = %e, "could not report the unapproved attempt to the trip");
    }
}
