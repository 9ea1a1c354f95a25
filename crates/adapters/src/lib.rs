//! command-poller's adapters: the core's ports met by real things.
//!
//! # Layout
//!
//! [`broker`] is the RabbitMQ boundary (connections to a node or a cluster, the declared
//! topology, a publisher whose every publish is confirmed) and its config sections. [`store`]
//! holds one folder per backend (embedded redb, Redis, PostgreSQL), each implementing every
//! store port of the core. [`bridge`] is the Apps Script web app's HTTP client and the
//! simulator that stands in for it; [`judge`] the LLM judge; [`webhook`] the approvals
//! webhook's client; [`tls`] the trust roots they share.
//!
//! This is the only member that may use lapin, redb, redis, tokio-postgres and the HTTP
//! client (the runtime above also consumes with lapin and serves with axum).

// An item only this crate uses is not `pub` (its own `pub` items are all reachable from the root).
#![warn(unreachable_pub)]

pub mod bridge;
pub mod broker;
pub mod judge;
pub mod store;
pub mod tls;
pub mod webhook;
