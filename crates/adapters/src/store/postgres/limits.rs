//! Fleet limits in PostgreSQL: table `command_poller_bridge_slots` has one row per slot
//! (`name` is the key prefix; `holder` and `expires_at` are empty when free), taken with
//! `FOR UPDATE SKIP LOCKED` in one statement; `command_poller_sent` marks actions sent to the
//! bridge; `command_poller_rate` holds rate-window events, counted under an advisory lock on
//! the key. Times are the server's (`now()`).

use super::PostgresStore;
use crate::store::{BridgeSlots, Grant, Hit, LimitError, RateWindows};
use futures::future::BoxFuture;
use std::time::Duration;

fn err(e: tokio_postgres::Error) -> LimitError {
    LimitError::Backend(format!("postgres: {e}"))
}

/// Created with the store's other tables.
pub(crate) const TABLES: &str = "
    CREATE TABLE IF NOT EXISTS command_poller_bridge_slots (
        name text NOT NULL, slot integer NOT NULL, holder text, expires_at timestamptz,
        PRIMARY KEY (name, slot));
    CREATE TABLE IF NOT EXISTS command_poller_sent (
        key text PRIMARY KEY, expires_at timestamptz NOT NULL);
    CREATE TABLE IF NOT EXISTS command_poller_rate (
        key text NOT NULL, member text NOT NULL, at timestamptz NOT NULL,
        PRIMARY KEY (key, member));";

impl BridgeSlots for PostgresStore {
    fn try_take<'a>(
        &'a self,
        holder: &'a str,
        limit: usize,
        lease: Duration,
        key: &'a str,
        remember: Duration,
    ) -> BoxFuture<'a, Result<Option<Grant>, LimitError>> {
        Box::pin(async move {
            let c = self.client().await?;
            let limit = limit as i32;
            // The rows for this limit exist (a raised limit adds rows; rows above a lowered
            // one are never taken).
            if self.slot_rows.load(std::sync::atomic::Ordering::Relaxed) < limit as usize {
                c.execute(
                    "INSERT INTO command_poller_bridge_slots (name, slot)
                     SELECT $1, g FROM generate_series(0, $2 - 1) g ON CONFLICT DO NOTHING",
                    &[&self.prefix, &limit],
                )
                .await
                .map_err(err)?;
                self.slot_rows
                    .store(limit as usize, std::sync::atomic::Ordering::Relaxed);
            }
            let lease_ms = lease.as_millis() as f64;
            let remember_s = remember.as_secs().max(1) as f64;
            let sent_key = format!("{}/{key}", self.prefix);
            let row = c
                .query_one(
                    "WITH free AS (
                         SELECT slot FROM command_poller_bridge_slots
                         WHERE name = $1 AND slot < $3 AND (holder IS NULL OR expires_at <= now())
                         ORDER BY slot LIMIT 1 FOR UPDATE SKIP LOCKED),
                     taken AS (
                         UPDATE command_poller_bridge_slots s
                         SET holder = $2, expires_at = now() + $4 * interval '1 millisecond'
                         FROM free WHERE s.name = $1 AND s.slot = free.slot
                         RETURNING s.slot),
                     sent AS (
                         INSERT INTO command_poller_sent (key, expires_at)
                         SELECT $5, now() + $6 * interval '1 second' WHERE EXISTS (SELECT 1 FROM taken)
                         ON CONFLICT (key) DO UPDATE SET expires_at = EXCLUDED.expires_at
                           WHERE command_poller_sent.expires_at <= now()
                         RETURNING 1)
                     SELECT (SELECT count(*) FROM taken), (SELECT count(*) FROM sent)",
                    &[&self.prefix, &holder, &limit, &lease_ms, &sent_key, &remember_s],
                )
                .await
                .map_err(err)?;
            let (taken, first): (i64, i64) = (row.get(0), row.get(1));
            if taken == 0 {
                return Ok(None);
            }
            if first == 0 {
                // Sent before and still remembered: extend the mark with this attempt.
                c.execute(
                    "UPDATE command_poller_sent SET expires_at = now() + $2 * interval '1 second' WHERE key = $1",
                    &[&sent_key, &remember_s],
                )
                .await
                .map_err(err)?;
            }
            Ok(Some(Grant {
                earlier: first == 0,
            }))
        })
    }

    fn renew<'a>(
        &'a self,
        holder: &'a str,
        lease: Duration,
    ) -> BoxFuture<'a, Result<bool, LimitError>> {
        Box::pin(async move {
            let n = self
                .client()
                .await?
                .execute(
                    "UPDATE command_poller_bridge_slots
                     SET expires_at = now() + $3 * interval '1 millisecond'
                     WHERE name = $1 AND holder = $2 AND expires_at > now()",
                    &[&self.prefix, &holder, &(lease.as_millis() as f64)],
                )
                .await
                .map_err(err)?;
            Ok(n == 1)
        })
    }

    fn give_back<'a>(&'a self, holder: &'a str) -> BoxFuture<'a, Result<(), LimitError>> {
        Box::pin(async move {
            let c = self.client().await?;
            c.execute(
                "UPDATE command_poller_bridge_slots SET holder = NULL, expires_at = NULL
                 WHERE name = $1 AND holder = $2",
                &[&self.prefix, &holder],
            )
            .await
            .map_err(err)?;
            // Expired marks go lazily, a few at a time.
            c.execute(
                "DELETE FROM command_poller_sent WHERE key IN
                   (SELECT key FROM command_poller_sent WHERE expires_at < now() LIMIT 20)",
                &[],
            )
            .await
            .map_err(err)?;
            Ok(())
        })
    }

    fn forget_sent<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), LimitError>> {
        Box::pin(async move {
            self.client()
                .await?
                .execute(
                    "DELETE FROM command_poller_sent WHERE key = $1",
                    &[&format!("{}/{key}", self.prefix)],
                )
                .await
                .map_err(err)?;
            Ok(())
        })
    }

    fn sent<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool, LimitError>> {
        Box::pin(async move {
            let row = self
                .client()
                .await?
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM command_poller_sent WHERE key = $1 AND expires_at > now())",
                    &[&format!("{}/{key}", self.prefix)],
                )
                .await
                .map_err(err)?;
            Ok(row.get(0))
        })
    }

    fn holders(&self) -> BoxFuture<'_, Result<Vec<String>, LimitError>> {
        Box::pin(async move {
            let rows = self
                .client()
                .await?
                .query(
                    "SELECT holder FROM command_poller_bridge_slots
                     WHERE name = $1 AND holder IS NOT NULL AND expires_at > now()",
                    &[&self.prefix],
                )
                .await
                .map_err(err)?;
            Ok(rows.into_iter().map(|r| r.get(0)).collect())
        })
    }
}

impl RateWindows for PostgresStore {
    fn hit<'a>(
        &'a self,
        key: &'a str,
        member: &'a str,
        limit: usize,
        window: Duration,
    ) -> BoxFuture<'a, Result<Hit, LimitError>> {
        Box::pin(async move {
            let mut c = self.client().await?;
            let key = format!("{}/{key}", self.prefix);
            let window_ms = window.as_millis().max(1) as f64;
            let tx = c.transaction().await.map_err(err)?;
            // One counter at a time per key, across replicas.
            tx.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
                &[&key],
            )
            .await
            .map_err(err)?;
            tx.execute(
                "DELETE FROM command_poller_rate
                 WHERE key = $1 AND at <= now() - $2 * interval '1 millisecond'",
                &[&key, &window_ms],
            )
            .await
            .map_err(err)?;
            let row = tx
                .query_one(
                    "SELECT count(*), coalesce(bool_or(member = $2), false)
                     FROM command_poller_rate WHERE key = $1",
                    &[&key, &member],
                )
                .await
                .map_err(err)?;
            let (n, seen): (i64, bool) = (row.get(0), row.get(1));
            let hit = if seen {
                Hit {
                    allowed: true,
                    count: n as usize,
                }
            } else if n as usize >= limit {
                Hit {
                    allowed: false,
                    count: n as usize,
                }
            } else {
                tx.execute(
                    "INSERT INTO command_poller_rate (key, member, at) VALUES ($1, $2, now())",
                    &[&key, &member],
                )
                .await
                .map_err(err)?;
                Hit {
                    allowed: true,
                    count: n as usize + 1,
                }
            };
            tx.commit().await.map_err(err)?;
            Ok(hit)
        })
    }
}
