//! Limits with the embedded store (one poller per file, so that poller is the fleet): bridge
//! slots are in-process leases; the marks of actions sent to the bridge and the rate windows are
//! in the file, so a restart (a crash included) forgets neither. A mark goes through the store's
//! writer, batched with the claims and results, without an fsync of its own: it reaches the disk
//! with the batch's (or the next batch's) durable results.

use super::EmbeddedStore;
use super::RATE;
use crate::store::local::slide;
use crate::store::{now_millis, StoreError};
use crate::store::{BridgeSlots, Grant, Hit, LimitError, RateWindows};
use futures::future::BoxFuture;
use redb::ReadableTable;
use std::time::Duration;

fn err<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Backend(e.to_string())
}

impl BridgeSlots for EmbeddedStore {
    fn try_take<'a>(
        &'a self,
        holder: &'a str,
        limit: usize,
        lease: Duration,
        key: &'a str,
        remember: Duration,
    ) -> BoxFuture<'a, Result<Option<Grant>, LimitError>> {
        Box::pin(async move {
            if !self.slots.take_only(holder, limit, lease) {
                return Ok(None);
            }
            let until = now_millis() + remember.as_millis() as u64;
            let marked = self.mark(key, Some(until)).await;
            match marked {
                Ok(earlier) => Ok(Some(Grant { earlier })),
                Err(e) => {
                    self.slots.give_back_now(holder);
                    Err(e.into())
                }
            }
        })
    }

    fn renew<'a>(
        &'a self,
        holder: &'a str,
        lease: Duration,
    ) -> BoxFuture<'a, Result<bool, LimitError>> {
        Box::pin(async move { Ok(self.slots.renew_now(holder, lease)) })
    }

    fn give_back<'a>(&'a self, holder: &'a str) -> BoxFuture<'a, Result<(), LimitError>> {
        Box::pin(async move {
            self.slots.give_back_now(holder);
            Ok(())
        })
    }

    fn forget_sent<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), LimitError>> {
        Box::pin(async move {
            self.mark(key, None).await?;
            Ok(())
        })
    }

    fn sent<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool, LimitError>> {
        Box::pin(async move {
            let key = self.key(key);
            let marked = self
                .read(move |tx| {
                    let t = tx.open_table(super::SENT).map_err(err)?;
                    let until = t.get(key.as_str()).map_err(err)?.map(|v| v.value());
                    Ok(until.is_some_and(|u| u > now_millis()))
                })
                .await?;
            Ok(marked)
        })
    }

    fn holders(&self) -> BoxFuture<'_, Result<Vec<String>, LimitError>> {
        Box::pin(async move { Ok(self.slots.live_holders()) })
    }
}

impl RateWindows for EmbeddedStore {
    fn hit<'a>(
        &'a self,
        key: &'a str,
        member: &'a str,
        limit: usize,
        window: Duration,
    ) -> BoxFuture<'a, Result<Hit, LimitError>> {
        Box::pin(async move {
            let key = self.key(key);
            let member = member.to_owned();
            let hit = self
                .write(move |tx| {
                    let mut t = tx.open_table(RATE).map_err(err)?;
                    let mut events: Vec<(String, u64)> = match t.get(key.as_str()).map_err(err)? {
                        Some(v) => serde_json::from_str(v.value()).map_err(err)?,
                        None => Vec::new(),
                    };
                    let now = now_millis();
                    let hit = slide(
                        &mut events,
                        &member,
                        limit,
                        now,
                        now.saturating_sub(window.as_millis() as u64),
                    );
                    let json = serde_json::to_string(&events).map_err(err)?;
                    t.insert(key.as_str(), json.as_str()).map_err(err)?;
                    Ok(hit)
                })
                .await?;
            Ok(hit)
        })
    }
}
