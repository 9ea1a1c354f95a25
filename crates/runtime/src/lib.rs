//! command-poller's runtime: the long-running parts, composed from the core's stages and the
//! adapters.
//!
//! # Layout
//!
//! [`worker`] consumes commands, runs each through [`pipeline`] (the core's stages strung
//! together for one command, returning a [`pipeline::Disposition`]) and settles the disposition
//! in one `match` (store, publish with confirms, ack), riding out broker restarts. [`control`]
//! adds to the core's control state the operator's client, the stored state stream and each
//! replica's follower of it; [`approval`] the desk that takes human decisions, the sweeper that
//! expires, executes and finalizes, and the approver's client; [`audit`] publishes the core's
//! records and chains them in the sink. [`health`] and [`metrics`] are what orchestrators
//! scrape; [`settings`] aggregates each component's config section and the secrets.
//!
//! The modules of the layers below are re-exported under their own names, so this crate and
//! the surfaces above name every part the same way.

// An item only this crate uses is not `pub` (its own `pub` items are all reachable from the root).
#![warn(unreachable_pub)]

pub use poller_adapters::{bridge, broker, store, tls};
pub use poller_core::{clock, intake, outcome, policy};

pub mod approval;
pub mod audit;
pub mod compose;
pub mod control;
pub mod health;
pub mod judging;
pub mod metrics;
pub mod pipeline;
pub mod settings;
pub mod settle;
#[cfg(any(test, feature = "test-util"))]
pub mod testing;
pub mod worker;
