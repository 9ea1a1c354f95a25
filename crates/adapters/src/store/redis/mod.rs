//! The Redis store, shared by replicas: `<prefix>:done:<key>` holds the result (EX retention),
//! `<prefix>:claim:<key>` the owner (SET NX PX ttl). A claim is re-checked against the result
//! after it is taken, so a result written in between is never missed.

mod limits;

use crate::store::{Claim, IdempotencySettings, ResultStore, StoreError};
use futures::future::BoxFuture;
use redis::aio::ConnectionManager;
use redis::AsyncCommands;
use std::time::Duration;

pub struct RedisStore {
    pub(crate) conn: ConnectionManager,
    pub(crate) prefix: String,
    scripts: Scripts,
}

/// The store's atomic compare-and-set steps, built (and hashed) once.
struct Scripts {
    /// Claim a key in one round trip: `done` with the stored result, `busy` with another live
    /// owner, or `mine` (taken, or renewed if it was already this owner's).
    claim: redis::Script,
    /// Take or renew a claim unless another owner's is live: returns the holder.
    hold: redis::Script,
    /// Store the result only while the owner holds the claim; drop the claim unless kept.
    complete: redis::Script,
    /// Drop only one's own claim.
    release: redis::Script,
    /// Park an approval record unless a live one is there; returns the stored one.
    park: redis::Script,
    /// Replace an approval record only if unchanged, keeping its expiry; list or unlist it.
    swap: redis::Script,
}

impl Scripts {
    fn new() -> Self {
        Self {
            claim: redis::Script::new(
                "local r = redis.call('GET', KEYS[1])
                 if r then return {'done', r} end
                 if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
                   return {'mine', ''}
                 end
                 local h = redis.call('GET', KEYS[2])
                 if h and h ~= ARGV[1] then return {'busy', h} end
                 redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
                 return {'mine', ''}",
            ),
            hold: redis::Script::new(
                "local h = redis.call('GET', KEYS[1])
                 if h == false or h == ARGV[1] then
                   redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
                   return ARGV[1]
                 end
                 return h",
            ),
            complete: redis::Script::new(
                "if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
                 redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
                 if ARGV[4] == '0' then redis.call('DEL', KEYS[2]) end
                 return 1",
            ),
            release: redis::Script::new("if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end"),
            park: redis::Script::new(
                "local r = redis.call('GET', KEYS[1])
                 if r then return r end
                 redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
                 redis.call('SADD', KEYS[2], ARGV[3])
                 return ARGV[1]",
            ),
            swap: redis::Script::new(
                "if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
                 redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
                 if ARGV[3] == '1' then redis.call('SADD', KEYS[2], ARGV[4])
                 else redis.call('SREM', KEYS[2], ARGV[4]) end
                 return 1",
            ),
        }
    }
}

/// How the connection comes back after Redis (or the network) went away. The client's defaults
/// multiply the reconnect delay by 100 after the first failed try, so one failed try during an
/// outage left the store unusable for a minute after Redis was back (found when the approval
/// sweeper's calls made that first failed try likely). Here a reconnect tries a few times within
/// about a second, and the next command starts a fresh one; connecting and each answer are
/// bounded, so a half-open connection fails a command instead of hanging it.
fn reconnect_config() -> redis::aio::ConnectionManagerConfig {
    redis::aio::ConnectionManagerConfig::new()
        .set_factor(2)
        .set_max_delay(500)
        .set_number_of_retries(2)
        .set_connection_timeout(Duration::from_secs(2))
        .set_response_timeout(Duration::from_secs(5))
}

fn err(e: redis::RedisError) -> StoreError {
    StoreError::Backend(format!("redis: {e}"))
}

impl RedisStore {
    /// Connects to `idempotency.url`: `redis://`, or `rediss://` for TLS (rustls, verifying the
    /// server against the system's roots, or `idempotency.ca_file` when set).
    pub async fn connect(s: &IdempotencySettings) -> Result<Self, StoreError> {
        crate::tls::ensure_crypto_provider();
        let client = match &s.ca_file {
            Some(path) if s.url.starts_with("rediss://") => {
                let root_cert = std::fs::read(path).map_err(|e| {
                    StoreError::Backend(format!("idempotency.ca_file {}: {e}", path.display()))
                })?;
                crate::tls::ca_certificates(path)
                    .map_err(|e| StoreError::Backend(format!("idempotency.ca_file: {e}")))?;
                redis::Client::build_with_tls(
                    s.url.as_str(),
                    redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(root_cert),
                    },
                )
                .map_err(err)?
            }
            _ => redis::Client::open(s.url.as_str()).map_err(err)?,
        };
        let conn = ConnectionManager::new_with_config(client, reconnect_config())
            .await
            .map_err(err)?;
        Ok(Self {
            conn,
            prefix: s.key_prefix.clone(),
            scripts: Scripts::new(),
        })
    }

    fn done(&self, key: &str) -> String {
        format!("{}:done:{key}", self.prefix)
    }

    fn claim_key(&self, key: &str) -> String {
        format!("{}:claim:{key}", self.prefix)
    }

    fn approval_key(&self, id: &str) -> String {
        format!("{}:approval:{id}", self.prefix)
    }

    /// The set of open approval ids.
    fn open_key(&self) -> String {
        format!("{}:approvals:open", self.prefix)
    }
}

impl ResultStore for RedisStore {
    fn result<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<String>, StoreError>> {
        Box::pin(async move {
            let mut c = self.conn.clone();
            c.get(self.done(key)).await.map_err(err)
        })
    }

    fn park<'a>(
        &'a self,
        id: &'a str,
        record: &'a str,
        retention: Duration,
    ) -> BoxFuture<'a, Result<String, StoreError>> {
        Box::pin(async move {
            let mut c = self.conn.clone();
            self.scripts
                .park
                .key(self.approval_key(id))
                .key(self.open_key())
                .arg(record)
                .arg(retention.as_secs().max(1))
                .arg(id)
                .invoke_async(&mut c)
                .await
                .map_err(err)
        })
    }

    fn record<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<String>, StoreError>> {
        Box::pin(async move {
            let mut c = self.conn.clone();
            c.get(self.approval_key(id)).await.map_err(err)
        })
    }

    fn swap<'a>(
        &'a self,
        id: &'a str,
        expected: &'a str,
        new: &'a str,
        open: bool,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let mut c = self.conn.clone();
            let n: i64 = self
                .scripts
                .swap
                .key(self.approval_key(id))
                .key(self.open_key())
                .arg(expected)
                .arg(new)
                .arg(if open { "1" } else { "0" })
                .arg(id)
                .invoke_async(&mut c)
                .await
                .map_err(err)?;
            Ok(n == 1)
        })
    }

    fn open_records(&self) -> BoxFuture<'_, Result<Vec<String>, StoreError>> {
        Box::pin(async move {
            let mut c = self.conn.clone();
            let ids: Vec<String> = c.smembers(self.open_key()).await.map_err(err)?;
            let mut out = Vec::with_capacity(ids.len());
            for id in ids {
                match c
                    .get::<_, Option<String>>(self.approval_key(&id))
                    .await
                    .map_err(err)?
                {
                    Some(r) => out.push(r),
                    // Expired with its retention: no longer listed.
                    None => {
                        let _: i64 = c.srem(self.open_key(), &id).await.map_err(err)?;
                    }
                }
            }
            Ok(out)
        })
    }

    fn claim<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Claim, StoreError>> {
        Box::pin(async move {
            let mut c = self.conn.clone();
            // One script, so one round trip and atomic: the stored result, or the claim.
            let (what, value): (String, String) = self
                .scripts
                .claim
                .key(self.done(key))
                .key(self.claim_key(key))
                .arg(owner)
                .arg(ttl.as_millis() as u64)
                .invoke_async(&mut c)
                .await
                .map_err(err)?;
            match what.as_str() {
                "done" => Ok(Claim::Done(value)),
                "busy" => Ok(Claim::Busy(value)),
                "mine" => Ok(Claim::Mine),
                other => Err(StoreError::Backend(format!(
                    "the claim script answered {other:?}"
                ))),
            }
        })
    }

    fn hold<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Claim, StoreError>> {
        Box::pin(async move {
            let mut c = self.conn.clone();
            // Take or renew, unless another owner's claim is live: atomically.
            let script = &self.scripts.hold;
            let holder: String = script
                .key(self.claim_key(key))
                .arg(owner)
                .arg(ttl.as_millis() as u64)
                .invoke_async(&mut c)
                .await
                .map_err(err)?;
            Ok(if holder == owner {
                Claim::Mine
            } else {
                Claim::Busy(holder)
            })
        })
    }

    fn complete<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
        result_json: &'a str,
        retention: Duration,
        _durability: crate::store::Durability,
        after: crate::store::ClaimAfter,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let keep_claim = after == crate::store::ClaimAfter::Kept;
        Box::pin(async move {
            let mut c = self.conn.clone();
            // Only the live claim's owner writes the result: checked and written atomically.
            let script = &self.scripts.complete;
            let written: i64 = script
                .key(self.done(key))
                .key(self.claim_key(key))
                .arg(owner)
                .arg(result_json)
                .arg(retention.as_secs().max(1))
                .arg(if keep_claim { "1" } else { "0" })
                .invoke_async(&mut c)
                .await
                .map_err(err)?;
            if written == 1 {
                Ok(())
            } else {
                Err(StoreError::NotOwner)
            }
        })
    }

    fn release<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let mut c = self.conn.clone();
            // Only our own claim: compare and delete atomically.
            let script = &self.scripts.release;
            let _: i64 = script
                .key(self.claim_key(key))
                .arg(owner)
                .invoke_async(&mut c)
                .await
                .map_err(err)?;
            Ok(())
        })
    }
}
