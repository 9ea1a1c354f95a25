//! The Apps Script bridge's adapters: the HTTP client of the web app and the simulator that
//! stands in for it. The port ([`Bridge`]), its request and answer, and the signing are the
//! core's ([`poller_core::bridge`], re-exported here).

pub use poller_core::bridge::*;

pub mod client;
pub mod settings;
pub mod simulator;

pub use client::{AppsScriptBridge, BridgeClientConfig};
