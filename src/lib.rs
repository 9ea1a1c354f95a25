//! command-poller: the MCP Orchestrator's worker.
//!
//! # Layout
//!
//! The pipeline, one module per stage, pure: [`intake`] (bytes → validated command and agent),
//! [`policy`] (ALLOW / JUDGE / BLOCK), [`judging`] (the judge panel), [`bridge`] (the Apps
//! Script web app, behind a trait), [`outcome`] (results and alerts). [`pipeline`] strings them
//! together for one command and returns a [`pipeline::Disposition`]; [`idempotency`] keeps
//! final results and hands out the claim guard; [`limits`] holds the fleet's bridge slots and rate
//! windows in the same store.
//!
//! The shell: [`worker`] consumes, settles each disposition in one `match` (store, publish with
//! confirms, ack), renders every outgoing message in pure functions, and rides out broker
//! restarts; [`control`] is operator control (levers, the stored state, trips); [`audit`] the
//! audit records and their sink; [`broker`] the RabbitMQ boundary and its names; [`health`] and
//! [`metrics`] what orchestrators scrape; [`approval`] the human decision on NEEDS_APPROVAL
//! commands (pure rules, a desk for decisions, a sweeper that expires, executes and finalizes).
//! [`console`] is the web page for operators and approvers; [`mcp`] the front door for agents
//! that speak the Model Context Protocol. [`cli`], [`agent`] and
//! [`preflight`] are the command line. `docs/ARCHITECTURE.md` follows a command through these files.

pub use poller_adapters::{bridge, broker, store, tls};
pub use poller_core::{clock, intake, outcome};

pub mod agent;
pub mod approval;
pub mod audit;
pub mod cli;
pub mod console;
pub mod control;
pub mod health;
pub mod judging;
pub mod mcp;
pub mod metrics;
pub mod pipeline;
pub mod policy;
pub mod preflight;
pub mod settings;
#[cfg(any(test, feature = "test-util"))]
pub mod testing;
pub mod worker;
