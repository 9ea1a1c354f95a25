//! The confirmed publisher against the real broker: which of many messages in flight at once
//! the broker returned as unroutable. AMQP's `basic.return` names no delivery tag, and the
//! broker acks several messages with one frame, so on a channel with more than one message in
//! flight a return can't be told apart from its neighbours: a routed result read as unroutable
//! had its command requeued and published twice.

use crate::common::*;
use command_poller::broker::{BrokerError, Outgoing, Publisher};
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, ExchangeKind};

#[tokio::test]
async fn each_message_in_flight_gets_its_own_return() {
    let sfx = suffix();
    let exchange = format!("t.{sfx}.pub");
    let queue = format!("t.{sfx}.pub.routed");
    let conn = Connection::connect(AMQP, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.exchange_declare(
        exchange.as_str().into(),
        ExchangeKind::Direct,
        ExchangeDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    // A quorum queue confirms after its log is written: routed messages wait, and the broker
    // acks the returned ones and the routed ones together, several to a frame.
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        lapin::types::AMQPValue::LongString("quorum".into()),
    );
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .unwrap();
    ch.queue_bind(
        queue.as_str().into(),
        exchange.as_str().into(),
        "routed".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();

    // The worker's publisher (a channel per message in flight) and a tool's (one channel,
    // one message at a time).
    let shared = Connection::connect(AMQP, ConnectionProperties::default())
        .await
        .unwrap();
    let pool = Publisher::open_shared(std::sync::Arc::new(shared))
        .await
        .unwrap();
    let mut wrong = told(&pool, &exchange).await;
    assert!(
        pool.channels_opened() > 1,
        "the messages were not in flight together"
    );
    let single = Publisher::open(&conn).await.unwrap();
    wrong.extend(told(&single, &exchange).await);
    let _ = ch
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = ch
        .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
        .await;
    assert!(
        wrong.is_empty(),
        "{} of 800 confirms told the wrong story:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}

/// Ten rounds of 40 messages, mostly routed and a few returned, all sent before any confirm is
/// awaited (as a command's result, alerts and audit record are): what each confirm got wrong.
async fn told(publisher: &Publisher, exchange: &str) -> Vec<String> {
    let mut wrong = Vec::new();
    for round in 0..10 {
        let keys: Vec<&str> = (0..40)
            .map(|i| if i % 7 == 3 { "nowhere" } else { "routed" })
            .collect();
        let mut confirms = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            let msg = Outgoing {
                exchange: exchange.to_owned(),
                routing_key: (*key).to_owned(),
                body: format!("{round}-{i}").into_bytes(),
                message_type: "test",
                ..Default::default()
            };
            confirms.push(publisher.send(&msg).await.unwrap());
        }
        let confirmed = futures::future::join_all(confirms).await;
        for (i, (key, confirm)) in keys.iter().zip(confirmed).enumerate() {
            let ok = match (*key, &confirm) {
                ("routed", Ok(())) => true,
                ("nowhere", Err(BrokerError::Unroutable { routing_key, .. })) => {
                    routing_key == "nowhere"
                }
                _ => false,
            };
            if !ok {
                wrong.push(format!("round {round} message {i} to {key:?}: {confirm:?}"));
            }
        }
    }
    wrong
}
