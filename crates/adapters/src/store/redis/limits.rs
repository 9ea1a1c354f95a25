//! Fleet limits in Redis: `<prefix>:bridge:slots` is a sorted set of holders scored by lease
//! expiry (milliseconds, Redis's own clock, so replicas' clocks don't matter);
//! `<prefix>:bridge:sent:<key>` marks an action sent to the bridge; `<prefix>:rate:<key>` is a
//! sorted set of members scored by when they were counted. Each step is one Lua script: atomic.

use super::RedisStore;
use crate::store::{BridgeSlots, Grant, Hit, LimitError, RateWindows};
use futures::future::BoxFuture;
use std::sync::OnceLock;
use std::time::Duration;

fn err(e: redis::RedisError) -> LimitError {
    LimitError::Backend(format!("redis: {e}"))
}

/// The scripts, built (and hashed) once.
struct Scripts {
    take: redis::Script,
    renew: redis::Script,
    holders: redis::Script,
    hit: redis::Script,
}

/// Milliseconds on Redis's clock, as the first lines of each script compute them.
const NOW: &str = "local t = redis.call('TIME')
                   local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)";

fn scripts() -> &'static Scripts {
    static S: OnceLock<Scripts> = OnceLock::new();
    S.get_or_init(|| Scripts {
        // KEYS: slots, sent marker. ARGV: holder, limit, lease ms, remember s.
        // Returns -1 (full), 0 (taken, first time), 1 (taken, sent before).
        take: redis::Script::new(&format!(
            "{NOW}
             redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
             if redis.call('ZSCORE', KEYS[1], ARGV[1]) == false
                and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return -1 end
             redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
             if redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[4]) then return 0 end
             redis.call('EXPIRE', KEYS[2], ARGV[4])
             return 1"
        )),
        // KEYS: slots. ARGV: holder, lease ms. 1 when renewed, 0 when the lease had expired.
        renew: redis::Script::new(&format!(
            "{NOW}
             local expiry = redis.call('ZSCORE', KEYS[1], ARGV[1])
             if expiry == false or tonumber(expiry) <= now then
               redis.call('ZREM', KEYS[1], ARGV[1])
               return 0
             end
             redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[2]), ARGV[1])
             return 1"
        )),
        holders: redis::Script::new(&format!(
            "{NOW}
             return redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf')"
        )),
        // KEYS: window. ARGV: member, limit, window ms. Returns {allowed, count}.
        hit: redis::Script::new(&format!(
            "{NOW}
             redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[3]))
             local n = redis.call('ZCARD', KEYS[1])
             if redis.call('ZSCORE', KEYS[1], ARGV[1]) then return {{1, n}} end
             if n >= tonumber(ARGV[2]) then return {{0, n}} end
             redis.call('ZADD', KEYS[1], now, ARGV[1])
             redis.call('PEXPIRE', KEYS[1], ARGV[3])
             return {{1, n + 1}}"
        )),
    })
}

impl RedisStore {
    fn slots_key(&self) -> String {
        format!("{}:bridge:slots", self.prefix)
    }
}

impl BridgeSlots for RedisStore {
    fn try_take<'a>(
        &'a self,
        holder: &'a str,
        limit: usize,
        lease: Duration,
        key: &'a str,
        remember: Duration,
    ) -> BoxFuture<'a, Result<Option<Grant>, LimitError>> {
        Box::pin(async move {
            let mut c = self.conn.clone();
            let answer: i64 = scripts()
                .take
                .key(self.slots_key())
                .key(format!("{}:bridge:sent:{key}", self.prefix))
                .arg(holder)
                .arg(limit)
                .arg(lease.as_millis() as u64)
                .arg(remember.as_secs().max(1))
                .invoke_async(&mut c)
                .await
                .map_err(err)?;
            Ok(match answer {
                -1 => None,
                n => Some(Grant { earlier: n == 1 }),
            })
        })
    }

    fn renew<'a>(
        &'a self,
        holder: &'a str,
        lease: Duration,
    ) -> BoxFuture<'a, Result<bool, LimitError>> {
        Box::pin(async move {
            let mut c = self.conn.clone();
            let renewed: i64 = scripts()
                .renew
                .key(self.slots_key())
                .arg(holder)
                .arg(lease.as_millis() as u64)
                .invoke_async(&mut c)
                .await
                .map_err(err)?;
            Ok(renewed == 1)
        })
    }

    fn give_back<'a>(&'a self, holder: &'a str) -> BoxFuture<'a, Result<(), LimitError>> {
        Box::pin(async move {
            let mut c = self.conn.clone();
            redis::cmd("ZREM")
                .arg(self.slots_key())
                .arg(holder)
                .query_async::<i64>(&mut c)
                .await
                .map_err(err)?;
            Ok(())
        })
    }

    fn forget_sent<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), LimitError>> {
        Box::pin(async move {
            let mut c = self.conn.clone();
            redis::cmd("DEL")
                .arg(format!("{}:bridge:sent:{key}", self.prefix))
                .query_async::<i64>(&mut c)
                .await
                .map_err(err)?;
            Ok(())
        })
    }

    fn sent<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool, LimitError>> {
        Box::pin(async move {
            let mut c = self.conn.clone();
            let n: i64 = redis::cmd("EXISTS")
                .arg(format!("{}:bridge:sent:{key}", self.prefix))
                .query_async(&mut c)
                .await
                .map_err(err)?;
            Ok(n == 1)
        })
    }

    fn holders(&self) -> BoxFuture<'_, Result<Vec<String>, LimitError>> {
        Box::pin(async move {
            let mut c = self.conn.clone();
            scripts()
                .holders
                .key(self.slots_key())
                .invoke_async(&mut c)
                .await
                .map_err(err)
        })
    }
}

impl RateWindows for RedisStore {
    fn hit<'a>(
        &'a self,
        key: &'a str,
        member: &'a str,
        limit: usize,
        window: Duration,
    ) -> BoxFuture<'a, Result<Hit, LimitError>> {
        Box::pin(async move {
            let mut c = self.conn.clone();
            let (allowed, count): (i64, i64) = scripts()
                .hit
                .key(format!("{}:rate:{key}", self.prefix))
                .arg(member)
                .arg(limit)
                .arg(window.as_millis().max(1) as u64)
                .invoke_async(&mut c)
                .await
                .map_err(err)?;
            Ok(Hit {
                allowed: allowed == 1,
                count: count as usize,
            })
        })
    }
}
