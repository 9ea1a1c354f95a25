//! The embedded store: a redb file, for one poller (redb locks the file). Claims in the file
//! when it is opened belong to a process that is gone, so they are dropped at open.
//!
//! Group commit: one writer thread takes every operation waiting, applies them in order in one
//! transaction, and syncs once if any of them must be durable. Under load that turns one fsync
//! per command into one per batch.

mod limits;
mod writer;

use writer::{write_loop, Op};

use crate::store::{now_millis, now_secs, Claim, ResultStore, StoreError};
use futures::future::BoxFuture;
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
    WriteTransaction,
};
use std::path::Path;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

/// key → (expires_at seconds, result JSON)
const RESULTS: TableDefinition<&str, (u64, &str)> = TableDefinition::new("results");
/// key → (expires_at milliseconds, owner)
const CLAIMS: TableDefinition<&str, (u64, &str)> = TableDefinition::new("claims");

/// approval id → (expires_at seconds, sealed record)
const APPROVALS: TableDefinition<&str, (u64, &str)> = TableDefinition::new("approvals");
/// approval id → expires_at seconds, for the records still open
const OPEN_APPROVALS: TableDefinition<&str, u64> = TableDefinition::new("open_approvals");

/// `crate::limits`: action key → until (Unix milliseconds), for actions sent to the bridge
pub(crate) const SENT: TableDefinition<&str, u64> = TableDefinition::new("bridge_sent");
/// `crate::limits`: rate-window key → JSON `[[member, counted at ms], ...]`
pub(crate) const RATE: TableDefinition<&str, &str> = TableDefinition::new("rate_windows");

/// Operations in one batch, at most.
const MAX_BATCH: usize = 256;

fn err<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Backend(e.to_string())
}

pub struct EmbeddedStore {
    db: Arc<Database>,
    prefix: String,
    ops: mpsc::Sender<Op>,
    /// The bridge slots: one poller per file, so in-process leases are the fleet's.
    pub(crate) slots: crate::store::local::LocalSlots,
}

impl EmbeddedStore {
    pub fn open(path: &Path, prefix: &str) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError::Backend(format!("{}: {e}", dir.display())))?;
        }
        // A store dropped a moment ago may still be closing on its writer thread: retry briefly.
        let mut tries = 0;
        let db = loop {
            match Database::create(path) {
                Ok(db) => break db,
                Err(redb::DatabaseError::DatabaseAlreadyOpen) if tries < 50 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(StoreError::Backend(format!("{}: {e}", path.display()))),
            }
        };
        let tx = db.begin_write().map_err(err)?;
        {
            // Claims left by a previous process are stale; expired results go too.
            tx.delete_table(CLAIMS).map_err(err)?;
            tx.open_table(CLAIMS).map_err(err)?;
            let mut results = tx.open_table(RESULTS).map_err(err)?;
            let now = now_secs();
            results
                .retain(|_, (expires, _)| expires > now)
                .map_err(err)?;
            let mut approvals = tx.open_table(APPROVALS).map_err(err)?;
            approvals
                .retain(|_, (expires, _)| expires > now)
                .map_err(err)?;
            let mut open = tx.open_table(OPEN_APPROVALS).map_err(err)?;
            open.retain(|_, expires| expires > now).map_err(err)?;
            let mut sent = tx.open_table(SENT).map_err(err)?;
            let now_ms = now_millis();
            sent.retain(|_, until| until > now_ms).map_err(err)?;
            tx.open_table(RATE).map_err(err)?;
        }
        tx.commit().map_err(err)?;
        let db = Arc::new(db);
        let (ops, rx) = mpsc::channel();
        let writer = db.clone();
        std::thread::Builder::new()
            .name("idempotency-writer".into())
            .spawn(move || write_loop(&writer, rx))
            .map_err(err)?;
        Ok(Self {
            db,
            prefix: prefix.to_owned(),
            ops,
            slots: Default::default(),
        })
    }

    /// Marks `key` (unprefixed) as sent until `until` (Unix ms), or drops the mark; whether a
    /// live mark was there. Through the writer, batched (`crate::limits`).
    pub(crate) async fn mark(&self, key: &str, until: Option<u64>) -> Result<bool, StoreError> {
        let (reply, rx) = oneshot::channel();
        let op = Op::Mark {
            key: self.key(key),
            until,
            reply,
        };
        self.send(op, rx).await
    }

    pub(crate) fn key(&self, key: &str) -> String {
        format!("{}/{key}", self.prefix)
    }

    /// Number of stored results (for tests and status).
    pub fn len(&self) -> Result<u64, StoreError> {
        let tx = self.db.begin_read().map_err(err)?;
        let t = tx.open_table(RESULTS).map_err(err)?;
        t.len().map_err(err)
    }

    pub fn is_empty(&self) -> Result<bool, StoreError> {
        self.len().map(|n| n == 0)
    }

    /// A claim (`over_result`: a hold) through the writer.
    async fn claim_op(
        &self,
        key: &str,
        owner: &str,
        ttl: Duration,
        over_result: bool,
    ) -> Result<Claim, StoreError> {
        let (reply, rx) = oneshot::channel();
        let op = Op::Claim {
            key: self.key(key),
            owner: owner.to_owned(),
            ttl,
            over_result,
            reply,
        };
        self.send(op, rx).await
    }

    async fn send<T>(
        &self,
        op: Op,
        rx: oneshot::Receiver<Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        self.ops
            .send(op)
            .map_err(|_| StoreError::Backend("the store's writer stopped".into()))?;
        rx.await
            .map_err(|_| StoreError::Backend("the store's writer dropped the request".into()))?
    }
}

impl EmbeddedStore {
    /// Runs `f` in a write transaction of its own (approvals are few: no batching), off the
    /// async threads.
    pub(crate) async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&WriteTransaction) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.write_with(true, f).await
    }

    /// As [`Self::write`]; `durable: false` skips the fsync (the commit is on disk with the
    /// next durable one, which every stored result is).
    pub(crate) async fn write_with<T: Send + 'static>(
        &self,
        durable: bool,
        f: impl FnOnce(&WriteTransaction) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let mut tx = db.begin_write().map_err(err)?;
            if !durable {
                tx.set_durability(Durability::None).map_err(err)?;
            }
            let out = f(&tx)?;
            tx.commit().map_err(err)?;
            Ok(out)
        })
        .await
        .map_err(err)?
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&redb::ReadTransaction) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db.begin_read().map_err(err)?))
            .await
            .map_err(err)?
    }
}

/// A live value of a `(expires_at seconds, text)` table.
fn live<T: ReadableTable<&'static str, (u64, &'static str)>>(
    t: &T,
    key: &str,
) -> Result<Option<String>, StoreError> {
    Ok(t.get(key).map_err(err)?.and_then(|v| {
        let (exp, r) = v.value();
        (exp > now_secs()).then(|| r.to_owned())
    }))
}

impl ResultStore for EmbeddedStore {
    fn result<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<String>, StoreError>> {
        let key = self.key(key);
        Box::pin(self.read(move |tx| match tx.open_table(RESULTS) {
            Ok(t) => live(&t, &key),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
            Err(e) => Err(err(e)),
        }))
    }

    fn park<'a>(
        &'a self,
        id: &'a str,
        record: &'a str,
        retention: Duration,
    ) -> BoxFuture<'a, Result<String, StoreError>> {
        let (id, record) = (self.key(id), record.to_owned());
        Box::pin(self.write(move |tx| {
            let mut t = tx.open_table(APPROVALS).map_err(err)?;
            if let Some(existing) = live(&t, &id)? {
                return Ok(existing);
            }
            let expires = now_secs() + retention.as_secs();
            t.insert(id.as_str(), (expires, record.as_str()))
                .map_err(err)?;
            let mut open = tx.open_table(OPEN_APPROVALS).map_err(err)?;
            open.insert(id.as_str(), expires).map_err(err)?;
            Ok(record)
        }))
    }

    fn record<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<String>, StoreError>> {
        let id = self.key(id);
        Box::pin(self.read(move |tx| match tx.open_table(APPROVALS) {
            Ok(t) => live(&t, &id),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
            Err(e) => Err(err(e)),
        }))
    }

    fn swap<'a>(
        &'a self,
        id: &'a str,
        expected: &'a str,
        new: &'a str,
        open: bool,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        let (id, expected, new) = (self.key(id), expected.to_owned(), new.to_owned());
        Box::pin(self.write(move |tx| {
            let mut t = tx.open_table(APPROVALS).map_err(err)?;
            let expires = match t.get(id.as_str()).map_err(err)? {
                Some(v) if v.value().1 == expected && v.value().0 > now_secs() => v.value().0,
                _ => return Ok(false),
            };
            t.insert(id.as_str(), (expires, new.as_str()))
                .map_err(err)?;
            let mut listed = tx.open_table(OPEN_APPROVALS).map_err(err)?;
            if open {
                listed.insert(id.as_str(), expires).map_err(err)?;
            } else {
                listed.remove(id.as_str()).map_err(err)?;
            }
            Ok(true)
        }))
    }

    fn open_records(&self) -> BoxFuture<'_, Result<Vec<String>, StoreError>> {
        let prefix = format!("{}/", self.prefix);
        Box::pin(self.read(move |tx| {
            let (open, records) = match (tx.open_table(OPEN_APPROVALS), tx.open_table(APPROVALS)) {
                (Ok(o), Ok(r)) => (o, r),
                (Err(redb::TableError::TableDoesNotExist(_)), _)
                | (_, Err(redb::TableError::TableDoesNotExist(_))) => return Ok(Vec::new()),
                (Err(e), _) | (_, Err(e)) => return Err(err(e)),
            };
            let mut out = Vec::new();
            for entry in open.iter().map_err(err)? {
                let (id, _) = entry.map_err(err)?;
                if !id.value().starts_with(&prefix) {
                    continue;
                }
                if let Some(r) = live(&records, id.value())? {
                    out.push(r);
                }
            }
            Ok(out)
        }))
    }

    fn claim<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Claim, StoreError>> {
        Box::pin(self.claim_op(key, owner, ttl, false))
    }

    fn hold<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Claim, StoreError>> {
        Box::pin(self.claim_op(key, owner, ttl, true))
    }

    fn complete<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
        result_json: &'a str,
        retention: Duration,
        durability: crate::store::Durability,
        after: crate::store::ClaimAfter,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let durable = durability == crate::store::Durability::Synced;
        let keep_claim = after == crate::store::ClaimAfter::Kept;
        Box::pin(async move {
            let (reply, rx) = oneshot::channel();
            let op = Op::Complete {
                key: self.key(key),
                owner: owner.to_owned(),
                result: result_json.to_owned(),
                retention,
                durable,
                keep_claim,
                reply,
            };
            self.send(op, rx).await
        })
    }

    fn release<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let (reply, rx) = oneshot::channel();
            self.send(
                Op::Release {
                    key: self.key(key),
                    owner: owner.to_owned(),
                    reply,
                },
                rx,
            )
            .await
        })
    }
}
