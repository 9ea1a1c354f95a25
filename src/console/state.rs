//! The stored control state as an operator's console session sees it: read once when the
//! session opens, then followed entry by entry, so the overview's refresh every few seconds
//! shows it without reading the stream again (a read per page, per open tab, was a read every
//! 5 s for as long as the tab stayed open).
//!
//! In: the session's own broker connection (a channel of its own on it). Out: the folded state
//! ([`Follower::current`]), `None` until the first read is done or once the reader has failed
//! (the page then reads the stream itself, as before). Levers never use it: they read afresh.

use crate::control::replica::state_writer;
use crate::control::state_log::{Folded, StateReader};
use crate::settings::ControlSettings;
use std::sync::Arc;
use tokio::sync::watch;

/// One session's follower of the state stream; dropping it stops following.
pub struct Follower {
    state: watch::Receiver<Option<Folded>>,
    task: tokio::task::JoinHandle<()>,
}

impl Follower {
    /// Starts following on `conn` as `poller_user`'s fleet classifies writers.
    pub fn start(
        conn: Arc<lapin::Connection>,
        control: ControlSettings,
        poller_user: String,
    ) -> Self {
        let (tx, state) = watch::channel(None);
        let task = tokio::spawn(async move {
            let Ok(ch) = conn.create_channel().await else {
                return;
            };
            let classify = state_writer(&control.operators, &poller_user);
            let mut reader = match StateReader::open(&ch, &control, classify).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "console: the state stream could not be followed; pages read it themselves");
                    return;
                }
            };
            tx.send_replace(Some(reader.state().clone()));
            loop {
                match reader.changed().await {
                    Ok(folded) => {
                        tx.send_replace(Some(folded));
                    }
                    Err(e) => {
                        tracing::info!(error = %e, "console: stopped following the state stream");
                        tx.send_replace(None);
                        return;
                    }
                }
            }
        });
        Self { state, task }
    }

    /// The state as last folded, or `None` (not read yet, or the reader failed).
    pub fn current(&self) -> Option<Folded> {
        self.state.borrow().clone()
    }

    /// Whether it stopped (its connection closed, the stream gone).
    pub fn stopped(&self) -> bool {
        self.task.is_finished()
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.task.abort();
    }
}
