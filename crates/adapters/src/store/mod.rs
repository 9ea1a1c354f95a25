//! The store's backends, one folder each: [`embedded`] (redb, one poller), [`redis`] and
//! [`postgres`] (shared by replicas). Each implements all three of the core's store ports
//! ([`poller_core::store`], re-exported here): final results and claims, the fleet's bridge
//! slots, and its rate windows.
//!
//! In: the `[idempotency]` settings. Out: [`Stores`], one backend behind each port.

pub use poller_core::store::*;

pub mod embedded;
pub mod postgres;
pub mod redis;

pub use embedded::EmbeddedStore;
pub use postgres::PostgresStore;
pub use redis::RedisStore;

use std::sync::Arc;

/// Opens the configured store.
pub async fn open(s: &IdempotencySettings) -> Result<Arc<dyn ResultStore>, StoreError> {
    Ok(open_all(s).await?.results)
}

/// Opens the configured backend behind all its boundaries.
pub async fn open_all(s: &IdempotencySettings) -> Result<Stores, StoreError> {
    Ok(match s.backend {
        Backend::Embedded => Stores::of(Arc::new(EmbeddedStore::open(&s.path, &s.key_prefix)?)),
        Backend::Redis => Stores::of(Arc::new(RedisStore::connect(s).await?)),
        Backend::Postgres => Stores::of(Arc::new(PostgresStore::connect(s).await?)),
    })
}
