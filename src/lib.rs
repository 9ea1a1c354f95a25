//! command-poller: the MCP Orchestrator's worker.
//!
//! The pipeline, one module per stage: [`intake`] (bytes → validated command and agent),
//! [`policy`] (ALLOW / JUDGE / BLOCK), [`judging`] (the judge panel), [`bridge`] (the Apps
//! Script web app), [`outcome`] (results and alerts). [`pipeline`] strings them together for
//! one command; [`poller`] consumes, publishes with confirms and acks; [`broker`] is the
//! RabbitMQ boundary.

pub mod agent;
pub mod audit;
pub mod bridge;
pub mod broker;
pub mod cli;
pub mod clock;
pub mod control;
pub mod health;
pub mod idempotency;
pub mod intake;
pub mod judging;
pub mod metrics;
pub mod outcome;
pub mod pipeline;
pub mod policy;
pub mod preflight;
pub mod settings;
pub mod tls;
pub mod worker;
