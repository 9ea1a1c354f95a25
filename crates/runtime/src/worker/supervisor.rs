//! One supervisor for the worker's components: each runs hosted under its name, one token stops
//! them all, and one view says how each is doing.
//!
//! In: the components' futures, each with how it stops ([`Stop::Abort`] at once, or
//! [`Stop::Finish`] within the drain timeout). Out: the first hosted component to end (the
//! session then starts over), a shutdown that stops every one, and the [`Components`] view that
//! `/status` shows and `/readyz` decides on.
//!
//! The process holds one supervisor (the approvals sweeper and the store probe live as long as
//! the process); each broker session opens a [`Supervisor::scope`] of it (the control replica,
//! the approvals desk, the canary), whose token is a child of the process's and whose view is
//! the same one. The commands consumer is the session loop itself; it reports in the same view.

use crate::settle::state::{Component, Components, Health};
use std::collections::HashMap;
use std::fmt::Display;
use std::future::Future;
use std::time::Duration;
use tokio::task::{AbortHandle, Id, JoinSet};
use tokio_util::sync::CancellationToken;

/// How a hosted component stops at shutdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    /// Aborted at once (it holds nothing a half-done step would leave behind).
    Abort,
    /// Told by the token, then given the drain timeout to finish what it is doing (a sweep
    /// that has an approved command at the bridge); aborted after that.
    Finish,
}

/// Hosts components: spawns them, reports them, stops them.
pub(crate) struct Supervisor {
    stop: CancellationToken,
    view: std::sync::Arc<Components>,
    tasks: JoinSet<Result<(), String>>,
    hosted: HashMap<Id, (Component, Stop, AbortHandle)>,
}

impl Supervisor {
    /// A supervisor whose token is a child of `parent` (cancelling `parent` stops it too).
    pub(crate) fn new(view: std::sync::Arc<Components>, parent: &CancellationToken) -> Self {
        Self {
            stop: parent.child_token(),
            view,
            tasks: JoinSet::new(),
            hosted: HashMap::new(),
        }
    }

    /// A supervisor for one session: its own token (a child of this one's) and the same view.
    pub(crate) fn scope(&self) -> Self {
        Self::new(self.view.clone(), &self.stop)
    }

    /// The token the hosted components stop on.
    pub(crate) fn token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// The shared health view.
    #[cfg(test)]
    fn view(&self) -> &Components {
        &self.view
    }

    /// Runs `component`; it is reported running until it ends or is stopped.
    pub(crate) fn host<F, E>(&mut self, component: Component, stop: Stop, run: F)
    where
        F: Future<Output = Result<(), E>> + Send + 'static,
        E: Display,
    {
        self.view.set(component, Health::Running);
        let handle = self
            .tasks
            .spawn(async move { run.await.map_err(|e| e.to_string()) });
        self.hosted.insert(handle.id(), (component, stop, handle));
    }

    /// The first hosted component to end on its own, and how (a panic is an error); never
    /// returns while nothing is hosted. Cancel-safe.
    pub(crate) async fn ended(&mut self) -> (Component, Result<(), String>) {
        loop {
            let Some(joined) = self.tasks.join_next_with_id().await else {
                return std::future::pending().await;
            };
            let (id, result) = match joined {
                Ok((id, r)) => (id, r),
                Err(e) if e.is_panic() => (e.id(), Err("panicked".to_owned())),
                // Aborted: only `shut_down` aborts, and it reports those itself.
                Err(_) => continue,
            };
            let Some((component, ..)) = self.hosted.remove(&id) else {
                continue;
            };
            self.view.set(component, ended_health(&result));
            return (component, result);
        }
    }

    /// Stops every hosted component: the token is cancelled, [`Stop::Abort`] ones are aborted,
    /// [`Stop::Finish`] ones get `drain` to end (then are aborted). Each is then reported
    /// stopped, or failed if it ended with an error. Idempotent.
    pub(crate) async fn shut_down(&mut self, drain: Duration) {
        self.stop.cancel();
        for (_, stop, handle) in self.hosted.values() {
            if *stop == Stop::Abort {
                handle.abort();
            }
        }
        let finished = tokio::time::timeout(drain, self.join_all()).await;
        if finished.is_err() {
            let left: Vec<_> = self.hosted.values().map(|(c, ..)| c.name()).collect();
            tracing::warn!(components = ?left, "drain timeout; what they were doing is abandoned");
            self.tasks.abort_all();
            self.join_all().await;
        }
    }

    async fn join_all(&mut self) {
        while let Some(joined) = self.tasks.join_next_with_id().await {
            let (id, health) = match joined {
                Ok((id, Ok(()))) => (id, Health::Stopped),
                Ok((id, r)) => (id, ended_health(&r)),
                Err(e) if e.is_panic() => (
                    e.id(),
                    Health::Failed {
                        error: "panicked".into(),
                    },
                ),
                Err(e) => (e.id(), Health::Stopped),
            };
            if let Some((component, ..)) = self.hosted.remove(&id) {
                self.view.set(component, health);
            }
        }
    }
}

/// What a component that ended on its own reports: an end with an error is a failure; a clean
/// end (a listener whose stream closed) is a stop the session notices.
fn ended_health(result: &Result<(), String>) -> Health {
    match result {
        Ok(()) => Health::Stopped,
        Err(error) => Health::Failed {
            error: error.clone(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn supervisor() -> (Supervisor, CancellationToken) {
        let root = CancellationToken::new();
        (
            Supervisor::new(Arc::new(Components::default()), &root),
            root,
        )
    }

    #[tokio::test]
    async fn the_first_component_to_end_is_reported_with_its_error() {
        let (mut s, _root) = supervisor();
        s.host(
            Component::Canary,
            Stop::Abort,
            std::future::pending::<Result<(), String>>(),
        );
        s.host(Component::ControlReplica, Stop::Abort, async {
            Err::<(), _>("stream gone")
        });
        let (c, r) = s.ended().await;
        assert_eq!(
            (c, r),
            (Component::ControlReplica, Err("stream gone".into()))
        );
        let view = s.view().snapshot();
        assert_eq!(view[&Component::Canary], Health::Running);
        assert_eq!(
            view[&Component::ControlReplica],
            Health::Failed {
                error: "stream gone".into()
            }
        );
    }

    #[tokio::test]
    async fn a_panic_is_a_failure_not_a_hang() {
        let (mut s, _root) = supervisor();
        s.host(Component::ApprovalDesk, Stop::Abort, async {
            if true {
                panic!("boom");
            }
            Ok::<(), String>(())
        });
        let (c, r) = s.ended().await;
        assert_eq!(c, Component::ApprovalDesk);
        assert_eq!(r, Err("panicked".into()));
    }

    #[tokio::test]
    async fn shutdown_aborts_the_abortable_and_lets_a_finisher_finish() {
        let (mut s, _root) = supervisor();
        let token = s.token();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        // Finishes its step after the token, as a sweep in progress does.
        s.host(Component::ApprovalSweeper, Stop::Finish, async move {
            token.cancelled().await;
            tokio::task::yield_now().await;
            let _ = done_tx.send(());
            Ok::<(), String>(())
        });
        s.host(
            Component::Canary,
            Stop::Abort,
            std::future::pending::<Result<(), String>>(),
        );
        s.shut_down(Duration::from_secs(30)).await;
        assert!(done_rx.await.is_ok(), "the finisher ran to its end");
        let view = s.view().snapshot();
        assert_eq!(view[&Component::ApprovalSweeper], Health::Stopped);
        assert_eq!(view[&Component::Canary], Health::Stopped);
    }

    #[tokio::test]
    async fn a_finisher_that_overruns_the_drain_is_aborted() {
        let (mut s, _root) = supervisor();
        s.host(
            Component::ApprovalSweeper,
            Stop::Finish,
            std::future::pending::<Result<(), String>>(),
        );
        tokio::time::timeout(
            Duration::from_secs(10),
            s.shut_down(Duration::from_millis(20)),
        )
        .await
        .expect("shut down within the drain, not held by the overrunning component");
        assert_eq!(
            s.view().snapshot()[&Component::ApprovalSweeper],
            Health::Stopped
        );
    }

    #[tokio::test]
    async fn a_scope_stops_with_its_parent_and_shares_the_view() {
        let (s, root) = supervisor();
        let mut session = s.scope();
        let token = session.token();
        session.host(Component::ControlReplica, Stop::Abort, async move {
            token.cancelled().await;
            Ok::<(), String>(())
        });
        root.cancel();
        let (c, r) = session.ended().await;
        assert_eq!((c, r), (Component::ControlReplica, Ok(())));
        assert_eq!(
            s.view().snapshot()[&Component::ControlReplica],
            Health::Stopped
        );
    }
}
