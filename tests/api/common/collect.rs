//! Collectors: what the poller published, read off the test's own queues.

use command_poller::outcome::{Alert, ResultMessage};
use futures::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::Channel;
use std::sync::{Arc, Mutex};

/// A received message, with the properties tests look at.
#[derive(Debug, Clone)]
pub struct Received {
    pub routing_key: String,
    pub body: Vec<u8>,
    pub headers: Option<FieldTable>,
    pub correlation_id: Option<String>,
    pub delivery_mode: Option<u8>,
    /// Unique per message: a copy published again after a nack carries the same one.
    pub message_id: Option<String>,
    /// The broker-checked publishing user.
    pub user_id: Option<String>,
}

impl Received {
    pub fn header(&self, k: &str) -> Option<String> {
        self.headers
            .as_ref()?
            .inner()
            .iter()
            .find(|(key, _)| key.as_str() == k)
            .map(|(_, v)| match v {
                AMQPValue::LongString(s) => s.to_string(),
                other => format!("{other:?}"),
            })
    }
}

#[derive(Default)]
pub struct Inbox {
    pub results: Vec<(Received, ResultMessage)>,
    pub alerts: Vec<(Received, Alert)>,
    pub dead: Vec<Received>,
}

/// What a collector reads from its queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Result messages (parsed).
    Results,
    /// Alerts (parsed).
    Alerts,
    /// Dead letters (kept raw).
    DeadLetters,
}

/// Collects what arrives on `queue` into `inbox` until the channel closes.
pub async fn collect(ch: Channel, queue: String, inbox: Arc<Mutex<Inbox>>, kind: Kind) {
    let mut c = ch
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("consume test queue");
    while let Some(Ok(d)) = c.next().await {
        let r = Received {
            message_id: d.properties.message_id().as_ref().map(|m| m.to_string()),
            user_id: d.properties.user_id().as_ref().map(|u| u.to_string()),
            routing_key: d.routing_key.to_string(),
            body: d.data.clone(),
            headers: d.properties.headers().clone(),
            correlation_id: d
                .properties
                .correlation_id()
                .as_ref()
                .map(|c| c.to_string()),
            delivery_mode: *d.properties.delivery_mode(),
        };
        let mut inbox = inbox.lock().unwrap();
        match kind {
            Kind::Results => {
                let m: ResultMessage = serde_json::from_slice(&d.data).expect("result parses");
                inbox.results.push((r, m));
            }
            Kind::Alerts => {
                let a: Alert = serde_json::from_slice(&d.data).expect("alert parses");
                inbox.alerts.push((r, a));
            }
            Kind::DeadLetters => inbox.dead.push(r),
        }
    }
}
