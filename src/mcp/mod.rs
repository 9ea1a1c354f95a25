//! The MCP front door: the runbook's commands as Model Context Protocol tools, for agents whose
//! host speaks MCP instead of AMQP.
//!
//! In: tool calls (`check_integration_status`, `refresh_token`, `connect_integration`,
//! `get_action`) from one agent's host over stdio, or from many hosts over streamable HTTP, each
//! authenticated as its own agent. Out: commands published to the commands
//! exchange under the agent's own broker user (the `user_id` the broker checks), and the poller's
//! result for each, read back over direct reply-to on the same connection, as structured content
//! plus a short text for the model. The front door holds nothing but the agent's credentials: no
//! tool argument changes the routing key, the identity or the severity floor.
//!
//! [`outcome`] turns a result into what the tool answers (pure); [`server`] is the rmcp glue.

pub mod outcome;
pub mod server;

use crate::broker::names::{message_type, DIRECT_REPLY_TO};
use crate::broker::{self, BrokerError, Outgoing, Publisher};
use crate::intake::{ActionId, CommandType, Service, Severity};
use crate::outcome::ResultMessage;
use futures::StreamExt;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Why a tool call has no result.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// A tool argument the poller would refuse: named, nothing sent.
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("the broker is unavailable ({0}); nothing was sent")]
    Broker(#[from] BrokerError),
    #[error("broker: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("no result from the poller within {0:?}: it may be stopped, paused or halted; the command stays queued (call get_action with its action_id later)")]
    NoResult(Duration),
    #[error("action {0} was not sent through this front door (it remembers the last 100,000 actions it sent since it started)")]
    Unknown(String),
}

/// One agent's front door.
pub struct FrontDoor {
    /// The agent's broker nodes: their user is the identity on every command.
    pub endpoints: broker::Endpoints,
    pub commands_exchange: String,
    /// How long a call waits for its result.
    pub deadline: Duration,
    /// The commands sent since start (the last [`REMEMBERED`]), by action_id: `get_action`
    /// sends the same command again, and the poller answers with what it stored (never executing
    /// it twice).
    sent: Mutex<Journal>,
    /// The agent's one broker connection, opened on first use and again once it is lost; each
    /// call takes a channel of its own on it (a connection per call cost a thread and megabytes
    /// each, and let one client open hundreds).
    conn: tokio::sync::Mutex<Option<Arc<lapin::Connection>>>,
}

/// How many sent commands a front door remembers for `get_action` (a long-lived HTTP front door
/// must not grow without bound).
pub const REMEMBERED: usize = 100_000;

/// The commands sent, oldest forgotten first.
#[derive(Default)]
struct Journal {
    by_id: HashMap<String, serde_json::Value>,
    order: VecDeque<String>,
}

impl Journal {
    fn remember(&mut self, id: &str, body: serde_json::Value) {
        if self.by_id.insert(id.to_owned(), body).is_none() {
            self.order.push_back(id.to_owned());
        }
        while self.order.len() > REMEMBERED {
            if let Some(old) = self.order.pop_front() {
                self.by_id.remove(&old);
            }
        }
    }
}

/// A tool's command, before it is sent.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCommand {
    pub command_type: CommandType,
    pub service: Service,
    pub severity: Severity,
    pub action_id: ActionId,
    /// Why the agent asks (shown to approvers and the LLM judges as quoted text).
    pub justification: Option<String>,
}

/// The runbook's default severity of each command type; an agent may declare more, never less
/// (the poller's policy floor holds whatever is declared).
pub fn default_severity(t: CommandType) -> Severity {
    match t {
        CommandType::CheckIntegrationStatus => Severity::Low,
        CommandType::RefreshToken => Severity::Medium,
        CommandType::ConnectIntegration => Severity::High,
    }
}

/// Parses a tool's arguments into a command: the type comes from the tool, never the arguments.
pub fn command(
    t: CommandType,
    service: &str,
    action_id: Option<&str>,
    severity: Option<&str>,
) -> Result<ToolCommand, CallError> {
    let service = Service::parse(service).map_err(|reason| CallError::Invalid {
        field: "service",
        reason,
    })?;
    let action_id = match action_id {
        Some(a) => ActionId::parse(a).map_err(|reason| CallError::Invalid {
            field: "action_id",
            reason,
        })?,
        None => ActionId::parse(&format!("mcp-{}", uuid::Uuid::new_v4().simple()))
            .expect("a generated id is valid"),
    };
    let floor = default_severity(t);
    let severity = match severity {
        None => floor,
        Some(s) => Severity::parse(s)
            .ok_or_else(|| CallError::Invalid {
                field: "severity",
                reason: format!("{s:?} is not LOW, MEDIUM or HIGH"),
            })?
            .max(floor),
    };
    Ok(ToolCommand {
        command_type: t,
        service,
        severity,
        action_id,
        justification: None,
    })
}

impl ToolCommand {
    /// The command with the agent's justification, checked as the poller will.
    pub fn with_justification(mut self, j: Option<&str>) -> Result<Self, CallError> {
        self.justification = j
            .map(crate::intake::Command::parse_justification)
            .transpose()
            .map_err(|reason| CallError::Invalid {
                field: "justification",
                reason,
            })?;
        Ok(self)
    }

    /// The command JSON the agent publishes.
    pub fn json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "action_id": self.action_id.as_str(),
            "command_type": self.command_type,
            "params": {"service": self.service.as_str()},
            "severity": self.severity,
        });
        if let Some(j) = &self.justification {
            v["justification"] = serde_json::Value::String(j.clone());
        }
        v
    }
}

impl FrontDoor {
    pub fn new(
        endpoints: broker::Endpoints,
        commands_exchange: String,
        deadline: Duration,
    ) -> Self {
        Self {
            endpoints,
            commands_exchange,
            deadline,
            sent: Mutex::new(Journal::default()),
            conn: tokio::sync::Mutex::new(None),
        }
    }

    /// The agent's connection: the open one, or a new one when there is none or it was lost.
    async fn connection(&self) -> Result<Arc<lapin::Connection>, CallError> {
        let mut held = self.conn.lock().await;
        if let Some(c) = held.as_ref().filter(|c| c.status().connected()) {
            return Ok(c.clone());
        }
        let (conn, _) = broker::connect(&self.endpoints, "command-poller-mcp").await?;
        let conn = Arc::new(conn);
        *held = Some(conn.clone());
        Ok(conn)
    }

    /// The agent's broker user.
    pub fn agent(&self) -> String {
        self.endpoints.user()
    }

    /// Sends `cmd` as the agent and waits for its result.
    pub async fn call(&self, cmd: &ToolCommand) -> Result<ResultMessage, CallError> {
        let body = cmd.json();
        self.sent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remember(cmd.action_id.as_str(), body.clone());
        self.send(&body, cmd.action_id.as_str(), message_type::COMMAND)
            .await
    }

    /// The stored outcome of an earlier call: a lookup the poller answers from its store and
    /// never acts on (EXPIRED when nothing is stored any more).
    pub async fn get(&self, action_id: &str) -> Result<ResultMessage, CallError> {
        let body = self
            .sent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .by_id
            .get(action_id)
            .cloned()
            .ok_or_else(|| CallError::Unknown(action_id.to_owned()))?;
        self.send(&body, action_id, message_type::LOOKUP).await
    }

    async fn send(
        &self,
        body: &serde_json::Value,
        action_id: &str,
        kind: &'static str,
    ) -> Result<ResultMessage, CallError> {
        let conn = self.connection().await?;
        let publisher = Publisher::open(&conn).await?;
        let answer = self.exchange(&publisher, body, action_id, kind).await;
        let _ = publisher.channel().close(200, "done".into()).await;
        answer
    }

    async fn exchange(
        &self,
        publisher: &Publisher,
        body: &serde_json::Value,
        action_id: &str,
        kind: &'static str,
    ) -> Result<ResultMessage, CallError> {
        let mut replies = broker::consume_direct_replies(publisher.channel()).await?;
        let bytes = serde_json::to_vec(body).expect("serializes");
        publisher
            .publish(&Outgoing {
                exchange: self.commands_exchange.clone(),
                routing_key: crate::agent::routing_key_for(&bytes),
                body: bytes,
                correlation_id: Some(action_id.to_owned()),
                message_type: kind,
                user_id: Some(self.agent()),
                reply_to: Some(DIRECT_REPLY_TO.into()),
                ..Default::default()
            })
            .await?;
        let deadline = tokio::time::Instant::now() + self.deadline;
        loop {
            match tokio::time::timeout_at(deadline, replies.next()).await {
                Ok(Some(Ok(d))) => {
                    if let Ok(r) = serde_json::from_slice::<ResultMessage>(&d.data) {
                        if r.action_id.as_deref() == Some(action_id) {
                            return Ok(r);
                        }
                    }
                }
                Ok(Some(Err(e))) => return Err(e.into()),
                Ok(None) | Err(_) => return Err(CallError::NoResult(self.deadline)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_journal_forgets_the_oldest_beyond_its_bound() {
        let mut j = Journal::default();
        for i in 0..REMEMBERED + 2 {
            j.remember(&format!("a-{i}"), serde_json::json!(i));
        }
        j.remember("a-5", serde_json::json!("again"));
        assert_eq!(j.by_id.len(), REMEMBERED);
        assert!(!j.by_id.contains_key("a-0") && !j.by_id.contains_key("a-1"));
        assert_eq!(j.by_id["a-5"], "again");
        assert!(j.by_id.contains_key(&format!("a-{}", REMEMBERED + 1)));
    }

    #[test]
    fn arguments_parse_and_can_raise_the_severity_never_lower_it() {
        let c = command(CommandType::RefreshToken, "google", Some("r-1"), None).unwrap();
        assert_eq!(c.severity, Severity::Medium);
        assert_eq!(c.json()["command_type"], "REFRESH_TOKEN");
        let c = command(CommandType::RefreshToken, "google", None, Some("LOW")).unwrap();
        assert_eq!(c.severity, Severity::Medium, "never below the runbook's");
        assert!(c.action_id.as_str().starts_with("mcp-"));
        let c = command(
            CommandType::CheckIntegrationStatus,
            "google",
            None,
            Some("HIGH"),
        )
        .unwrap();
        assert_eq!(c.severity, Severity::High);
        let e = command(CommandType::RefreshToken, "Google Ads!", None, None).unwrap_err();
        assert!(e.to_string().starts_with("service:"), "{e}");
        let e = command(CommandType::RefreshToken, "google", Some("a b"), None).unwrap_err();
        assert!(e.to_string().starts_with("action_id:"), "{e}");
        let e = command(CommandType::RefreshToken, "google", None, Some("URGENT")).unwrap_err();
        assert!(e.to_string().starts_with("severity:"), "{e}");
    }

    #[test]
    fn a_justification_is_checked_as_the_poller_checks_it_and_published_with_the_command() {
        let c = command(CommandType::RefreshToken, "google", Some("r-1"), None)
            .unwrap()
            .with_justification(Some("the newsletter at 09:00"))
            .unwrap();
        assert_eq!(c.json()["justification"], "the newsletter at 09:00");
        let plain = command(CommandType::RefreshToken, "google", Some("r-1"), None).unwrap();
        assert!(plain.json().get("justification").is_none());
        let e = plain
            .with_justification(Some(&"x".repeat(501)))
            .unwrap_err();
        assert!(e.to_string().starts_with("justification:"), "{e}");
    }
}
