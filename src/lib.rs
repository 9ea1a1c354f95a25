//! command-poller: the MCP Orchestrator's worker.
//!
//! # Layout
//!
//! A workspace of layers, each depending only on those below (`docs/ARCHITECTURE.md`):
//! - `crates/core` (poller-core): the domain vocabulary, the pure stages ([`intake`],
//!   [`policy`], [`judging`], [`approval`]'s rules, [`control`]'s state and trips, [`outcome`],
//!   the [`audit`] record) and the ports they need ([`store`], [`bridge`], the judge);
//! - `crates/adapters` (poller-adapters): [`broker`] (lapin), the [`store`] backends, the
//!   [`bridge`] client and simulator, the LLM judge, the webhook;
//! - `crates/runtime` (poller-runtime): the [`worker`] and its [`pipeline`], the control
//!   replica, the approval desk and sweeper, the audit sink, [`health`], [`metrics`],
//!   [`settings`];
//! - this package, the surfaces: [`cli`] (with [`agent`] and [`preflight`]), the operators'
//!   [`console`], the agents' [`mcp`] front door, and the offline tools (`policy replay`,
//!   `judges eval`); `main.rs` is the `command-poller` binary.
//!
//! Every module of the layers below is re-exported here under its own name.

// An item only this crate uses is not `pub` (its own `pub` items are all reachable from the root).
#![warn(unreachable_pub)]

#[cfg(any(test, feature = "test-util"))]
pub use poller_runtime::testing;
pub use poller_runtime::{
    bridge, broker, clock, compose, health, intake, metrics, outcome, pipeline, settings, settle,
    store, tls, worker,
};

/// Approval: the core's rules, record and wire format, the runtime's desk, sweeper and
/// approver's client, and the webhook adapter.
pub mod approval {
    pub use poller_adapters::webhook;
    pub use poller_core::approval::*;
    pub use poller_runtime::approval::*;
}

/// Incidents read back from audit records (the runtime's file reading and bundles are in
/// [`audit::incident`]).
pub use poller_core::incident;

/// Audit: the core's record, the runtime's publishing, chain, sink and incident bundles.
pub mod audit {
    pub use poller_core::audit::*;
    pub use poller_runtime::audit::*;
}

/// Operator control: the core's state, transitions, gate and trips, the runtime's operator
/// client, state stream and replica.
pub mod control {
    pub use poller_core::control::*;
    pub use poller_runtime::control::*;
}

pub mod agent;
pub mod cli;
pub mod console;
pub mod judging;
pub mod mcp;
pub mod policy;
pub mod preflight;
