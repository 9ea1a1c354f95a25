//! Test harness: the real poller (in-process, from the library) against the real RabbitMQ on
//! 127.0.0.1:5672, with its own randomly suffixed exchanges and queues (deleted on drop), the
//! bridge simulator on 127.0.0.1:0, and scripted judges (`command_poller::testing`) where a
//! test needs them. One file per concern: [`broker`] (names, settings, cleanup, throwaway
//! users, dropped connections), [`collect`] (what arrives on the results, alerts and dead-letter
//! queues), [`harness`] (the poller and its replicas, commands, waiting on events).
// The bench includes this harness too (`#[path]`) and uses only part of it.
#![allow(dead_code)]

pub mod broker;
pub mod collect;
pub mod harness;
pub mod relay;

pub use broker::*;
pub use harness::*;
#[allow(unused_imports)]
pub use relay::Relay;
