//! command-poller's core: what a command is and how it is decided, with no I/O.
//!
//! # Layout
//!
//! The pure stages, in the order a command meets them: [`intake`] (bytes → validated command
//! and agent), [`policy`] (ALLOW / JUDGE / BLOCK), [`judging`] (the judge panel and its
//! tally), [`approval`] (the human decision's rules and wire format), [`control`] (the
//! operator's state, its transitions and the automatic trips) and [`outcome`] (results and
//! alerts); [`incident`] reads incidents back from audit records. The ports the stages need are traits here and implemented by the adapters:
//! [`store`] (final results, claims, the fleet's bridge slots and rate windows), [`bridge`]
//! (the Apps Script web app), [`judging::Judge`]. [`clock`] and [`names`] are the time and
//! the wire names every layer shares.
//!
//! Nothing in this crate opens a socket or a file on the command path: its tests need no
//! broker, store or network (`cargo test -p poller-core`).

// An item only this crate uses is not `pub` (its own `pub` items are all reachable from the root).
#![warn(unreachable_pub)]

pub mod approval;
pub mod audit;
pub mod bridge;
pub mod clock;
pub mod control;
pub mod history;
pub mod incident;
pub mod intake;
pub mod judging;
pub mod names;
pub mod outcome;
pub mod policy;
pub mod store;
#[cfg(any(test, feature = "test-util"))]
pub mod test_util;
