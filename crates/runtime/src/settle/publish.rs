//! Publishing what [`super::render`] built through the [`Publish`] boundary: every message of a
//! command sent at once, then each one's confirm awaited in order (one wait for the broker, not
//! one per message); and the next session's publisher for an outcome whose session was lost.

use super::render::{Names, Part, Rendered};
use crate::audit;
use crate::broker::names::routing;
use crate::broker::{
    after_nacks, with_id, BrokerError, Outgoing, Publish, Publisher, NACK_RETRY_BUDGET,
};
use poller_core::audit::AuditOutcome;
use std::time::Duration;

/// Publishes `rendered`: its messages (result, reply, alerts) and then its audit record are all
/// sent, then their confirms are awaited in that order. A reply that can't be delivered is
/// logged, not fatal; a result or alert the broker nacks is published again
/// ([`after_nacks`], for [`NACK_RETRY_BUDGET`]); anything else that fails is the answer
/// (the command is not acked, and its stored outcome is published again, in full, by its
/// redelivery). An audit record the audit exchange refuses holds nothing back: it is retried,
/// then dead-lettered on its own ([`audit::settle_record`]).
pub async fn rendered(
    publisher: &dyn Publish,
    rendered: &Rendered,
    names: &Names,
) -> Result<AuditOutcome, BrokerError> {
    rendered_within(publisher, rendered, names, NACK_RETRY_BUDGET).await
}

async fn rendered_within(
    publisher: &dyn Publish,
    rendered: &Rendered,
    names: &Names,
    nack_budget: Duration,
) -> Result<AuditOutcome, BrokerError> {
    // Each message's id is chosen before it is first sent: copies sent again after a nack
    // carry the same one.
    let messages: Vec<_> = rendered
        .messages
        .iter()
        .map(|m| (m.part, with_id(&m.outgoing)))
        .collect();
    let record = audit::record_message(
        &names.audit_exchange,
        routing::AUDIT_COMMAND,
        &rendered.audit,
        &names.poller_user,
    );
    // One batch: the broker's returns are matched to the messages they belong to.
    let all: Vec<&Outgoing> = messages
        .iter()
        .map(|(_, m)| m.as_ref())
        .chain(std::iter::once(&record))
        .collect();
    let mut sent = publisher.send_all(&all).await;
    let record_sent = sent.pop().expect("one confirm per message");
    for ((part, msg), sent) in messages.iter().zip(sent) {
        let first = match sent {
            Ok(confirm) => confirm.await,
            Err(e) => Err(e),
        };
        let confirmed = match part {
            // A reply the agent's queue refuses is not worth holding the command for.
            Part::Reply => first,
            _ => after_nacks(publisher, msg, first, nack_budget).await,
        };
        match (part, confirmed) {
            (_, Ok(())) => {}
            (Part::Reply, Err(e)) if !e.is_connection() => {
                let kind = if msg.best_effort {
                    "direct reply-to"
                } else {
                    "agent reply queue"
                };
                tracing::warn!(error = %e, kind, "reply not delivered; the result is on the results exchange");
            }
            (_, Err(e)) => return Err(e),
        }
    }
    let first = match record_sent {
        Ok(confirm) => confirm.await,
        Err(e) => Err(e),
    };
    audit::settle_record(publisher, record, first, &names.dead_letter_exchange).await
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

    fn names() -> Names {
        Names {
            results_exchange: "results".into(),
            alerts_exchange: "alerts".into(),
            dead_letter_exchange: "dlx".into(),
            audit_exchange: "audit".into(),
            control_exchange: "control".into(),
            instance: "i".into(),
            poller_user: "command-poller".into(),
        }
    }

    /// Publishes `rendered()` refusing `refuse`, within a nack budget: the answer and the log.
    fn publish_nacking(
        refuse: Vec<(&'static str, Refuse)>,
        budget: Duration,
        show_ids: bool,
    ) -> (Result<AuditOutcome, BrokerError>, Vec<String>) {
        let log = crate::testing::Log::default();
        let mut p = RecordingPublisher::new(log.clone());
        p.show_ids = show_ids;
        for (k, how) in refuse {
            p = p.refusing(k, how);
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let r = rt.block_on(rendered_within(&p, &rendered(), &names(), budget));
        let log = log.lock().unwrap().clone();
        (r, log)
    }

    /// What was published (not refused), in the order it was sent.
    fn publish_with(
        refuse: Vec<(&'static str, Refuse)>,
    ) -> (Result<AuditOutcome, BrokerError>, Vec<String>) {
        let (r, log) = publish_nacking(refuse, Duration::from_secs(10), false);
        let sent = log
            .iter()
            .filter_map(|l| l.strip_prefix("publish ").map(str::to_owned))
            .collect();
        (r, sent)
    }

    #[test]
    fn everything_goes_out_in_order_with_the_audit_record_last() {
        let (r, sent) = publish_with(vec![]);
        assert_eq!(r.unwrap(), AuditOutcome::Delivered);
        assert_eq!(sent, ["result", "reply", "alert", "audit.command"]);
    }

    /// Everything is sent before any confirm is awaited: a confirm that never comes holds
    /// back nothing that was sent with it, and the wait ends with the first missing one.
    #[test]
    fn every_message_is_sent_before_any_confirm_is_awaited() {
        struct Unconfirmed(crate::testing::Log);
        impl Publish for Unconfirmed {
            fn send<'a>(
                &'a self,
                msg: &'a Outgoing,
            ) -> futures::future::BoxFuture<'a, Result<crate::broker::Confirm, BrokerError>>
            {
                self.0.lock().unwrap().push(msg.routing_key.clone());
                Box::pin(async { Ok(Box::pin(std::future::pending()) as crate::broker::Confirm) })
            }
        }
        let log = crate::testing::Log::default();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let waited = rt.block_on(async {
            tokio::time::timeout(
                Duration::from_millis(100),
                super::rendered(&Unconfirmed(log.clone()), &rendered(), &names()),
            )
            .await
        });
        assert!(waited.is_err(), "no confirm came, so it still waits");
        assert_eq!(
            *log.lock().unwrap(),
            ["result", "reply", "alert", "audit.command"]
        );
    }

    #[test]
    fn a_refused_reply_is_not_fatal_but_a_lost_connection_is() {
        let (r, sent) = publish_with(vec![("reply", Refuse::Unroutable)]);
        assert!(r.is_ok(), "the result is on the results exchange");
        assert_eq!(sent, ["result", "alert", "audit.command"]);
        let (r, sent) = publish_with(vec![("reply", Refuse::ConnectionLost)]);
        assert!(r.unwrap_err().is_connection());
        assert_eq!(sent, ["result"], "nothing after a lost connection");
    }

    #[test]
    fn a_nacked_result_is_published_again_with_one_message_id_and_nothing_is_skipped() {
        let (r, log) = publish_nacking(
            vec![("result", Refuse::Nacked(2))],
            Duration::from_secs(10),
            true,
        );
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(log.len(), 6, "{log:?}");
        let id = log[0]
            .strip_prefix("refused result id=")
            .expect("an id from the first try");
        assert!(log[1].starts_with("publish reply id="), "{log:?}");
        assert!(log[2].starts_with("publish alert id="), "{log:?}");
        assert!(log[3].starts_with("publish audit.command"), "{log:?}");
        assert_eq!(log[4], format!("refused result id={id}"), "{log:?}");
        assert_eq!(
            log[5],
            format!("publish result id={id}"),
            "one id for every copy"
        );
    }

    #[test]
    fn a_nacked_alert_is_retried_too_but_a_nacked_reply_is_not() {
        let (r, log) = publish_nacking(
            vec![("alert", Refuse::Nacked(1)), ("reply", Refuse::Nacked(1))],
            Duration::from_secs(10),
            true,
        );
        assert!(r.is_ok(), "{r:?}");
        assert!(log[0].starts_with("publish result id="), "{log:?}");
        assert!(log[1].starts_with("refused reply"), "{log:?}");
        let id = log[2]
            .strip_prefix("refused alert id=")
            .expect("an id from the first try");
        assert!(log[3].starts_with("publish audit.command"), "{log:?}");
        assert_eq!(
            log[4],
            format!("publish alert id={id}"),
            "one id for every copy"
        );
        assert_eq!(log.len(), 5, "the reply was not sent again: {log:?}");
    }

    #[test]
    fn nacks_past_the_budget_fail_the_publication() {
        let (r, log) = publish_nacking(
            vec![("result", Refuse::Nacked(usize::MAX))],
            Duration::from_millis(250),
            true,
        );
        assert!(matches!(r, Err(BrokerError::Nacked { .. })), "{r:?}");
        let copies: Vec<_> = log
            .iter()
            .filter(|l| l.starts_with("refused result id="))
            .collect();
        assert_eq!(copies.len(), 2, "tried within the budget: {log:?}");
        assert!(copies.iter().all(|l| *l == copies[0]), "{log:?}");
    }

    /// A result the broker refuses fails the publication (the command is not acked; its
    /// redelivery publishes the stored outcome again, in full). What was sent with it has gone
    /// out by then: the alert, and the audit record of what was done.
    #[test]
    fn a_refused_result_fails_the_publication() {
        let (r, sent) = publish_with(vec![("result", Refuse::Unroutable)]);
        assert!(matches!(r, Err(BrokerError::Unroutable { .. })));
        assert_eq!(sent, ["reply", "alert", "audit.command"]);
    }

    /// An audit record the audit exchange refuses is tried once more, then dead-lettered on its
    /// own; the publication succeeds.
    #[test]
    fn a_refused_audit_record_is_dead_lettered_and_holds_nothing_back() {
        let (r, log) = publish_nacking(
            vec![("audit.command", Refuse::Unroutable)],
            Duration::from_secs(10),
            false,
        );
        // The dead-lettered copy keeps the routing key: refused too in this double, so logged.
        assert_eq!(r.unwrap(), AuditOutcome::Logged, "{log:?}");
        assert_eq!(
            log,
            [
                "publish result",
                "publish reply",
                "publish alert",
                "refused audit.command",
                "refused audit.command",
                "refused audit.command"
            ]
        );
    }
}
