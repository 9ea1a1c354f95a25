//! The rmcp glue: the four tools, their input schemas and annotations, progress while the
//! poller works, and the stdio transport.

use super::outcome::answer;
use super::{command, CallError, FrontDoor};
use crate::intake::CommandType;
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{
    CallToolResult, ContentBlock, Implementation, ProgressNotificationParam, ServerCapabilities,
    ServerConfig,
};
use rmcp::service::RequestContext;
use rmcp::{tool, tool_handler, tool_router, RoleServer, ServerHandler, ServiceExt};
use schemars::JsonSchema;
use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;

/// Arguments of the three runbook commands.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CommandArgs {
    /// The integration: a lowercase slug of [a-z0-9_-], at most 64 characters, starting and
    /// ending with a letter or digit (e.g. "google", "mailchimp").
    #[schemars(regex(pattern = r"^[a-z0-9]([a-z0-9_-]{0,62}[a-z0-9])?$"))]
    pub service: String,
    /// Optional: your id for this action (1-128 of [A-Za-z0-9._:-]); send the same one again to
    /// retry safely (never executed twice). Generated when absent.
    #[schemars(regex(pattern = r"^[A-Za-z0-9._:-]{1,128}$"))]
    pub action_id: Option<String>,
    /// Optional: LOW, MEDIUM or HIGH. Only raises the runbook's severity for this command, never
    /// lowers it.
    pub severity: Option<Level>,
    /// Optional: why you ask, in plain text (at most 500 characters). Approvers and the model
    /// judges read it as your words; it never changes what the policy and the hard rules decide.
    #[schemars(length(min = 1, max = 500))]
    pub justification: Option<String>,
}

/// A declared severity.
#[derive(Debug, Deserialize, JsonSchema)]
pub enum Level {
    #[serde(rename = "LOW")]
    Low,
    #[serde(rename = "MEDIUM")]
    Medium,
    #[serde(rename = "HIGH")]
    High,
}

impl Level {
    fn as_str(&self) -> &'static str {
        match self {
            Level::Low => "LOW",
            Level::Medium => "MEDIUM",
            Level::High => "HIGH",
        }
    }
}

/// Arguments of `get_action`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ActionArgs {
    /// The action_id an earlier call of this front door returned.
    pub action_id: String,
}

#[derive(Clone)]
pub struct Tools {
    /// stdio: the one agent's front door. HTTP: none; each request carries its client's, put
    /// there by the authentication layer ([`http`]).
    door: Option<Arc<FrontDoor>>,
    tool_router: ToolRouter<Self>,
}

/// How often a waiting call reports progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

fn tool_error(text: String) -> CallToolResult {
    CallToolResult::error(vec![ContentBlock::text(text)])
}

impl Tools {
    pub fn new(door: FrontDoor) -> Self {
        Self {
            door: Some(Arc::new(door)),
            tool_router: Self::tool_router(),
        }
    }

    /// Tools whose every call takes its agent from the request (HTTP).
    pub fn per_request() -> Self {
        Self {
            door: None,
            tool_router: Self::tool_router(),
        }
    }

    /// The front door of this call: the process's (stdio) or the authenticated client's (HTTP).
    fn door(&self, ctx: &RequestContext<RoleServer>) -> Result<Arc<FrontDoor>, CallToolResult> {
        if let Some(d) = &self.door {
            return Ok(d.clone());
        }
        ctx.extensions
            .get::<axum::http::request::Parts>()
            .and_then(|p| p.extensions.get::<Arc<FrontDoor>>())
            .cloned()
            .ok_or_else(|| {
                tool_error("not authenticated: no agent identity on this request".into())
            })
    }

    /// Sends a runbook command and answers with its result, reporting progress while the poller
    /// works (judges, bridge) when the client asked for it.
    async fn run(
        &self,
        t: CommandType,
        args: CommandArgs,
        ctx: RequestContext<RoleServer>,
    ) -> CallToolResult {
        let door = match self.door(&ctx) {
            Ok(d) => d,
            Err(e) => return e,
        };
        let cmd = match command(
            t,
            &args.service,
            args.action_id.as_deref(),
            args.severity.as_ref().map(Level::as_str),
        )
        .and_then(|c| c.with_justification(args.justification.as_deref()))
        {
            Ok(c) => c,
            Err(e) => return tool_error(format!("REJECTED before sending: {e}")),
        };
        let waiting = door.call(&cmd);
        self.answer_with_progress(waiting, ctx, t).await
    }

    async fn answer_with_progress(
        &self,
        waiting: impl std::future::Future<Output = Result<crate::outcome::ResultMessage, CallError>>,
        ctx: RequestContext<RoleServer>,
        t: CommandType,
    ) -> CallToolResult {
        tokio::pin!(waiting);
        let token = ctx.meta.get_progress_token();
        let mut tick = tokio::time::interval(PROGRESS_EVERY);
        let mut n = 0.0;
        let result = loop {
            tokio::select! {
                r = &mut waiting => break r,
                _ = tick.tick() => {
                    if let Some(token) = &token {
                        n += 1.0;
                        let what = if t == CommandType::RefreshToken {
                            "waiting for the poller: the judges decide, then the bridge acts"
                        } else {
                            "waiting for the poller"
                        };
                        let _ = ctx
                            .peer
                            .notify_progress(ProgressNotificationParam::new(token.clone(), n).with_message(what))
                            .await;
                    }
                }
            }
        };
        match result {
            Ok(r) => {
                let a = answer(&r);
                let mut out = if a.is_error {
                    CallToolResult::structured_error(a.structured)
                } else {
                    CallToolResult::structured(a.structured)
                };
                out.content = vec![ContentBlock::text(a.text)];
                out
            }
            Err(e) => tool_error(e.to_string()),
        }
    }
}

#[tool_router]
impl Tools {
    /// Check an integration's status (SOP-INT-01): low risk, read-only, executed without judges.
    #[tool(annotations(
        title = "Check integration status",
        read_only_hint = true,
        destructive_hint = false,
        idempotent_hint = true,
        open_world_hint = true
    ))]
    async fn check_integration_status(
        &self,
        Parameters(args): Parameters<CommandArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> CallToolResult {
        self.run(CommandType::CheckIntegrationStatus, args, ctx)
            .await
    }

    /// Refresh an integration's OAuth token (SOP-INT-02): medium risk, decided by a panel of
    /// judges; if they don't approve, it waits for a human (NEEDS_APPROVAL, with an approval id
    /// and an expiry: follow it with get_action).
    #[tool(annotations(
        title = "Refresh token",
        read_only_hint = false,
        destructive_hint = false,
        idempotent_hint = true,
        open_world_hint = true
    ))]
    async fn refresh_token(
        &self,
        Parameters(args): Parameters<CommandArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> CallToolResult {
        self.run(CommandType::RefreshToken, args, ctx).await
    }

    /// Ask to connect a new integration (SOP-INT-03): always BLOCKED by policy, since new
    /// integrations need a manual security and permissions review; the request is recorded and
    /// humans are alerted, nothing is executed.
    #[tool(annotations(
        title = "Connect integration",
        read_only_hint = false,
        destructive_hint = true,
        idempotent_hint = true,
        open_world_hint = true
    ))]
    async fn connect_integration(
        &self,
        Parameters(args): Parameters<CommandArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> CallToolResult {
        self.run(CommandType::ConnectIntegration, args, ctx).await
    }

    /// The stored outcome of an earlier call through this front door: a pending approval and
    /// its expiry, or the final status. Never executes anything.
    #[tool(annotations(
        title = "Get action",
        read_only_hint = true,
        destructive_hint = false,
        idempotent_hint = true,
        open_world_hint = false
    ))]
    async fn get_action(
        &self,
        Parameters(args): Parameters<ActionArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> CallToolResult {
        let door = match self.door(&ctx) {
            Ok(d) => d,
            Err(e) => return e,
        };
        let waiting = door.get(&args.action_id);
        self.answer_with_progress(waiting, ctx, CommandType::CheckIntegrationStatus)
            .await
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for Tools {
    fn get_info(&self) -> ServerConfig {
        let mut info = ServerConfig::default();
        info.capabilities = ServerCapabilities::builder().enable_tools().build();
        info.server_info = Implementation::new("command-poller", env!("CARGO_PKG_VERSION"));
        info.instructions = Some(
            "The MCP Orchestrator's runbook actions, as your agent's own broker user. Every call is a command checked by policy and, for token refreshes, judges; a NEEDS_APPROVAL answer means a human decides: follow it with get_action.".into(),
        );
        info
    }
}

/// Serves the tools on stdin/stdout until the host closes them.
pub async fn serve_stdio(door: FrontDoor) -> anyhow::Result<()> {
    let service = Tools::new(door)
        .serve(rmcp::transport::stdio())
        .await
        .map_err(|e| anyhow::anyhow!("mcp: {e}"))?;
    service
        .waiting()
        .await
        .map_err(|e| anyhow::anyhow!("mcp: {e}"))?;
    Ok(())
}

pub mod http;
