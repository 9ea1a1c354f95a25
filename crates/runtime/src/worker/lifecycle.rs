//! The worker's lifecycle: sessions (connect, declare, apply the control state, consume),
//! reconnecting with backoff after broker failures, pausing and resuming the consumer with the
//! gate, and draining in-flight commands on shutdown.

use super::consumer::{consumer_stalled, STALL_CHECK_EVERY};
use super::session::Parts;
use super::supervisor::{Stop, Supervisor};
use super::Poller;
use crate::broker::{self, BrokerError};
use crate::settle;
use crate::settle::state::{Component, Health, PollerState};
use crate::store::ResultStore;
use backon::{BackoffBuilder, ExponentialBuilder};
use poller_core::control::Mode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

impl Poller {
    /// Runs until `shutdown` is cancelled, reconnecting after broker failures.
    pub async fn run(&self, shutdown: CancellationToken) {
        let a = &self.settings.amqp;
        let mut backoff = reconnect_backoff(a.reconnect_min, a.reconnect_max);
        tracing::info!(instance = %self.instance, broker = ?self.settings.endpoints, "poller starting");
        // In-flight commands outlive a lost session: they finish, store their outcome and
        // settle their idempotency claim, so the redelivered copies replay it at once instead of
        // waiting out an orphaned claim. Drained (or aborted) only at shutdown.
        let mut tasks: JoinSet<()> = JoinSet::new();
        // The components that live as long as the process: the store probe, and the approvals
        // sweeper (parked approvals expired, executed and finalized by whichever replica sweeps
        // first). Each session hosts its own in a scope of this supervisor.
        let mut process = Supervisor::new(self.shell.settler.state.components.clone(), &shutdown);
        self.host_process_component(&mut process, Component::StoreProbe);
        self.host_process_component(&mut process, Component::ApprovalSweeper);
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            let mut consumed_any = false;
            match self
                .session(&shutdown, &mut consumed_any, &mut tasks, &mut process)
                .await
            {
                Ok(()) => break,
                Err(e) => {
                    self.shell
                        .settler
                        .state
                        .connected
                        .store(false, Ordering::SeqCst);
                    if consumed_any {
                        backoff = reconnect_backoff(a.reconnect_min, a.reconnect_max);
                    }
                    let delay = backoff.next().unwrap_or(a.reconnect_max);
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "broker session ended; reconnecting");
                    let sleep = tokio::time::sleep(delay);
                    tokio::pin!(sleep);
                    loop {
                        tokio::select! {
                            _ = shutdown.cancelled() => break,
                            _ = &mut sleep => break,
                            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                        }
                    }
                }
            }
        }
        self.drain(&mut tasks).await;
        process
            .shut_down(self.settings.processing.drain_timeout)
            .await;
    }

    /// Hosts one of the process's components (again, if it ended on its own). The sweeper is
    /// let finish at shutdown: aborted mid-finalize, an approved command at the bridge would
    /// leave its result unpublished and its claim to its TTL, and the next sweeper would post
    /// it again. The store probe holds nothing and is aborted.
    fn host_process_component(&self, process: &mut Supervisor, component: Component) {
        let state = &self.shell.settler.state;
        match component {
            Component::StoreProbe => {
                let probe = watch_store(
                    self.shell.pipeline.store().clone(),
                    state.clone(),
                    process.token(),
                );
                process.host(component, Stop::Abort, async move {
                    probe.await;
                    Ok::<(), std::convert::Infallible>(())
                });
            }
            Component::ApprovalSweeper => {
                let sweep = crate::approval::sweeper::Sweeper {
                    shell: self.shell.clone(),
                    settings: self.approval.clone(),
                    names: self.control_names.clone(),
                    audit_exchange: self.settings.audit.exchange.clone(),
                    notifier: self.notifier.clone(),
                    wake: self.wake.clone(),
                }
                .run(process.token());
                process.host(component, Stop::Finish, async move {
                    sweep.await;
                    Ok::<(), std::convert::Infallible>(())
                });
            }
            // A session's components: hosted by its scope (`start_components`).
            Component::Consumer
            | Component::ControlReplica
            | Component::ApprovalDesk
            | Component::Canary => {}
        }
    }

    /// Lets in-flight commands finish within the drain timeout; the rest are aborted (their
    /// deliveries go back to the queue when the channel closes, and their claims expire).
    async fn drain(&self, tasks: &mut JoinSet<()>) {
        if tasks.is_empty() {
            return;
        }
        let drain = self.settings.processing.drain_timeout;
        tracing::info!(
            in_flight = tasks.len(),
            timeout_s = drain.as_secs(),
            "draining"
        );
        let drained =
            tokio::time::timeout(drain, async { while tasks.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            tracing::warn!(
                left = tasks.len(),
                "drain timeout; unfinished commands go back to the queue"
            );
        }
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }

    /// One connected session. `Ok` means an orderly shutdown; `Err` means reconnect.
    async fn session(
        &self,
        shutdown: &CancellationToken,
        consumed_any: &mut bool,
        tasks: &mut JoinSet<()>,
        process: &mut Supervisor,
    ) -> Result<(), SessionError> {
        let s = &self.settings;
        let endpoints = &s.endpoints;
        let (consume_conn, node) =
            broker::connect(endpoints, &format!("{}-consume", s.amqp.connection_name)).await?;
        // The publisher's connection goes to the same node (now the preferred one) while it
        // answers.
        let (publish_conn, publish_node) = match broker::connect(
            endpoints,
            &format!("{}-publish", s.amqp.connection_name),
        )
        .await
        {
            Ok(c) => c,
            Err(e) => {
                broker::close(&consume_conn, "publisher connection failed").await;
                endpoints.lost(&node);
                return Err(e.into());
            }
        };
        let publish_conn = std::sync::Arc::new(publish_conn);
        tracing::info!(node = %node.shown, publish_node = %publish_node.shown, "connected to the broker");
        self.set_node(Some(&node));
        let result = self
            .consume(
                &consume_conn,
                &publish_conn,
                shutdown,
                consumed_any,
                tasks,
                process,
            )
            .await;
        self.shell
            .settler
            .state
            .connected
            .store(false, Ordering::SeqCst);
        self.set_node(None);
        self.shell.publishers.send_replace(None);
        if result.is_err() {
            // Reconnect to the next node: the lost one may be gone for good.
            endpoints.lost(&node);
            endpoints.lost(&publish_node);
        }
        // Closing requeues whatever is still unacked. A dead connection never answers close-ok:
        // bounded, so the reconnect loop can't stall here.
        broker::close(&consume_conn, "command-poller session end").await;
        broker::close(&publish_conn, "command-poller session end").await;
        result
    }

    fn set_node(&self, node: Option<&broker::Node>) {
        *self
            .shell
            .settler
            .state
            .broker_node
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = node.map(|n| n.shown.clone());
    }

    /// Consumes for one session: sets it up, starts its components, then settles each
    /// delivery until shutdown or a broken session, following the gate's mode.
    async fn consume(
        &self,
        consume_conn: &lapin::Connection,
        publish_conn: &std::sync::Arc<lapin::Connection>,
        shutdown: &CancellationToken,
        consumed_any: &mut bool,
        tasks: &mut JoinSet<()>,
        process: &mut Supervisor,
    ) -> Result<(), SessionError> {
        let queue = &self.settings.topology.commands_queue;
        let Parts {
            publisher,
            replica,
            control_consumer,
            state_follower,
            mut commands,
            watch_ch,
            approvals_ch,
        } = self.set_up(consume_conn, publish_conn).await?;
        let mut session = process.scope();
        self.start_components(
            &mut session,
            replica,
            control_consumer,
            state_follower,
            approvals_ch,
            &publisher,
        );
        let state = &self.shell.settler.state;
        let mut mode = state.gate.watch();
        let components = &state.components;
        components.set(Component::Consumer, consumer_health(state.gate.mode()));
        state.connected.store(true, Ordering::SeqCst);
        let broken = CancellationToken::new();
        let mut stall_check = tokio::time::interval(STALL_CHECK_EVERY);
        stall_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_delivery = std::time::Instant::now();
        let outcome = loop {
            tokio::select! {
                _ = stall_check.tick() => {
                    if state.gate.mode() != Mode::Running
                        || !commands.is_active()
                        || last_delivery.elapsed() < STALL_CHECK_EVERY
                    {
                        continue;
                    }
                    if let Some(why) = consumer_stalled(&watch_ch, queue).await {
                        tracing::warn!(why = %why, "the commands consumer stalled; reconnecting");
                        break Err(SessionError::Lost(why));
                    }
                }
                _ = shutdown.cancelled() => break Ok(()),
                _ = broken.cancelled() => break Err(SessionError::Lost("publishing failed on the broker connection".into())),
                (component, ended) = session.ended() => {
                    // A component stopped by the shutdown itself is no lost session.
                    if shutdown.is_cancelled() { break Ok(()) }
                    break Err(SessionError::Lost(format!("{} ended: {}", component.name(), ended.err().unwrap_or_else(|| "without an error".into()))))
                }
                (component, ended) = process.ended() => {
                    // Its token is a child of the shutdown's: ended by the shutdown itself
                    // (the select may see that first), it is not restarted.
                    if shutdown.is_cancelled() { break Ok(()) }
                    tracing::error!(component = component.name(), error = ?ended.err(), "component ended on its own; starting it again");
                    self.host_process_component(process, component);
                }
                changed = mode.changed() => {
                    if changed.is_err() { continue; }
                    let now = *mode.borrow_and_update();
                    components.set(Component::Consumer, consumer_health(now));
                    if now == Mode::Running {
                        commands.start().await?;
                        tracing::info!("resumed: consuming commands");
                    } else {
                        commands.cancel().await?;
                        tracing::warn!(mode = now.as_str(), in_flight = tasks.len(), "stopped consuming; in-flight commands that have not reached the bridge go back to the queue");
                    }
                }
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                next = commands.next() => match next {
                    Some(Ok(delivery)) => {
                        *consumed_any = true;
                        last_delivery = std::time::Instant::now();
                        tasks.spawn(settle::delivery(self.shell.clone(), delivery, publisher.clone(), broken.clone()));
                    }
                    Some(Err(e)) => break Err(SessionError::Broker(e.into())),
                    None => break Err(SessionError::Lost("the broker cancelled the consumer".into())),
                }
            }
        };
        self.end_session(outcome, session, commands, tasks, process)
            .await
    }

    /// Ends a session: its components stop and the consumer reports how the session ended.
    /// An orderly shutdown stops deliveries first, then drains what is in flight and lets the
    /// approvals sweep in progress finish while the connections are still open, so results and
    /// acks go out. A lost session leaves its tasks running: see `run`.
    async fn end_session(
        &self,
        outcome: Result<(), SessionError>,
        mut session: Supervisor,
        mut commands: super::consumer::CommandConsumer,
        tasks: &mut JoinSet<()>,
        process: &mut Supervisor,
    ) -> Result<(), SessionError> {
        session.shut_down(Duration::ZERO).await;
        self.shell.settler.state.components.set(
            Component::Consumer,
            match &outcome {
                Ok(()) => Health::Stopped,
                Err(e) => Health::Failed {
                    error: e.to_string(),
                },
            },
        );
        if outcome.is_ok() {
            let _ = commands.cancel().await;
            self.drain(tasks).await;
            process
                .shut_down(self.settings.processing.drain_timeout)
                .await;
        }
        outcome
    }
}

/// How often the idempotency store is probed for `/readyz`.
const STORE_CHECK_EVERY: Duration = Duration::from_secs(2);

/// Probes the store (a claim and its release under a key no command can have) every
/// [`STORE_CHECK_EVERY`], recording whether it answered within that time.
pub(crate) async fn watch_store(
    store: Arc<dyn ResultStore>,
    state: Arc<PollerState>,
    stop: CancellationToken,
) {
    let key = format!("~readiness/{}", uuid::Uuid::new_v4().simple());
    let owner = "readiness-probe";
    let mut every = tokio::time::interval(STORE_CHECK_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        let probe = async {
            store.claim(&key, owner, STORE_CHECK_EVERY * 5).await?;
            store.release(&key, owner).await
        };
        let ok = matches!(
            tokio::time::timeout(STORE_CHECK_EVERY, probe).await,
            Ok(Ok(()))
        );
        state.components.set(
            Component::StoreProbe,
            if ok {
                Health::Running
            } else {
                Health::Failed {
                    error: "the idempotency store did not answer a claim and its release".into(),
                }
            },
        );
        let was = state.store_ok.swap(ok, Ordering::SeqCst);
        if was != ok {
            if ok {
                tracing::info!("idempotency store reachable again");
            } else {
                tracing::error!(
                    "idempotency store unreachable: not ready (commands wait, fail closed)"
                );
            }
        }
    }
}

/// The consumer's health in `mode`: consuming only while running.
fn consumer_health(mode: Mode) -> Health {
    let why = match mode {
        Mode::Running => return Health::Running,
        Mode::Paused => "not consuming while paused",
        Mode::Halted => "not consuming while halted",
    };
    Health::Waiting { why: why.into() }
}

#[derive(Debug, thiserror::Error)]
pub(super) enum SessionError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("{0}")]
    Lost(String),
}

impl From<lapin::Error> for SessionError {
    fn from(e: lapin::Error) -> Self {
        SessionError::Broker(e.into())
    }
}

fn reconnect_backoff(min: Duration, max: Duration) -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(min)
        .with_max_delay(max)
        .with_jitter()
        .without_max_times()
        .build()
}
