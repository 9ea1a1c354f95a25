//! Settlement of one delivery (the worker's, and the approval sweeper's): run it through the
//! pipeline, then carry the [`Disposition`] out in one `match`: requeue a deferred command (its claim released), or store the result under
//! the claim, publish everything with confirms, mark it published, and only then ack.
//!
//! In: a delivery and the session's publisher. Out: messages on the broker, the store updated,
//! the delivery acked or requeued. A publish that fails on the connection is retried on the
//! next session; one the broker refuses requeues the command after a pause (the queue's
//! delivery limit dead-letters it if it never succeeds). [`Settler::settle`] is the part
//! between the disposition and the ack, behind the [`Publish`] and [`Acker`] boundaries, so
//! it is unit-tested with recording doubles.

pub mod publish;
pub mod render;
pub mod state;

use crate::bridge::signing::Secret;
use crate::broker::{BrokerError, Publish, Publisher};
use crate::pipeline::{Concluded, DeadLetterBody, Disposition, Inbound, Pipeline, Publication};
use crate::store::{ClaimGuard, StoredOutcome};
use futures::future::BoxFuture;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use poller_core::audit::AuditOutcome;
use poller_core::control::trip::{self, TripRule};
use render::{Names, Rendered};
use state::{InFlight, PollerState};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// What settling needs, shared by every delivery of a poller.
pub(crate) struct Shell {
    pub pipeline: Arc<Pipeline>,
    pub settler: Settler,
    /// The current session's publisher (None between sessions): a command whose session was
    /// lost while it was in flight publishes its outcome on the next one.
    pub publishers: Arc<watch::Sender<Option<Publisher>>>,
}

/// Carries dispositions out.
pub struct Settler {
    pub state: Arc<PollerState>,
    pub names: Names,
    /// The trip rules: only attempts of watched types are shared with replicas.
    pub trips: Vec<TripRule>,
    /// Pause before requeueing a command whose outcome could not be stored or published.
    pub publish_failure_pause: Duration,
    /// Seals stored outcomes.
    pub store_key: Secret,
}

/// What is settled: a delivery off the commands queue (acked or requeued once settled), or a
/// parked command's final result the approvals sweeper concluded (no delivery: nothing to ack
/// or requeue; an unfinished one stays open and the next sweep finishes it).
#[derive(Clone, Copy)]
pub enum Source<'a> {
    Delivery {
        inbound: &'a Inbound,
        acker: &'a dyn Acker,
    },
    Parked,
}

impl Source<'_> {
    /// Acks the delivery, if there is one; false when its channel is gone.
    async fn ack(&self) -> bool {
        match self {
            Source::Delivery { acker, .. } => acker.ack().await,
            Source::Parked => true,
        }
    }

    /// Sends the delivery back to its queue, if there is one; false when its channel is gone.
    async fn requeue(&self) -> bool {
        match self {
            Source::Delivery { acker, .. } => acker.requeue().await,
            Source::Parked => true,
        }
    }

    /// The message that was delivered, if any.
    fn inbound(&self) -> Option<&Inbound> {
        match self {
            Source::Delivery { inbound, .. } => Some(inbound),
            Source::Parked => None,
        }
    }
}

/// The boundary to the delivery being settled: lapin's acker, or a test double.
pub trait Acker: Send + Sync {
    /// Acks it; false when the channel is gone (the broker redelivers it).
    fn ack(&self) -> BoxFuture<'_, bool>;
    /// Sends it back to the queue (costing one of its deliveries); false when the channel is
    /// gone (the broker requeues it on close).
    fn requeue(&self) -> BoxFuture<'_, bool>;
}

impl Acker for lapin::Acker {
    fn ack(&self) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            match lapin::Acker::ack(self, BasicAckOptions::default()).await {
                Ok(true) => true,
                Ok(false) => {
                    tracing::warn!("ack not sent (channel gone); expect a redelivery");
                    false
                }
                Err(e) => {
                    tracing::warn!(error = %e, "ack failed; expect a redelivery");
                    false
                }
            }
        })
    }

    fn requeue(&self) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            let requeue = BasicNackOptions {
                requeue: true,
                ..Default::default()
            };
            matches!(self.nack(requeue).await, Ok(true))
        })
    }
}

/// How a delivery was settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// Back to the queue unprocessed (its claim released).
    Deferred,
    /// Everything published and confirmed, then acked.
    Acked,
    /// Not stored, or refused by the broker: requeued after a pause, never acked (the queue's
    /// delivery limit dead-letters it if this keeps happening).
    Requeued,
    /// The channel is gone: requeueing could not be sent (the broker requeues it on close).
    ChannelGone,
    /// The connection failed while publishing: neither acked nor requeued (the broker requeues
    /// it); the outcome is to be published on the next session.
    ConnectionLost,
}

impl Settler {
    /// Carries `d` out (its claim taken out into `claim`): one `match` on the disposition.
    pub async fn settle(
        &self,
        d: &Disposition,
        claim: &mut Option<ClaimGuard>,
        source: Source<'_>,
        publisher: &dyn Publish,
    ) -> Settled {
        let outcome = match d {
            Disposition::Defer { .. } => {
                self.state.metrics.observe(d);
                if let Some(c) = claim.take() {
                    if let Err(e) = c.release().await {
                        tracing::warn!(error = %e, "could not release the idempotency claim; it expires on its own");
                    }
                }
                // Paused or halted before judges or bridge: back to the queue, unprocessed.
                if !source.requeue().await {
                    tracing::warn!(
                        "requeue not sent (channel gone); the broker requeues it on close"
                    );
                }
                return Settled::Deferred;
            }
            Disposition::DeadLetter { .. } | Disposition::Answer { .. } => None,
            Disposition::Conclude { outcome, .. } => {
                // Stored (unpublished) before it is published: a crash in between publishes
                // the stored outcome instead of redoing the action.
                if let Some(c) = claim.as_ref() {
                    if let Err(e) = c.store(&stored(outcome, false), &self.store_key).await {
                        // Unpublished and unstored: requeue it (the claim is released).
                        tracing::error!(error = %e, "could not store the result; not publishing it, requeueing");
                        self.state.metrics.publish_failed();
                        if let Some(c) = claim.take() {
                            let _ = c.release().await;
                        }
                        return self.requeue_after_pause(source).await;
                    }
                }
                Some(outcome)
            }
            Disposition::Replay { outcome, .. } => Some(outcome),
        };
        let publication = d.publication().expect("only a deferral publishes nothing");
        let rendered = render::command(publication, source.inbound(), &self.names);
        match publish::rendered(publisher, &rendered, &self.names).await {
            Ok(audited) => {
                if audited != AuditOutcome::Delivered {
                    self.state.metrics.audit_diverted();
                }
                self.mark_published(claim.take(), outcome).await;
                self.state.processed.fetch_add(1, Ordering::SeqCst);
                self.state.metrics.observe(d);
                if let Some(r) = d.result() {
                    self.state
                        .record(r.action_id.as_ref().map(|a| a.as_str()), r.status);
                }
                if let Disposition::Conclude { outcome, .. } = d {
                    self.report_unapproved(publisher, outcome).await;
                }
                source.ack().await;
                Settled::Acked
            }
            Err(e) => {
                self.state.metrics.publish_failed();
                tracing::error!(error = %e, "could not publish the outcome; the command is not acked");
                if e.is_connection() {
                    return Settled::ConnectionLost;
                }
                // Message-level refusal (unroutable, nacked): retry later.
                self.requeue_after_pause(source).await
            }
        }
    }

    /// Requeues after the pause (each requeue costs one of the queue's delivery limit, so
    /// never in a tight loop).
    async fn requeue_after_pause(&self, source: Source<'_>) -> Settled {
        tokio::time::sleep(self.publish_failure_pause).await;
        if source.requeue().await {
            Settled::Requeued
        } else {
            Settled::ChannelGone
        }
    }

    /// Marks the outcome published and ends the claim. Failing is harmless: a later duplicate
    /// publishes it again, alerts included.
    async fn mark_published(&self, claim: Option<ClaimGuard>, outcome: Option<&Concluded>) {
        let (Some(claim), Some(outcome)) = (claim, outcome) else {
            return;
        };
        if let Err(e) = claim
            .complete(&stored(outcome, true), &self.store_key)
            .await
        {
            tracing::warn!(error = %e, "could not mark the result published");
        }
    }

    /// Shares an unapproved attempt of a watched type with every replica, so the trip counts
    /// attempts across all of them.
    async fn report_unapproved(&self, publisher: &dyn Publish, outcome: &Concluded) {
        let Some(a) = &outcome.unapproved else {
            return;
        };
        if !trip::watched(&self.trips, a.command_type) {
            return;
        }
        if let Err(e) = publisher
            .publish(&render::unapproved_attempt(a, &self.names))
            .await
        {
            tracing::warn!(error = %e, "could not report the unapproved attempt to the trip");
        }
    }

    /// The disposition rendered again with its result marked as a replay, and published (on
    /// the next session, after a lost one); then marked published.
    async fn republish(
        &self,
        publisher: &dyn Publish,
        d: &Disposition,
        claim: Option<ClaimGuard>,
        inbound: Option<&Inbound>,
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
            &self.names,
        );
        let published = publish::rendered(publisher, &again, &self.names).await?;
        let outcome = match d {
            Disposition::Conclude { outcome, .. } | Disposition::Replay { outcome, .. } => {
                Some(outcome)
            }
            Disposition::Defer { .. }
            | Disposition::DeadLetter { .. }
            | Disposition::Answer { .. } => None,
        };
        self.mark_published(claim, outcome).await;
        Ok(published)
    }
}

/// Processes and settles one delivery.
pub(crate) async fn delivery(
    shell: Arc<Shell>,
    mut delivery: Delivery,
    publisher: Publisher,
    broken: CancellationToken,
) {
    let settler = &shell.settler;
    let _in_flight = InFlight::enter(&settler.state.in_flight);
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
        message_type: props.kind().as_ref().map(|k| k.to_string()),
    };
    let mut disposition = shell.pipeline.process(&inbound).await;
    if let Disposition::DeadLetter { letter, .. } = &disposition {
        if matches!(letter.body, DeadLetterBody::Withheld { .. }) {
            // An oversized body is released at once; only its digest goes on.
            inbound.payload = Vec::new();
        }
    }
    let mut claim = disposition.take_claim();
    let settled = settler
        .settle(
            &disposition,
            &mut claim,
            Source::Delivery {
                inbound: &inbound,
                acker: &delivery.acker,
            },
            &publisher,
        )
        .await;
    match settled {
        Settled::Deferred | Settled::Acked | Settled::Requeued => {}
        Settled::ChannelGone => broken.cancel(),
        Settled::ConnectionLost => {
            broken.cancel();
            // The broker requeues this delivery, but its copy may wait on our claim until it is
            // dead-lettered: publish the outcome on the next session's channel, marked as a
            // replay (part of it may have gone out).
            let Some(next) = publish::next_publisher(&mut next_publisher).await else {
                tracing::error!("no new broker session to publish the outcome on; a redelivered copy publishes it from the store");
                return;
            };
            match settler
                .republish(&next, &disposition, claim.take(), Some(&inbound))
                .await
            {
                Ok(_) => tracing::info!("outcome published on the new session"),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intake::ReplyTarget;
    use crate::outcome::ResultMessage;
    use crate::pipeline::{DeadLetter, DeadLetterBody};
    use crate::store::{EmbeddedStore, ResultStore, Taken};
    use crate::testing::{Log, RecordingAcker, RecordingPublisher, Refuse};

    const KEY: &str = "agent-7/a-1";

    struct Fixture {
        settler: Settler,
        store: Arc<dyn ResultStore>,
        path: std::path::PathBuf,
        log: Log,
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    fn fixture() -> Fixture {
        let path =
            std::env::temp_dir().join(format!("settle-{}.redb", uuid::Uuid::new_v4().simple()));
        let store: Arc<dyn ResultStore> = Arc::new(EmbeddedStore::open(&path, "t").unwrap());
        Fixture {
            settler: Settler {
                state: Arc::new(PollerState::default()),
                names: Names {
                    results_exchange: "results".into(),
                    alerts_exchange: "alerts".into(),
                    dead_letter_exchange: "dlx".into(),
                    audit_exchange: "audit".into(),
                    control_exchange: "control".into(),
                    instance: "poller-1".into(),
                    poller_user: "command-poller".into(),
                },
                trips: Vec::new(),
                publish_failure_pause: Duration::ZERO,
                store_key: Secret::new("test-key"),
            },
            store,
            path,
            log: Arc::default(),
        }
    }

    impl Fixture {
        /// Records each publish with whether the outcome was in the store when it went out.
        fn publisher(&self, refuse: Vec<(&'static str, Refuse)>) -> RecordingPublisher {
            let store = self.store.clone();
            let mut p = RecordingPublisher::new(self.log.clone());
            p.note = Some(Box::new(move || {
                let store = store.clone();
                Box::pin(async move {
                    let stored = matches!(
                        store
                            .claim(KEY, "probe", Duration::from_secs(1))
                            .await
                            .unwrap(),
                        crate::store::Claim::Done(_)
                    );
                    format!("stored={stored}")
                })
            }));
            for (k, how) in refuse {
                p = p.refusing(k, how);
            }
            p
        }

        async fn claim(&self) -> ClaimGuard {
            let claims = crate::store::Claims {
                store: self.store.clone(),
                instance: "poller-1".into(),
                ttl: Duration::from_secs(30),
                retention: Duration::from_secs(60),
                keeper: crate::store::Keeper::default(),
            };
            let taken = claims.take(KEY.into(), Duration::ZERO).await.unwrap();
            match taken {
                Taken::Mine(g) => g,
                _ => panic!("the key is free"),
            }
        }

        /// The stored outcome, if any: (published, status).
        async fn stored(&self) -> Option<bool> {
            match self
                .store
                .claim(KEY, "probe-2", Duration::from_secs(1))
                .await
                .unwrap()
            {
                crate::store::Claim::Done(v) => Some(
                    StoredOutcome::unseal(&self.settler.store_key, &v)
                        .unwrap()
                        .published,
                ),
                _ => None,
            }
        }

        fn log(&self) -> Vec<String> {
            self.log.lock().unwrap().clone()
        }

        /// Settles `d` with the recording doubles, refusing the routing keys in `refuse`.
        async fn settle(
            &self,
            d: &Disposition,
            claim: &mut Option<ClaimGuard>,
            inbound: &Inbound,
            refuse: Vec<(&'static str, Refuse)>,
        ) -> Settled {
            let acker = RecordingAcker(self.log.clone());
            let source = Source::Delivery {
                inbound,
                acker: &acker,
            };
            self.settler
                .settle(d, claim, source, &self.publisher(refuse))
                .await
        }
    }

    fn conclude() -> Disposition {
        Disposition::Conclude {
            outcome: concluded(),
            claim: None,
        }
    }

    fn concluded() -> Concluded {
        let result: ResultMessage = serde_json::from_value(serde_json::json!({
            "action_id": "a-1", "command_type": "CHECK_INTEGRATION_STATUS", "service": "google",
            "agent": {"id": "agent-7", "verified": true}, "status": "SUCCESS", "rationale": "ok",
            "received_at": "t", "completed_at": "t", "poller_instance": "poller-1"
        }))
        .unwrap();
        Concluded {
            result,
            reply: ReplyTarget::None,
            alerts: Vec::new(),
            audit: Vec::new(),
            unapproved: None,
            command_digest: Some("digest".into()),
        }
    }

    #[tokio::test]
    async fn stored_first_then_every_confirm_then_the_ack() {
        let f = fixture();
        let mut claim = Some(f.claim().await);
        let d = conclude();
        let settled = f.settle(&d, &mut claim, &Inbound::default(), vec![]).await;
        assert_eq!(settled, Settled::Acked);
        assert_eq!(
            f.log(),
            [
                "publish result.success stored=true",
                "publish audit.command stored=true",
                "ack"
            ]
        );
        assert_eq!(f.stored().await, Some(true), "marked published after");
        assert!(claim.is_none(), "the claim ended with the outcome");
    }

    /// A parked command's final result (the approvals sweeper's) settles the same way, with no
    /// delivery to ack or requeue.
    #[tokio::test]
    async fn a_parked_commands_result_is_stored_then_published_with_nothing_to_ack() {
        let f = fixture();
        let mut claim = Some(f.claim().await);
        let d = conclude();
        let settled = f
            .settler
            .settle(&d, &mut claim, Source::Parked, &f.publisher(vec![]))
            .await;
        assert_eq!(settled, Settled::Acked);
        assert_eq!(
            f.log(),
            [
                "publish result.success stored=true",
                "publish audit.command stored=true",
            ],
            "published, and no ack or requeue of a delivery that does not exist"
        );
        assert_eq!(f.stored().await, Some(true), "marked published after");
        assert!(claim.is_none(), "the claim ended with the outcome");
    }

    #[tokio::test]
    async fn a_refused_publish_requeues_after_the_pause_and_never_acks() {
        let f = fixture();
        let mut claim = Some(f.claim().await);
        let d = conclude();
        let settled = f
            .settle(
                &d,
                &mut claim,
                &Inbound::default(),
                vec![("result.success", Refuse::Unroutable)],
            )
            .await;
        assert_eq!(settled, Settled::Requeued);
        // Sent with the result (its confirm awaited after), the audit record went out.
        assert_eq!(
            f.log(),
            [
                "refused result.success",
                "publish audit.command stored=true",
                "requeue"
            ]
        );
        // Stored, not marked published: the redelivered copy publishes it, never redoes it.
        assert_eq!(f.stored().await, Some(false));
        let metrics = f
            .settler
            .state
            .metrics
            .render(0, poller_core::control::Mode::Running);
        assert!(
            metrics.contains("command_poller_publish_failures_total 1"),
            "{metrics}"
        );
    }

    #[tokio::test]
    async fn a_lost_connection_neither_acks_nor_requeues_and_keeps_the_claim() {
        let f = fixture();
        let mut claim = Some(f.claim().await);
        let d = conclude();
        let settled = f
            .settle(
                &d,
                &mut claim,
                &Inbound::default(),
                vec![("audit.command", Refuse::ConnectionLost)],
            )
            .await;
        assert_eq!(settled, Settled::ConnectionLost);
        assert_eq!(
            f.log(),
            [
                "publish result.success stored=true",
                "refused audit.command"
            ]
        );
        assert!(claim.is_some(), "kept for publishing on the next session");
        // Published on the next session, marked as a replay, then marked published.
        let next = f.publisher(vec![]);
        f.settler
            .republish(&next, &d, claim.take(), Some(&Inbound::default()))
            .await
            .unwrap();
        assert_eq!(f.stored().await, Some(true));
    }

    #[tokio::test]
    async fn a_deferred_command_goes_back_and_its_claim_is_released() {
        let f = fixture();
        let mut claim = Some(f.claim().await);
        let d = Disposition::Defer {
            why: "paused".into(),
            claim: None,
            audit: Vec::new(),
        };
        let settled = f.settle(&d, &mut claim, &Inbound::default(), vec![]).await;
        assert_eq!(settled, Settled::Deferred);
        assert_eq!(f.log(), ["requeue"], "nothing published");
        assert_eq!(
            f.store
                .claim(KEY, "someone-else", Duration::from_secs(5))
                .await
                .unwrap(),
            crate::store::Claim::Mine,
            "released"
        );
    }

    #[tokio::test]
    async fn a_dead_letter_is_published_before_the_ack() {
        let f = fixture();
        let d = Disposition::DeadLetter {
            letter: DeadLetter {
                field: "payload".into(),
                reason: "not JSON".into(),
                body: DeadLetterBody::Original,
            },
            result: None,
            reply: ReplyTarget::None,
            alerts: Vec::new(),
            audit: Vec::new(),
        };
        let inbound = Inbound {
            routing_key: "command.x".into(),
            ..Default::default()
        };
        let settled = f.settle(&d, &mut None, &inbound, vec![]).await;
        assert_eq!(settled, Settled::Acked);
        assert_eq!(
            f.log(),
            [
                "publish command.x stored=false",
                "publish audit.command stored=false",
                "ack"
            ]
        );
    }
}
