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
    // A command's messages go as one batch on one channel: its returns are matched to its
    // messages by id once all its confirms are in.
    wrong.extend(told_in_batches(&pool, &exchange).await);
    let _ = ch
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = ch
        .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
        .await;
    assert!(
        wrong.is_empty(),
        "{} of 2,000 confirms told the wrong story:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}

/// The keys of one round's 40 messages: mostly routed, a few returned.
fn keys() -> Vec<&'static str> {
    (0..40)
        .map(|i| if i % 7 == 3 { "nowhere" } else { "routed" })
        .collect()
}

fn message(exchange: &str, key: &str, body: String) -> Outgoing {
    Outgoing {
        exchange: exchange.to_owned(),
        routing_key: key.to_owned(),
        body: body.into_bytes(),
        message_type: "test",
        ..Default::default()
    }
}

/// Ten rounds of 40 messages, all sent before any confirm is awaited (as a command's result,
/// alerts and audit record are): what each confirm got wrong.
async fn told(publisher: &Publisher, exchange: &str) -> Vec<String> {
    let mut wrong = Vec::new();
    for round in 0..10 {
        let keys = keys();
        let mut confirms = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            let msg = message(exchange, key, format!("{round}-{i}"));
            confirms.push(publisher.send(&msg).await.unwrap());
        }
        let confirmed = futures::future::join_all(confirms).await;
        wrong.extend(check(round, &keys, confirmed));
    }
    wrong
}

/// Thirty such rounds, four batches of ten messages each, the batches in flight together.
async fn told_in_batches(publisher: &Publisher, exchange: &str) -> Vec<String> {
    let mut wrong = Vec::new();
    for round in 0..30 {
        let keys = keys();
        let msgs: Vec<Outgoing> = keys
            .iter()
            .enumerate()
            .map(|(i, key)| message(exchange, key, format!("batch {round}-{i}")))
            .collect();
        let mut confirms = Vec::new();
        for batch in msgs.chunks(10) {
            let refs: Vec<&Outgoing> = batch.iter().collect();
            for sent in publisher.send_all(&refs).await {
                confirms.push(sent.unwrap());
            }
        }
        let confirmed = futures::future::join_all(confirms).await;
        wrong.extend(check(round, &keys, confirmed));
    }
    wrong
}

/// Each confirm against what its message's key says it must be.
fn check(round: usize, keys: &[&str], confirmed: Vec<Result<(), BrokerError>>) -> Vec<String> {
    let mut wrong = Vec::new();
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
    wrong
}

/// A relay to the broker whose answers can be held back (the connection stays open, as with a
/// cluster node cut off before anyone notices): what the client sends still arrives.
struct Stall {
    port: u16,
    hold: tokio::sync::watch::Sender<bool>,
}

impl Stall {
    async fn start() -> Stall {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (hold, held) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let Ok(broker) = tokio::net::TcpStream::connect("127.0.0.1:5672").await else {
                    return;
                };
                let (mut from_client, mut to_client) = inbound.into_split();
                let (mut from_broker, mut to_broker) = broker.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut from_client, &mut to_broker).await;
                });
                let mut held = held.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match from_broker.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        if held.wait_for(|h| !*h).await.is_err()
                            || to_client.write_all(&buf[..n]).await.is_err()
                        {
                            return;
                        }
                    }
                });
            }
        });
        Stall { port, hold }
    }

    fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }
}

/// A confirm that doesn't come by the deadline is a timeout (the session is lost and the
/// outcome goes out on the next), and the channel that waited for it is never used again: its
/// late confirm, or a late return, would otherwise be read as the next message's.
#[tokio::test]
async fn a_confirm_that_never_comes_times_out_and_its_channel_is_not_used_again() {
    let sfx = suffix();
    let queue = format!("t.{sfx}.pub.stalled");
    let direct = Connection::connect(AMQP, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = direct.create_channel().await.unwrap();
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    let stall = Stall::start().await;
    let conn = Connection::connect(&stall.url(), ConnectionProperties::default())
        .await
        .unwrap();
    let deadline = std::time::Duration::from_millis(1500);
    let publisher = Publisher::open_shared(std::sync::Arc::new(conn))
        .await
        .unwrap()
        .with_confirm_timeout(deadline);
    let msg = |body: &str| Outgoing {
        exchange: String::new(),
        routing_key: queue.clone(),
        body: body.as_bytes().to_vec(),
        message_type: "test",
        ..Default::default()
    };
    publisher.publish(&msg("before")).await.unwrap();
    assert_eq!(publisher.channels_opened(), 1);

    stall.hold.send_replace(true);
    let t0 = std::time::Instant::now();
    let held = publisher.publish(&msg("held")).await;
    let waited = t0.elapsed();
    assert!(
        matches!(held, Err(BrokerError::Timeout(_, d)) if d == deadline),
        "{held:?}"
    );
    assert!(waited >= deadline, "gave up after {waited:?}");
    assert!(
        held.unwrap_err().is_connection(),
        "a timeout ends the session"
    );

    // The broker's answers flow again: the late confirm lands on the channel that waited, and
    // the next message goes out on another.
    stall.hold.send_replace(false);
    publisher.publish(&msg("after")).await.unwrap();
    assert_eq!(
        publisher.channels_opened(),
        2,
        "the channel whose confirm timed out was used again"
    );
    // The held message did reach the queue: a timeout says "unknown", and the outcome is
    // published again on the next session (a replay, deduplicated by its consumers).
    let depth = ch
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap()
        .message_count();
    assert_eq!(depth, 3);
    let _ = ch
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
}
