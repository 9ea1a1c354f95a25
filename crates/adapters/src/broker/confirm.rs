//! A batch's confirms, settled together. In: the messages of a batch sent on a leased channel,
//! each with its pending confirm. Out: each message's answer (taken, nacked, returned as
//! unroutable, timed out), and the channel handed back when the broker answered them all.

use super::publisher::{Confirm, Lease};
use super::BrokerError;
use lapin::Confirmation;
use std::time::Duration;

/// One message of a batch, sent, its confirm not yet in.
pub(super) struct Sent<C> {
    pub(super) message_id: String,
    pub(super) to: (String, String),
    pub(super) confirm: C,
    pub(super) answer: tokio::sync::oneshot::Sender<Result<(), BrokerError>>,
}

/// The caller's side of a [`Sent`]'s answer.
pub(super) fn waiting(rx: tokio::sync::oneshot::Receiver<Result<(), BrokerError>>) -> Confirm {
    Box::pin(async move {
        rx.await.unwrap_or_else(|_| {
            Err(BrokerError::Lost(
                "the wait for a publish confirm ended without an answer".into(),
            ))
        })
    })
}

/// What the broker said about each message of a batch sent on `lease`'s channel, answered to
/// each. The lease goes back once the broker has answered them all (and `whole`: every
/// message of the batch went out). A confirm that doesn't come by `deadline` (a cluster whose
/// queue leader is cut off, before the election) would hold the commands, and their
/// deliveries, forever: past the deadline the session counts as lost and the outcomes go out
/// on the next one (another node), and the channel, still waiting, is not used again.
pub(super) async fn settle<C>(sent: Vec<Sent<C>>, deadline: Duration, lease: Lease, whole: bool)
where
    C: std::future::Future<Output = lapin::Result<Confirmation>>,
{
    let (waits, answers): (Vec<_>, Vec<_>) = sent
        .into_iter()
        .map(|s| (s.confirm, (s.message_id, s.to, s.answer)))
        .unzip();
    let Ok(confirms) = tokio::time::timeout(deadline, futures::future::join_all(waits)).await
    else {
        for (_, _, answer) in answers {
            let _ = answer.send(Err(BrokerError::Timeout(
                "waiting for the broker's publish confirm",
                deadline,
            )));
        }
        return;
    };
    if whole && confirms.iter().all(|c| c.is_ok()) {
        lease.finish();
    }
    let returned: Vec<Option<String>> = confirms
        .iter()
        .filter_map(|c| match c {
            Ok(Confirmation::Ack(Some(m)) | Confirmation::Nack(Some(m))) => Some(
                m.properties
                    .message_id()
                    .as_ref()
                    .map(|id| id.as_str().to_owned()),
            ),
            _ => None,
        })
        .collect();
    for (confirm, (message_id, to, answer)) in confirms.into_iter().zip(answers) {
        let was_returned = returned.iter().any(|r| r.as_deref() == Some(&*message_id));
        let _ = answer.send(verdict(confirm, was_returned, to));
    }
    if returned.iter().any(Option::is_none) {
        // Every message sent carries an id: a return without one is not ours.
        tracing::error!(
            "the broker returned a message without a message_id on a publishing channel"
        );
    }
}

/// One message's answer: its confirm, and whether the broker returned it.
fn verdict(
    confirm: lapin::Result<Confirmation>,
    returned: bool,
    (exchange, routing_key): (String, String),
) -> Result<(), BrokerError> {
    match confirm? {
        Confirmation::Nack(_) => Err(BrokerError::Nacked {
            exchange,
            routing_key,
        }),
        Confirmation::Ack(_) if returned => Err(BrokerError::Unroutable {
            exchange,
            routing_key,
        }),
        Confirmation::Ack(_) => Ok(()),
        Confirmation::NotRequested => Err(BrokerError::ConfirmsOff),
    }
}

/// The same error again, for each message of a batch it stopped.
pub(super) fn copy(e: &BrokerError) -> BrokerError {
    match e {
        BrokerError::Amqp(e) => BrokerError::Amqp(e.clone()),
        other => BrokerError::Lost(other.to_string()),
    }
}
