//! The commands consumer: started while RUNNING, cancelled on pause or halt (what it already
//! received still comes through), and a check that it still receives.

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions};
use lapin::types::FieldTable;
use std::time::Duration;

/// The commands consumer, cancelled on pause and started again on resume. After a cancel it
/// keeps yielding what was already delivered (those deliveries are requeued by the pipeline's
/// gate) until the stream ends.
pub(crate) struct CommandConsumer {
    ch: lapin::Channel,
    queue: String,
    instance: String,
    active: Option<(String, lapin::Consumer)>,
    draining: Vec<lapin::Consumer>,
}

impl CommandConsumer {
    pub(crate) fn new(ch: lapin::Channel, queue: String, instance: String) -> Self {
        Self {
            ch,
            queue,
            instance,
            active: None,
            draining: Vec::new(),
        }
    }

    pub(crate) async fn start(&mut self) -> Result<(), lapin::Error> {
        if self.active.is_some() {
            return Ok(());
        }
        let tag = format!("{}-{}", self.instance, uuid::Uuid::new_v4().simple());
        let c = self
            .ch
            .basic_consume(
                self.queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        self.active = Some((tag, c));
        Ok(())
    }

    pub(crate) async fn cancel(&mut self) -> Result<(), lapin::Error> {
        if let Some((tag, c)) = self.active.take() {
            self.ch
                .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
                .await?;
            self.draining.push(c);
        }
        Ok(())
    }

    pub(crate) fn is_active(&self) -> bool {
        self.active.is_some()
    }

    /// The next delivery: first what cancelled consumers still hold, then the active one.
    /// Pending (never ready) when neither has anything, e.g. while paused.
    pub(crate) async fn next(&mut self) -> Option<Result<Delivery, lapin::Error>> {
        loop {
            if let Some(c) = self.draining.first_mut() {
                match c.next().await {
                    Some(d) => return Some(d),
                    None => {
                        self.draining.remove(0);
                        continue;
                    }
                }
            }
            return match &mut self.active {
                Some((_, c)) => c.next().await,
                None => futures::future::pending().await,
            };
        }
    }
}

/// How long setting up a session (channels, topology, the control state, the consumer) may
/// take before the session starts over.
pub(crate) const SETUP_TIMEOUT: Duration = Duration::from_secs(60);

/// How often a quiet, running session checks that its commands consumer still receives.
pub(crate) const STALL_CHECK_EVERY: Duration = Duration::from_secs(5);

/// Why the consumer on `queue` looks dead: commands wait and nobody consumes them (while this
/// session believes it does), or the broker doesn't answer the check. `None` when all is well.
/// A broker can cancel a consumer, or a connection can go quiet, without the consumer stream
/// ending; this catches it instead of waiting forever.
pub(crate) async fn consumer_stalled(ch: &lapin::Channel, queue: &str) -> Option<String> {
    let check = ch.queue_declare(
        queue.into(),
        lapin::options::QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    );
    match tokio::time::timeout(STALL_CHECK_EVERY, check).await {
        Ok(Ok(q)) if q.message_count() > 0 && q.consumer_count() == 0 => Some(format!(
            "{} commands wait in {queue} with no consumer attached",
            q.message_count()
        )),
        Ok(Ok(_)) => None,
        Ok(Err(e)) => Some(format!("the stall check failed: {e}")),
        Err(_) => Some("the broker did not answer the stall check".into()),
    }
}
