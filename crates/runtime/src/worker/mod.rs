//! The worker: the I/O shell around the pipeline. It consumes commands, runs each through the
//! [`Pipeline`](crate::pipeline::Pipeline) concurrently (up to `max_in_flight`), carries each
//! disposition out (store, publish with confirms) and only then acks.
//!
//! In: settings and a pipeline. Out: results, alerts and dead letters on the broker. Rides out
//! broker restarts (new connections, topology, consumer) and drains in-flight commands on
//! shutdown. Anything unacked when a connection goes away is requeued by the broker; the
//! bridge's dedup (per agent and action_id) makes a re-run after a lost ack safe.
//!
//! One file per concern ([`crate::compose`] builds the worker from settings): [`lifecycle`] runs
//! sessions, [`consumer`] manages the commands consumer. Settling one delivery (store, publish,
//! ack), rendering every outgoing message and the state health reads are [`crate::settle`]'s,
//! which the approval sweeper settles through too.

mod canary;
mod consumer;
mod lifecycle;
mod session;
pub mod settings;
mod supervisor;

pub use crate::settle::state::PollerState;

use crate::bridge::simulator::SimulatorHandle;
use crate::broker::settings::{AmqpSettings, TopologySettings};
use poller_core::approval::ApprovalSettings;
use poller_core::audit::AuditSettings;
use poller_core::control::ControlSettings;
use settings::ProcessingSettings;
use std::sync::Arc;

/// The sections of the settings the worker's lifecycle uses (the rest went into the pipeline
/// and the shell when they were composed).
#[derive(Debug, Clone)]
pub(crate) struct Sections {
    pub amqp: AmqpSettings,
    /// The broker nodes (from `amqp`), shared by the session's connections.
    pub endpoints: crate::broker::Endpoints,
    pub topology: TopologySettings,
    pub audit: AuditSettings,
    pub processing: ProcessingSettings,
    pub control: ControlSettings,
    pub canary: crate::judging::canary::CanarySettings,
}

/// A poller replica: build it with [`Poller::from_settings`] (or [`Poller::new`] from parts),
/// then [`Poller::run`] it until shutdown.
pub struct Poller {
    pub(crate) settings: Sections,
    pub(crate) shell: Arc<crate::settle::Shell>,
    pub(crate) instance: String,
    /// Where the control replica publishes.
    pub(crate) control_names: crate::control::replica::Names,
    /// Keeps the embedded bridge simulator running, when it is the configured bridge.
    pub(crate) _simulator: Option<SimulatorHandle>,
    /// Where approval decisions are handled (each session consumes for it).
    pub(crate) desk: Arc<crate::approval::desk::Desk>,
    /// The approval section, the webhook (if configured), and the sweeper's wake-up.
    pub(crate) approval: ApprovalSettings,
    pub(crate) notifier: Option<poller_adapters::webhook::Notifier>,
    pub(crate) wake: Arc<tokio::sync::Notify>,
}
