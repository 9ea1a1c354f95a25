//! Test doubles for the shell's boundaries (publisher, acker) and re-exports of the core's
//! (judge, bridge, store), in one place. Built for the crate's own tests and, with the
//! `test-util` feature, for the integration tests and the benchmark; never in a release build.

use futures::future::BoxFuture;
pub use poller_core::test_util::*;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The shipped replication (`config/default.toml`), for tests that build parts by hand.
pub const REPLICATION: crate::broker::settings::Replication =
    crate::broker::settings::Replication {
        initial_group_size: 3,
        leader_locator: crate::broker::settings::LeaderLocator::Balanced,
    };

/// A log shared by the publishing and acking doubles, in the order things happened.
pub type Log = Arc<Mutex<Vec<String>>>;

/// How [`RecordingPublisher`] refuses a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refuse {
    /// Returned unroutable: a message-level refusal.
    Unroutable,
    /// The connection failed.
    ConnectionLost,
    /// Nacked by the broker this many times, then accepted.
    Nacked(usize),
}

/// A publisher that records `publish <routing key>` (plus whatever `note` adds) instead of
/// publishing, and refuses the routing keys listed in `refuse` (recording `refused <key>`).
pub struct RecordingPublisher {
    pub log: Log,
    pub refuse: Vec<(String, Refuse)>,
    /// How many nacks each routing key has had ([`Refuse::Nacked`]).
    pub nacked: Mutex<std::collections::HashMap<String, usize>>,
    /// Adds each publish's (and refusal's) message_id to its line (` id=...`).
    pub show_ids: bool,
    /// Something to add to each recorded publish, looked up at that moment (what the store
    /// held when the message went out, say).
    #[allow(clippy::type_complexity)]
    pub note: Option<Box<dyn Fn() -> BoxFuture<'static, String> + Send + Sync>>,
    /// The connection was refused ([`Refuse::ConnectionLost`]): every send after fails too.
    pub lost: Mutex<bool>,
}

impl RecordingPublisher {
    pub fn new(log: Log) -> Self {
        Self {
            log,
            refuse: Vec::new(),
            nacked: Mutex::default(),
            show_ids: false,
            note: None,
            lost: Mutex::default(),
        }
    }

    pub fn refusing(mut self, routing_key: &str, how: Refuse) -> Self {
        self.refuse.push((routing_key.to_owned(), how));
        self
    }
}

impl crate::broker::Publish for RecordingPublisher {
    /// Records the message as it is sent. A connection refused at send fails the send and
    /// every send after it (the connection is gone); an unroutable or nacked message is sent,
    /// and its confirm says so.
    fn send<'a>(
        &'a self,
        msg: &'a crate::broker::Outgoing,
    ) -> BoxFuture<'a, Result<crate::broker::Confirm, crate::broker::BrokerError>> {
        Box::pin(async move {
            let rk = msg.routing_key.clone();
            let lost = || crate::broker::BrokerError::Timeout("publishing", Duration::ZERO);
            let id = match (&msg.message_id, self.show_ids) {
                (Some(m), true) => format!(" id={m}"),
                _ => String::new(),
            };
            if *self.lost.lock().unwrap() {
                self.log.lock().unwrap().push(format!("refused {rk}{id}"));
                return Err(lost());
            }
            let refusal = self
                .refuse
                .iter()
                .find(|(k, _)| *k == rk)
                .filter(|(_, how)| {
                    let Refuse::Nacked(times) = how else {
                        return true;
                    };
                    let mut given = self.nacked.lock().unwrap();
                    let n = given.entry(rk.clone()).or_default();
                    *n += 1;
                    *n <= *times
                });
            if let Some((_, how)) = refusal {
                self.log.lock().unwrap().push(format!("refused {rk}{id}"));
                let refused = match how {
                    Refuse::Nacked(_) => crate::broker::BrokerError::Nacked {
                        exchange: msg.exchange.clone(),
                        routing_key: rk,
                    },
                    Refuse::ConnectionLost => {
                        *self.lost.lock().unwrap() = true;
                        return Err(lost());
                    }
                    Refuse::Unroutable => crate::broker::BrokerError::Unroutable {
                        exchange: msg.exchange.clone(),
                        routing_key: rk,
                    },
                };
                return Ok(Box::pin(async move { Err(refused) }) as crate::broker::Confirm);
            }
            let note = match &self.note {
                Some(f) => format!(" {}", f().await),
                None => String::new(),
            };
            self.log
                .lock()
                .unwrap()
                .push(format!("publish {rk}{note}{id}"));
            Ok(Box::pin(async { Ok(()) }) as crate::broker::Confirm)
        })
    }
}

/// A delivery's acker that records `ack` and `requeue`.
pub struct RecordingAcker(pub Log);

impl crate::settle::Acker for RecordingAcker {
    fn ack(&self) -> BoxFuture<'_, bool> {
        self.0.lock().unwrap().push("ack".into());
        Box::pin(async { true })
    }

    fn requeue(&self) -> BoxFuture<'_, bool> {
        self.0.lock().unwrap().push("requeue".into());
        Box::pin(async { true })
    }
}

/// The repository's root (the shipped `config/` is under it), whatever directory the tests run
/// in.
pub fn repo_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}
