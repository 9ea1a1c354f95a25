//! The embedded store: a redb file, for one poller (redb locks the file). Claims in the file
//! when it is opened belong to a process that is gone, so they are dropped at open.

use super::{now_millis, now_secs, Claim, ResultStore, StoreError};
use futures::future::BoxFuture;
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// key → (expires_at seconds, result JSON)
const RESULTS: TableDefinition<&str, (u64, &str)> = TableDefinition::new("results");
/// key → (expires_at milliseconds, owner)
const CLAIMS: TableDefinition<&str, (u64, &str)> = TableDefinition::new("claims");

pub struct EmbeddedStore {
    db: Arc<Database>,
    prefix: String,
}

fn err<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Backend(e.to_string())
}

impl EmbeddedStore {
    pub fn open(path: &Path, prefix: &str) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError::Backend(format!("{}: {e}", dir.display())))?;
        }
        let db = Database::create(path)
            .map_err(|e| StoreError::Backend(format!("{}: {e}", path.display())))?;
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
        }
        tx.commit().map_err(err)?;
        Ok(Self {
            db: Arc::new(db),
            prefix: prefix.to_owned(),
        })
    }

    fn key(&self, key: &str) -> String {
        format!("{}/{key}", self.prefix)
    }

    fn claim_sync(&self, key: &str, owner: &str, ttl: Duration) -> Result<Claim, StoreError> {
        let key = self.key(key);
        let mut tx = self.db.begin_write().map_err(err)?;
        // Claims live only as long as this process (they are dropped at open): no fsync.
        tx.set_durability(Durability::None).map_err(err)?;
        let outcome = {
            let results = tx.open_table(RESULTS).map_err(err)?;
            let mut claims = tx.open_table(CLAIMS).map_err(err)?;
            let done = results.get(key.as_str()).map_err(err)?.and_then(|v| {
                let (exp, r) = v.value();
                (exp > now_secs()).then(|| r.to_owned())
            });
            if let Some(r) = done {
                Claim::Done(r)
            } else {
                let live = claims
                    .get(key.as_str())
                    .map_err(err)?
                    .map(|v| (v.value().0, v.value().1.to_owned()))
                    .filter(|(exp, o)| *exp > now_millis() && o != owner);
                match live {
                    Some((_, other)) => Claim::Busy(other),
                    None => {
                        claims
                            .insert(key.as_str(), (now_millis() + ttl.as_millis() as u64, owner))
                            .map_err(err)?;
                        Claim::Mine
                    }
                }
            }
        };
        tx.commit().map_err(err)?;
        Ok(outcome)
    }

    fn complete_sync(
        &self,
        key: &str,
        result: &str,
        retention: Duration,
        durable: bool,
    ) -> Result<(), StoreError> {
        let key = self.key(key);
        let mut tx = self.db.begin_write().map_err(err)?;
        if !durable {
            tx.set_durability(Durability::None).map_err(err)?;
        }
        {
            let mut results = tx.open_table(RESULTS).map_err(err)?;
            results
                .insert(key.as_str(), (now_secs() + retention.as_secs(), result))
                .map_err(err)?;
            let mut claims = tx.open_table(CLAIMS).map_err(err)?;
            claims.remove(key.as_str()).map_err(err)?;
        }
        tx.commit().map_err(err)
    }

    fn release_sync(&self, key: &str, owner: &str) -> Result<(), StoreError> {
        let key = self.key(key);
        let mut tx = self.db.begin_write().map_err(err)?;
        tx.set_durability(Durability::None).map_err(err)?;
        {
            let mut claims = tx.open_table(CLAIMS).map_err(err)?;
            let mine = claims
                .get(key.as_str())
                .map_err(err)?
                .is_some_and(|v| v.value().1 == owner);
            if mine {
                claims.remove(key.as_str()).map_err(err)?;
            }
        }
        tx.commit().map_err(err)
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
}

impl ResultStore for EmbeddedStore {
    fn claim<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Claim, StoreError>> {
        // redb is synchronous and fsyncs on commit: keep it off the async workers.
        let (this, key, owner) = (self.clone_handle(), key.to_owned(), owner.to_owned());
        Box::pin(async move {
            tokio::task::spawn_blocking(move || this.claim_sync(&key, &owner, ttl))
                .await
                .map_err(err)?
        })
    }

    fn complete<'a>(
        &'a self,
        key: &'a str,
        _owner: &'a str,
        result_json: &'a str,
        retention: Duration,
        durable: bool,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let (this, key, result) = (self.clone_handle(), key.to_owned(), result_json.to_owned());
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                this.complete_sync(&key, &result, retention, durable)
            })
            .await
            .map_err(err)?
        })
    }

    fn release<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let (this, key, owner) = (self.clone_handle(), key.to_owned(), owner.to_owned());
        Box::pin(async move {
            tokio::task::spawn_blocking(move || this.release_sync(&key, &owner))
                .await
                .map_err(err)?
        })
    }
}

impl EmbeddedStore {
    fn clone_handle(&self) -> EmbeddedStore {
        EmbeddedStore {
            db: self.db.clone(),
            prefix: self.prefix.clone(),
        }
    }
}
