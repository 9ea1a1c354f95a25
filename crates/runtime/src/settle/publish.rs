//! Publishing what [`super::render`] built, each message confirmed, through the
//! [`Publish`] boundary; and the next session's publisher for an outcome whose session was lost.

use super::render::{Names, Part, Rendered};
use crate::audit;
use crate::broker::names::routing;
use crate::broker::{with_nack_retries, BrokerError, Publish, Publisher, NACK_RETRY_BUDGET};
use poller_core::audit::AuditOutcome;
use std::time::Duration;

/// Publishes `rendered` in order, each confirmed, then its audit record. A reply that can't be
/// delivered is logged, not fatal; anything else that fails stops here (nothing after it goes
/// out, and the command is not acked).
pub async fn rendered(
    publisher: &dyn Publish,
    rendered: &Rendered,
    names: &Names,
) -> Result<AuditOutcome, BrokerError> {
    messages(publisher, rendered).await?;
    // After the result and alerts: an audit exchange that refuses the record can't hold them
    // back (the record is retried, then dead-lettered on its own).
    audit::publish_record(
        publisher,
        &names.audit_exchange,
        routing::AUDIT_COMMAND,
        &names.dead_letter_exchange,
        &rendered.audit,
        &names.poller_user,
    )
    .await
}

/// The messages of `rendered` (not its audit record), in order. A result or alert the broker
/// nacks is published again ([`with_nack_retries`], for [`NACK_RETRY_BUDGET`]) before this
/// gives up.
pub async fn messages(publisher: &dyn Publish, rendered: &Rendered) -> Result<(), BrokerError> {
    messages_within(publisher, rendered, NACK_RETRY_BUDGET).await
}

async fn messages_within(
    publisher: &dyn Publish,
    rendered: &Rendered,
    nack_budget: Duration,
) -> Result<(), BrokerError> {
    for m in &rendered.messages {
        let sent = match m.part {
            // A reply the agent's queue refuses is not worth holding the command for.
            Part::Reply => publisher.publish(&m.outgoing).await,
            _ => with_nack_retries(publisher, &m.outgoing, nack_budget).await,
        };
        match (m.part, sent) {
            (_, Ok(())) => {}
            (Part::Reply, Err(e)) if !e.is_connection() => {
                let kind = if m.outgoing.best_effort {
                    "direct reply-to"
                } else {
                    "agent reply queue"
                };
                tracing::warn!(error = %e, kind, "reply not delivered; the result is on the results exchange");
            }
            (_, Err(e)) => return Err(e),
        }
    }
    Ok(())
}

/// How long a command whose session was lost waits for the next one to publish on.
pub(crate) const REPUBLISH_WAIT: Duration = Duration::from_secs(120);

/// The publisher of the next session after the one that failed, within [`REPUBLISH_WAIT`].
pub(crate) async fn next_publisher(
    rx: &mut tokio::sync::watch::Receiver<Option<Publisher>>,
) -> Option<Publisher> {
    tokio::time::timeout(REPUBLISH_WAIT, async {
        loop {
            rx.changed().await.ok()?;
            if let Some(p) = rx.borrow_and_update().clone() {
                return Some(p);
            }
        }
    })
    .await
    .ok()
    .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::Outgoing;
    use crate::settle::render::Message;
    use crate::testing::{RecordingPublisher, Refuse};
    use poller_core::audit::AuditRecord;

    fn rendered() -> Rendered {
        let m = |part, key: &str| Message {
            part,
            outgoing: Outgoing {
                routing_key: key.into(),
                ..Default::default()
            },
        };
        Rendered {
            messages: vec![
                m(Part::Result, "result"),
                m(Part::Reply, "reply"),
                m(Part::Alert, "alert"),
            ],
            audit: AuditRecord {
                kind: "command".into(),
                action_id: None,
                agent: None,
                instance: "i".into(),
                at: String::new(),
                events: Vec::new(),
            },
        }
    }

    fn publish_with(refuse: Vec<(&'static str, bool)>) -> (Result<(), BrokerError>, Vec<String>) {
        let log = crate::testing::Log::default();
        let mut p = RecordingPublisher::new(log.clone());
        for (k, lost) in refuse {
            p = p.refusing(
                k,
                if lost {
                    Refuse::ConnectionLost
                } else {
                    Refuse::Unroutable
                },
            );
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let r = rt.block_on(messages(&p, &rendered()));
        let sent = log
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| l.strip_prefix("publish ").map(str::to_owned))
            .collect();
        (r, sent)
    }

    #[test]
    fn everything_goes_out_in_order() {
        let (r, sent) = publish_with(vec![]);
        assert!(r.is_ok());
        assert_eq!(sent, ["result", "reply", "alert"]);
    }

    #[test]
    fn a_refused_reply_is_not_fatal_but_a_lost_connection_is() {
        let (r, sent) = publish_with(vec![("reply", false)]);
        assert!(r.is_ok(), "the result is on the results exchange");
        assert_eq!(sent, ["result", "alert"]);
        let (r, sent) = publish_with(vec![("reply", true)]);
        assert!(r.unwrap_err().is_connection());
        assert_eq!(sent, ["result"], "nothing after a lost connection");
    }

    /// Publishes `rendered()` with `refuse` and a nack budget; the publish log.
    fn publish_nacking(
        refuse: Vec<(&'static str, Refuse)>,
        budget: Duration,
    ) -> (Result<(), BrokerError>, Vec<String>) {
        let log = crate::testing::Log::default();
        let mut p = RecordingPublisher::new(log.clone());
        p.show_ids = true;
        for (k, how) in refuse {
            p = p.refusing(k, how);
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let r = rt.block_on(messages_within(&p, &rendered(), budget));
        let log = log.lock().unwrap().clone();
        (r, log)
    }

    #[test]
    fn a_nacked_result_is_published_again_with_one_message_id_and_nothing_is_skipped() {
        let (r, log) =
            publish_nacking(vec![("result", Refuse::Nacked(2))], Duration::from_secs(10));
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(log.len(), 5, "{log:?}");
        let id = log[0]
            .strip_prefix("refused result id=")
            .expect("an id from the first try");
        assert_eq!(log[1], format!("refused result id={id}"), "{log:?}");
        assert_eq!(
            log[2],
            format!("publish result id={id}"),
            "one id for every copy"
        );
        assert_eq!(log[3], "publish reply");
        assert!(log[4].starts_with("publish alert id="), "{log:?}");
    }

    #[test]
    fn a_nacked_alert_is_retried_too_but_a_nacked_reply_is_not() {
        let (r, log) = publish_nacking(
            vec![("alert", Refuse::Nacked(1)), ("reply", Refuse::Nacked(1))],
            Duration::from_secs(10),
        );
        assert!(r.is_ok(), "{r:?}");
        assert!(log[0].starts_with("publish result id="), "{log:?}");
        assert_eq!(log[1], "refused reply");
        let id = log[2]
            .strip_prefix("refused alert id=")
            .expect("an id from the first try");
        assert_eq!(
            log[3],
            format!("publish alert id={id}"),
            "one id for every copy"
        );
        assert_eq!(log.len(), 4, "the reply was not sent again: {log:?}");
    }

    #[test]
    fn nacks_past_the_budget_stop_everything_after_them() {
        let (r, log) = publish_nacking(
            vec![("result", Refuse::Nacked(usize::MAX))],
            Duration::from_millis(250),
        );
        assert!(matches!(r, Err(BrokerError::Nacked { .. })), "{r:?}");
        assert_eq!(log.len(), 2, "tried within the budget: {log:?}");
        assert!(
            log.iter().all(|l| l.starts_with("refused result id=")),
            "{log:?}"
        );
    }

    #[test]
    fn a_refused_result_stops_everything_after_it() {
        let (r, sent) = publish_with(vec![("result", false)]);
        assert!(matches!(r, Err(BrokerError::Unroutable { .. })));
        assert!(sent.is_empty(), "{sent:?}");
    }
}
