//! One session's parts: what is set up on the broker before any command is consumed (the
//! publisher, the topology, the control replica with the stored state applied, the approvals
//! queue, the commands consumer), and the components that run beside the consumer for the
//! session in its supervisor scope (the control listener, the canary, the approvals desk).

use super::consumer::{CommandConsumer, SETUP_TIMEOUT};
use super::lifecycle::SessionError;
use super::supervisor::{Stop, Supervisor};
use super::Poller;
use crate::broker::{self, Publisher};
use crate::control::replica::Follower;
use crate::control::replica::Replica;
use crate::settle::state::Component;
use lapin::options::BasicQosOptions;
use poller_core::control::Mode;
use std::sync::Arc;

/// What a session consumes with, set up in order.
pub(super) struct Parts {
    pub publisher: Publisher,
    pub replica: Arc<Replica>,
    pub control_consumer: lapin::Consumer,
    pub state_follower: Follower,
    pub commands: CommandConsumer,
    /// A channel of its own for the stall check.
    pub watch_ch: lapin::Channel,
    pub approvals_ch: lapin::Channel,
}

impl Poller {
    /// Sets the session up, bounded: a broker half-way through a restart can leave a call
    /// without an answer, and the session must then start over rather than wait forever.
    pub(super) async fn set_up(
        &self,
        consume_conn: &lapin::Connection,
        publish_conn: &std::sync::Arc<lapin::Connection>,
    ) -> Result<Parts, SessionError> {
        match tokio::time::timeout(
            SETUP_TIMEOUT,
            self.set_up_unbounded(consume_conn, publish_conn),
        )
        .await
        {
            Ok(parts) => parts,
            Err(_) => Err(SessionError::Lost(format!(
                "setting up the session took longer than {SETUP_TIMEOUT:?}"
            ))),
        }
    }

    async fn set_up_unbounded(
        &self,
        consume_conn: &lapin::Connection,
        publish_conn: &std::sync::Arc<lapin::Connection>,
    ) -> Result<Parts, SessionError> {
        let s = &self.settings;
        let publisher = Publisher::open_shared(publish_conn.clone()).await?;
        self.shell.publishers.send_replace(Some(publisher.clone()));
        let ch = consume_conn.create_channel().await?;
        broker::declare(&ch, &s.topology).await?;
        broker::declare_audit(consume_conn, &s.audit, &s.topology.replication).await?;

        // Control first: the stored state is applied before any command is consumed.
        let replica = Arc::new(Replica::new(
            s.control.clone(),
            self.control_names.clone(),
            self.shell.settler.state.gate.clone(),
            self.shell.settler.state.clone(),
            self.shell.pipeline.policy().clone(),
            self.shell.settler.state.reload.clone(),
            Arc::new(self.shell.pipeline.cutter()),
        ));
        let control_ch = consume_conn.create_channel().await?;
        let state_ch = consume_conn.create_channel().await?;
        let (control_consumer, state_follower) = replica
            .attach(consume_conn, &control_ch, &state_ch, &publisher)
            .await?;
        ch.basic_qos(s.processing.max_in_flight, BasicQosOptions::default())
            .await?;
        // Approval decisions: accepted whatever the mode (an approval while halted waits
        // for the lift in its record, not in the queue).
        let approvals_ch = consume_conn.create_channel().await?;
        broker::declare_approvals(
            &approvals_ch,
            &self.approval,
            &s.topology.dead_letter_exchange,
            s.topology.delivery_limit,
            &s.topology.replication,
        )
        .await?;
        // A consumer the broker stopped feeding without the stream ending or the
        // connection reporting it: checked while running and quiet (`consumer_stalled`).
        let watch_ch = consume_conn.create_channel().await?;
        let mut commands = CommandConsumer::new(
            ch.clone(),
            s.topology.commands_queue.clone(),
            self.instance.clone(),
        );
        if self.shell.settler.state.gate.mode() == Mode::Running {
            commands.start().await?;
        } else {
            tracing::warn!(
                mode = self.shell.settler.state.gate.mode().as_str(),
                "not consuming: the system is paused or halted"
            );
        }
        Ok(Parts {
            publisher,
            replica,
            control_consumer,
            state_follower,
            commands,
            watch_ch,
            approvals_ch,
        })
    }

    /// Starts the session's components in its supervisor scope: the control listener (levers
    /// and the state stream), the canary when enabled, and the approvals desk. Each is aborted
    /// when the session ends.
    pub(super) fn start_components(
        &self,
        session: &mut Supervisor,
        replica: Arc<Replica>,
        control_consumer: lapin::Consumer,
        state_follower: Follower,
        approvals_ch: lapin::Channel,
        publisher: &Publisher,
    ) {
        {
            let (replica, publisher) = (replica.clone(), publisher.clone());
            session.host(Component::ControlReplica, Stop::Abort, async move {
                replica
                    .listen(control_consumer, state_follower, publisher)
                    .await
            });
        }
        if self.settings.canary.enabled {
            let watch = super::canary::watch(
                self.settings.canary.clone(),
                self.shell.clone(),
                replica,
                publisher.clone(),
            );
            session.host(Component::Canary, Stop::Abort, async move {
                watch.await;
                Ok::<(), std::convert::Infallible>(())
            });
        }
        let desk = self
            .desk
            .clone()
            .listen(approvals_ch, publisher.clone(), session.token());
        session.host(Component::ApprovalDesk, Stop::Abort, desk);
    }
}
