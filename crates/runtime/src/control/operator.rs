//! The operator's side: `pause`, `resume`, `halt`, `status`, `quarantine`, `release` and
//! `policy reload` from any machine that reaches the broker.
//!
//! In: the operator's broker URL (its user is the `user_id` replicas check) and a command.
//! Out: the stored state updated (so replicas starting later obey it) and every live replica's
//! answer, collected over direct reply-to for a short while.

use super::replica::{state_writer, ReplicaReply};
use super::state_log::{self, Folded, StateReader};
use crate::broker::declare_control;
use crate::broker::{self, BrokerError, Outgoing, Publisher};
use futures::StreamExt;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use poller_core::control::ControlSettings;
use poller_core::control::{transition, Actor, ControlCommand, ControlState};
use serde::Serialize;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("broker: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("refused: {0}")]
    Refused(String),
    #[error("the stored control state: {0}")]
    State(String),
}

/// What an operator command reports.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub request_id: String,
    /// The stored state after the command (for `status`: as read).
    pub stored_state: Option<ControlState>,
    /// Writer of the stored state.
    pub stored_by: Option<String>,
    pub replicas: Vec<ReplicaReply>,
    /// Commands waiting in the commands queue.
    pub queue_depth: Option<u32>,
    pub note: Option<String>,
}

pub struct Operator<'a> {
    /// The control section: exchanges, the state stream, who the operators are.
    pub control: &'a ControlSettings,
    /// The queue whose depth the report shows.
    pub commands_queue: &'a str,
    /// The poller's broker user (it may write the stored state too).
    pub poller_user: String,
    /// How the control queue and stream spread over a cluster, if the operator declares them.
    pub replication: crate::broker::settings::Replication,
    /// The operator's broker nodes; their user must be in `control.operators`.
    pub endpoints: broker::Endpoints,
    /// How long to collect replica answers.
    pub wait: Duration,
    /// How long `revoke` and `disconnect` wait for the replica that carries them out: the
    /// bridge client's longest call (its retry budget and two request timeouts) and a margin.
    pub cut_wait: Duration,
}

impl Operator<'_> {
    /// Connects as the operator, runs `cmd`, and closes the connection.
    pub async fn run(&self, cmd: ControlCommand) -> Result<Report, OperatorError> {
        let user = self.endpoints.user();
        let (conn, _) = broker::connect(&self.endpoints, "command-poller-operator").await?;
        let report = self.run_on(&conn, &user, cmd).await;
        broker::close(&conn, "done").await;
        report
    }

    /// Runs `cmd` on an open connection of the operator `user` (the console keeps one per
    /// session); the connection stays open.
    pub async fn run_on(
        &self,
        conn: &lapin::Connection,
        user: &str,
        cmd: ControlCommand,
    ) -> Result<Report, OperatorError> {
        self.run_known(conn, user, cmd, None).await
    }

    /// As [`Operator::run_on`]; for `status`, `known` is the stored state as a follower of the
    /// stream already folded it (the console's), so the stream is not read again. A lever
    /// always reads it afresh: it is decided on, and written after, the latest entry.
    pub async fn run_known(
        &self,
        conn: &lapin::Connection,
        user: &str,
        cmd: ControlCommand,
        known: Option<Folded>,
    ) -> Result<Report, OperatorError> {
        let c = self.control;
        let user = user.to_owned();
        // An operator may not configure anything (least privilege): where the declare is
        // refused, the control topology (the replicas declare it) must simply exist.
        let declared = conn.create_channel().await?;
        match declare_control(&declared, c, &self.replication).await {
            Ok(()) => {}
            Err(e) if e.is_access_refused() => expect_control(conn, c).await?,
            Err(e) => return Err(e.into()),
        }
        let ch = conn.create_channel().await?;
        let publisher = Publisher::open(conn).await?;
        let (folded, after) = match known.filter(|_| matches!(cmd, ControlCommand::Status { .. })) {
            Some(folded) => (folded, None),
            None => self.read_state(conn).await?,
        };
        let mut note = None;
        // What the replicas enforce, and what a lever is decided on: an untrusted state is the
        // last trusted one made stricter (a halt still needs --lift-halt, a quarantine its
        // release).
        let current = match &folded {
            Folded::Untrusted { why, .. } => {
                note = Some(format!(
                    "the stored state is untrusted ({why}): replicas enforce the last trusted state made stricter until an operator decides"
                ));
                folded
                    .effective()
                    .expect("untrusted has an effective state")
            }
            other => other.effective().unwrap_or_else(ControlState::initial),
        };
        let mut stored_state = match &folded {
            Folded::State(s) => Some(s.clone()),
            _ => None,
        };
        let mut stored_by = stored_state.as_ref().map(|s| s.by.clone());
        if !matches!(cmd, ControlCommand::Status { .. }) {
            // Checked here for a clear error; every replica checks again.
            let new = transition(&current, &cmd, &Actor::Operator(user.clone()))
                .map_err(|r| OperatorError::Refused(r.to_string()))?;
            if !c.operators.iter().any(|o| o == &user) {
                return Err(OperatorError::Refused(format!(
                    "{user} is not in control.operators; replicas would refuse it"
                )));
            }
            let d = decide(c, &cmd, &current, new, &user)?;
            let new = d.new;
            note = d.note.or(note);
            if let Some(change) = d.change {
                // A mode decided on what replicas enforce makes the stored state trusted again.
                let decides = matches!(change, state_log::Change::Mode { .. });
                state_log::write(&publisher, c, after, change, &new, &user).await?;
                if decides {
                    note = None;
                }
                stored_state = Some(new);
                stored_by = Some(user.clone());
            }
        }

        let (mut replicas, unheard) = self.send(&publisher, &cmd, &user).await?;
        if unheard.is_some() {
            note = unheard;
        }
        let depth = ch
            .queue_declare(
                self.commands_queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .ok()
            .map(|q| q.message_count());
        // The connection may be a console session's, kept open: close what this run opened.
        for done in [&ch, &declared, publisher.channel()] {
            let _ = done.close(200, "done".into()).await;
        }
        replicas.sort_by(|a, b| a.instance.cmp(&b.instance));
        Ok(Report {
            request_id: cmd.request_id().to_owned(),
            stored_state,
            stored_by,
            replicas,
            queue_depth: depth,
            note,
        })
    }

    /// The stored state, read afresh from the stream, and the offset of its last entry.
    async fn read_state(
        &self,
        conn: &lapin::Connection,
    ) -> Result<(Folded, Option<u64>), OperatorError> {
        let state_ch = conn.create_channel().await?;
        let classify = state_writer(&self.control.operators, &self.poller_user);
        let reader = StateReader::open(&state_ch, self.control, classify)
            .await
            .map_err(|e| OperatorError::State(e.to_string()))?;
        let read = (reader.state().clone(), reader.position());
        reader.close().await;
        let _ = state_ch.close(200, "read".into()).await;
        Ok(read)
    }

    /// Sends `cmd` to every live replica and collects their answers until `wait` runs out;
    /// with a note when no replica is listening.
    async fn send(
        &self,
        publisher: &Publisher,
        cmd: &ControlCommand,
        user: &str,
    ) -> Result<(Vec<ReplicaReply>, Option<String>), OperatorError> {
        let c = self.control;
        // Direct reply-to: consume the pseudo-queue before publishing on the same channel.
        let mut replies = broker::consume_direct_replies(publisher.channel()).await?;
        let sent = publisher
            .publish(&Outgoing {
                exchange: c.exchange.clone(),
                routing_key: cmd.routing_key().into(),
                body: serde_json::to_vec(cmd).expect("serializes"),
                message_type: crate::broker::names::message_type::CONTROL,
                user_id: Some(user.to_owned()),
                reply_to: Some(crate::broker::names::DIRECT_REPLY_TO.into()),
                ..Default::default()
            })
            .await;
        let mut listening = true;
        let mut note = None;
        match sent {
            Ok(()) => {}
            Err(BrokerError::Unroutable { .. }) => {
                listening = false;
                note = Some(
                    "no live replica is listening; the stored state applies when replicas start"
                        .into(),
                );
            }
            Err(e) => return Err(e.into()),
        }
        let mut replicas = Vec::new();
        // Every live replica answers, whatever the stored state says.
        if listening {
            let deadline = Instant::now() + self.wait;
            // A cut is answered by the replica that carried it out once the bridge has: wait
            // for that report too, within the bridge's own bound.
            let cut_deadline = cmd
                .cut()
                .map(|_| Instant::now() + self.cut_wait.max(self.wait));
            loop {
                let reported = replicas.iter().any(|r: &ReplicaReply| r.cut.is_some());
                let until = match cut_deadline {
                    Some(d) if !reported => d,
                    _ => deadline,
                };
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                match tokio::time::timeout(left, replies.next()).await {
                    Ok(Some(Ok(d))) => {
                        if let Ok(r) = serde_json::from_slice::<ReplicaReply>(&d.data) {
                            if r.request_id == cmd.request_id() {
                                replicas.push(r);
                            }
                        }
                    }
                    Ok(_) | Err(_) => break,
                }
            }
        }
        if cmd.cut().is_some() && listening && !replicas.iter().any(|r| r.cut.is_some()) {
            note = Some(format!(
                "the cut is stored (every replica refuses the service's REFRESH_TOKEN), but no replica reported the bridge's answer within {} s: revoke by hand in the service's admin panel, or run the lever again",
                self.cut_wait.as_secs()
            ));
        }
        Ok((replicas, note))
    }
}

/// What a lever stores, the state after it, and a note for the operator.
struct Decided {
    change: Option<state_log::Change>,
    new: ControlState,
    note: Option<String>,
}

/// What a lever stores: a loosening lever under two people's rules is parked as a proposal; a
/// second is counted (and applies the lever when it completes it); anything else is stored as
/// it is.
fn decide(
    c: &ControlSettings,
    cmd: &ControlCommand,
    current: &ControlState,
    new: ControlState,
    user: &str,
) -> Result<Decided, OperatorError> {
    use poller_core::control::loosening;
    poller_core::control::grant::in_force(current, cmd)
        .map_err(|r| OperatorError::Refused(r.to_string()))?;
    let rules = c.rules();
    if matches!(cmd, ControlCommand::ApprovePolicy { .. }) && !rules.two_people() {
        return Err(OperatorError::Refused("one operator may load a looser policy here (control.loosening_approvals = 1): `command-poller policy reload` is enough".into()));
    }
    let at = crate::clock::now_rfc3339();
    if let ControlCommand::Second {
        proposal, digest, ..
    } = cmd
    {
        let after = loosening::second(current, proposal, digest, user, &at, rules)
            .map_err(|e| OperatorError::Refused(e.to_string()))?;
        let note = if after.proposals.contains_key(proposal) {
            format!("seconded proposal {proposal}; it needs more operators still")
        } else {
            format!("seconded proposal {proposal}: it has the operators it needs and is applied")
        };
        let change = state_log::Change::Second {
            id: proposal.clone(),
            digest: digest.clone(),
            at,
        };
        return Ok(Decided {
            change: Some(change),
            new: after,
            note: Some(note),
        });
    }
    if !(rules.two_people() && loosening::loosens(current, &new)) {
        return Ok(Decided {
            change: stored_change(cmd, &new, current.seq),
            new,
            note: None,
        });
    }
    let expires_at = crate::clock::rfc3339(crate::clock::unix_now() + c.loosening_expiry.as_secs());
    let p = loosening::propose(cmd, user, &at, &expires_at);
    let id = cmd.request_id().to_owned();
    let note = format!(
        "a loosening lever: parked as proposal {id} until {} other operator(s) second it, before {expires_at}: command-poller second {id} --digest {} --reason \"...\"",
        rules.loosening_approvals - 1,
        p.digest
    );
    let mut parked = current.clone();
    parked.proposals.insert(id.clone(), p.clone());
    let change = state_log::Change::Propose { id, proposal: p };
    Ok(Decided {
        change: Some(change),
        new: parked,
        note: Some(note),
    })
}

/// What a lever stores in the state stream, if anything.
fn stored_change(cmd: &ControlCommand, new: &ControlState, base: u64) -> Option<state_log::Change> {
    match cmd {
        // Nothing stored: each replica reloads its own file.
        // Nothing stored: each replica records it in the audit trail. (A second is stored by
        // `decide`.)
        ControlCommand::ReloadPolicy { .. }
        | ControlCommand::ApprovePolicy { .. }
        | ControlCommand::Second { .. }
        | ControlCommand::Status { .. }
        | ControlCommand::OpenIncident { .. }
        | ControlCommand::CloseIncident { .. } => None,
        // Its own entry, applied in stream order: never a compare-and-set on the mode.
        ControlCommand::Quarantine { agent, .. } | ControlCommand::Release { agent, .. } => {
            Some(state_log::Change::Agent {
                agent: agent.clone(),
                quarantined: new.quarantined.get(agent).cloned(),
            })
        }
        // Its own entry too: the cut is stored before any replica asks the bridge to carry it
        // out, so the service's refreshes are refused from then on, whatever the bridge says.
        ControlCommand::Revoke { service, .. }
        | ControlCommand::Disconnect { service, .. }
        | ControlCommand::Reconnected { service, .. } => Some(state_log::Change::Service {
            service: service.clone(),
            revoked: new.revoked.get(service).cloned(),
        }),
        // Its own entry: where one operator may loosen, the grant as it took effect; under two
        // people's rules a grant is a proposal (`decide`). A withdrawal is one operator's.
        ControlCommand::Grant { request_id: id, .. }
        | ControlCommand::Ungrant { grant: id, .. } => Some(state_log::Change::Grant {
            id: id.clone(),
            grant: new.grants.get(id).cloned(),
        }),
        // Decided on the sequence read: if another change landed in between, the fold lets
        // this one apply only if it is stricter (compare-and-set).
        ControlCommand::Pause { .. }
        | ControlCommand::Halt { .. }
        | ControlCommand::Resume { .. } => Some(state_log::Change::Mode { base }),
    }
}

/// Checks, without configuring anything, that the control exchanges and the state stream exist.
async fn expect_control(
    conn: &lapin::Connection,
    c: &poller_core::control::ControlSettings,
) -> Result<(), OperatorError> {
    broker::expect_exist(
        conn,
        &[c.exchange.as_str(), c.state_exchange.as_str()],
        &[c.state_queue.as_str()],
    )
    .await
    .map_err(|e| {
        OperatorError::Refused(format!(
            "the control topology is missing (no replica has declared it yet?): {e}"
        ))
    })
}

pub fn new_request_id() -> String {
    uuid::Uuid::new_v4().to_string()
}
