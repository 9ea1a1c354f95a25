//! Bridge: the fourth pipeline stage, the call to the Apps Script web app.
//!
//! In: a [`BridgeRequest`] for an approved command. Out: the bridge's JSON answer (the
//! runbook's "tool result") or a [`BridgeError`] that says which leg failed and whether it is
//! worth retrying. [`client::AppsScriptBridge`] speaks the real contract;
//! [`simulator`] serves the same contract locally for the default setup, tests and benchmarks.

pub mod signing;

use crate::intake::CommandType;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

/// What the bridge is asked to do: an agent's command, or an operator's cut at the provider
/// (never an agent's: intake refuses those types from the commands queue).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Operation {
    CheckIntegrationStatus,
    RefreshToken,
    ConnectIntegration,
    /// `command-poller revoke`: revoke the service's tokens at the provider where it allows,
    /// delete them from the bridge either way.
    RevokeCredentials,
    /// `command-poller disconnect`: every credential of the service revoked and deleted.
    DisconnectIntegration,
}

impl From<CommandType> for Operation {
    fn from(t: CommandType) -> Self {
        match t {
            CommandType::CheckIntegrationStatus => Operation::CheckIntegrationStatus,
            CommandType::RefreshToken => Operation::RefreshToken,
            CommandType::ConnectIntegration => Operation::ConnectIntegration,
        }
    }
}

/// The JSON body POSTed to the bridge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BridgeRequest {
    pub action_id: String,
    pub command_type: Operation,
    pub params: BridgeParams,
    pub agent: String,
    /// Whether the broker verified `agent` (an unverified name is another agent to the bridge).
    pub agent_verified: bool,
    /// RFC 3339.
    pub requested_at: String,
    /// Ask only for the answer the bridge remembers for this request; never act. Sent after
    /// the answer to an executed request was lost (its 302 came back, its GET failed).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub lookup: bool,
}

impl BridgeRequest {
    /// The bridge's dedup key: the agent (verified or not) and the action_id, as the poller
    /// keys results, so one agent's id can never answer another agent's action.
    pub fn dedup_key(&self) -> String {
        let prefix = if self.agent_verified { "v" } else { "u" };
        format!("{prefix}:{}/{}", self.agent, self.action_id)
    }

    /// SHA-256 (hex) over what the bridge acts on: `["bridge/v1", agent, agent_verified,
    /// action_id, command_type, service]` as compact JSON (`requested_at` left out: it changes
    /// on every retry). The web app computes the same; a repeated key with another digest is a
    /// reused action_id, refused rather than answered with the other request's answer.
    pub fn digest(&self) -> String {
        use sha2::{Digest, Sha256};
        let canonical = serde_json::json!([
            "bridge/v1",
            self.agent,
            self.agent_verified,
            self.action_id,
            self.command_type,
            self.params.service,
        ]);
        hex::encode(Sha256::digest(canonical.to_string().as_bytes()))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BridgeParams {
    pub service: String,
}

/// A successful bridge call.
#[derive(Debug, Clone, PartialEq)]
pub struct BridgeAnswer {
    /// The bridge's `{"status":"success", ...}` object.
    pub tool_result: serde_json::Value,
    /// POSTs made (1 when nothing was retried).
    pub attempts: u32,
}

/// Why a bridge call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BridgeError {
    /// The bridge answered `{"status":"error", ...}`.
    #[error("bridge error: {error}")]
    Remote { error: String, retryable: bool },
    /// Not the JSON the contract promises (Apps Script reports failures as HTML pages).
    #[error("bridge answered something other than contract JSON (HTTP {status}): {message}")]
    Malformed {
        status: u16,
        message: String,
        retryable: bool,
    },
    /// An HTTP status the contract has no use for.
    #[error("bridge answered HTTP {status} on the {leg} leg")]
    Http {
        leg: Leg,
        status: u16,
        retryable: bool,
    },
    #[error("transport error on the {leg} leg: {message}")]
    Transport { leg: Leg, message: String },
    #[error("302 from the bridge without a usable Location header")]
    BadRedirect,
    /// Asked for its remembered answer (`lookup`), the bridge has none for this request.
    #[error("the bridge remembers no answer for this request: {error}")]
    NotRemembered { error: String },
    /// The bridge ran the request (it answered 302) but its answer was lost, and asking the
    /// bridge for its remembered answer didn't give it either. Whether the action succeeded is
    /// unknown: never retried, a human checks the service.
    #[error("the bridge ran the action but its answer was lost: {cause}")]
    UnknownOutcome { cause: String },
    /// The operator gate closed (pause or halt) between attempts: no further POST was sent.
    /// Nothing ran on this attempt; the command goes back to the queue and, once resumed,
    /// asks the bridge again (which answers a repeated request as it did the first time).
    #[error("held by the operator gate after {attempts} attempt(s): {why}")]
    Held { attempts: u32, why: String },
    /// Retries used up; `last` is the final cause.
    #[error("gave up after {attempts} attempt(s) in {elapsed_ms} ms: {last}")]
    Exhausted {
        attempts: u32,
        elapsed_ms: u64,
        last: Box<BridgeError>,
    },
}

/// Which request of the POST-then-GET exchange failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leg {
    Post,
    Get,
}

impl std::fmt::Display for Leg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Leg::Post => "POST",
            Leg::Get => "GET",
        })
    }
}

impl BridgeError {
    /// Worth another try before the action ran: the bridge's dedup (per agent and action_id, with
    /// the request digest) makes a repeated POST safe.
    pub fn is_transient(&self) -> bool {
        match self {
            BridgeError::Remote { retryable, .. }
            | BridgeError::Malformed { retryable, .. }
            | BridgeError::Http { retryable, .. } => *retryable,
            BridgeError::Transport { .. } => true,
            BridgeError::BadRedirect
            | BridgeError::Exhausted { .. }
            | BridgeError::UnknownOutcome { .. }
            | BridgeError::NotRemembered { .. }
            | BridgeError::Held { .. } => false,
        }
    }
}

/// Asked before every POST, the first and each retry: may another attempt start now? The
/// operator gate answers it, so a pause or halt acknowledged during a retry's backoff stops
/// the next POST, not only the first.
pub trait Admission: Send + Sync {
    /// `Err(why)` when no attempt may start.
    fn admit(&self) -> Result<(), String>;
}

/// Admits everything (for tools that run outside the poller's gate).
pub struct AlwaysAdmit;

impl Admission for AlwaysAdmit {
    fn admit(&self) -> Result<(), String> {
        Ok(())
    }
}

/// The boundary to whatever executes approved actions.
pub trait Bridge: Send + Sync {
    /// Executes `request`, asking `admission` before every POST.
    fn execute<'a>(
        &'a self,
        request: &'a BridgeRequest,
        admission: &'a dyn Admission,
    ) -> BoxFuture<'a, Result<BridgeAnswer, BridgeError>>;
}

/// Reads a bridge answer body: contract JSON, or a failure that says what came back.
pub fn interpret_body(
    status: u16,
    content_type: Option<&str>,
    body: &str,
) -> Result<serde_json::Value, BridgeError> {
    let looks_html =
        content_type.is_some_and(|c| c.contains("html")) || body.trim_start().starts_with('<');
    if !looks_html {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(body) {
            match v.get("status").and_then(|s| s.as_str()) {
                Some("success") => return Ok(v),
                Some("error") if v.get("remembered") == Some(&serde_json::Value::Bool(false)) => {
                    let error = v
                        .get("error")
                        .and_then(|e| e.as_str())
                        .unwrap_or("no answer remembered")
                        .to_owned();
                    return Err(BridgeError::NotRemembered { error });
                }
                Some("error") => {
                    let error = v
                        .get("error")
                        .and_then(|e| e.as_str())
                        .unwrap_or("unspecified error")
                        .to_owned();
                    let retryable = v
                        .get("retryable")
                        .and_then(|r| r.as_bool())
                        .unwrap_or(false);
                    return Err(BridgeError::Remote { error, retryable });
                }
                _ => {}
            }
        }
    }
    let message = html_message(body);
    // Apps Script's quota page reads "Service invoked too many times..."; rate limits pass.
    let lower = message.to_ascii_lowercase();
    let retryable = lower.contains("too many times")
        || lower.contains("rate limit")
        || lower.contains("try again later");
    Err(BridgeError::Malformed {
        status,
        message,
        retryable,
    })
}

/// The human-readable message of an error page: its title and first text, tags stripped,
/// shortened. Used in results so an operator sees what Google said.
pub fn html_message(body: &str) -> String {
    let mut text = String::with_capacity(body.len().min(4096));
    let mut in_tag = false;
    let mut skip_until: Option<&str> = None;
    let lower = body.to_ascii_lowercase();
    let mut i = 0;
    let bytes = body.as_bytes();
    while i < bytes.len() {
        if let Some(end) = skip_until {
            if lower[i..].starts_with(end) {
                i += end.len();
                skip_until = None;
            } else {
                i += 1;
            }
            continue;
        }
        if !in_tag && lower[i..].starts_with("<script") {
            skip_until = Some("</script>");
            continue;
        }
        if !in_tag && lower[i..].starts_with("<style") {
            skip_until = Some("</style>");
            continue;
        }
        let c = bytes[i];
        if c == b'<' {
            in_tag = true;
            text.push(' ');
        } else if c == b'>' {
            in_tag = false;
        } else if !in_tag {
            // Copy the whole UTF-8 character.
            let ch_len = utf8_len(c);
            if let Some(s) = body.get(i..i + ch_len) {
                text.push_str(s);
            }
            i += ch_len;
            continue;
        }
        i += 1;
    }
    let collapsed = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let collapsed = collapsed
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&amp;", "&")
        .replace("&lt;", "<")
        .replace("&gt;", ">");
    if collapsed.is_empty() {
        return "(empty body)".into();
    }
    collapsed.chars().take(300).collect()
}

fn utf8_len(first: u8) -> usize {
    match first {
        0x00..=0x7f => 1,
        0xc0..=0xdf => 2,
        0xe0..=0xef => 3,
        0xf0..=0xf7 => 4,
        _ => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_are_named_on_the_wire_as_the_web_app_reads_them() {
        for (op, name) in [
            (Operation::from(CommandType::RefreshToken), "REFRESH_TOKEN"),
            (
                Operation::from(crate::control::Cut::Revoked),
                crate::intake::OPERATOR_ONLY_TYPES[0],
            ),
            (
                Operation::from(crate::control::Cut::Disconnected),
                crate::intake::OPERATOR_ONLY_TYPES[1],
            ),
        ] {
            assert_eq!(serde_json::to_value(op).unwrap(), name);
        }
        for t in CommandType::ALL {
            assert_eq!(
                serde_json::to_value(Operation::from(t)).unwrap(),
                t.as_str()
            );
        }
    }

    #[test]
    fn the_digest_is_the_one_the_web_app_computes() {
        let r = BridgeRequest {
            action_id: "token-refresh-google-456".into(),
            command_type: CommandType::RefreshToken.into(),
            params: BridgeParams {
                service: "google".into(),
            },
            agent: "agent-7".into(),
            agent_verified: true,
            requested_at: "2026-11-27T12:00:00Z".into(),
            lookup: false,
        };
        // The same vector is checked in tests/apps-script/bridge.test.js.
        assert_eq!(
            serde_json::json!([
                "bridge/v1",
                "agent-7",
                true,
                "token-refresh-google-456",
                CommandType::RefreshToken,
                "google"
            ])
            .to_string(),
            r#"["bridge/v1","agent-7",true,"token-refresh-google-456","REFRESH_TOKEN","google"]"#
        );
        assert_eq!(
            r.digest(),
            "6ef5b0535d1af4c4f15f1e645dd40591241418d9ab6084f4e732e0e1abff853f"
        );
        let mut later = r.clone();
        later.requested_at = "2026-11-27T12:00:05Z".into();
        later.lookup = true;
        assert_eq!(
            later.digest(),
            r.digest(),
            "a retry, or a lookup, is the same request"
        );
        let mut other = r.clone();
        other.command_type = CommandType::CheckIntegrationStatus.into();
        assert_ne!(other.digest(), r.digest());
        assert_eq!(r.dedup_key(), "v:agent-7/token-refresh-google-456");
    }

    #[test]
    fn contract_json() {
        let v = interpret_body(
            200,
            Some("application/json"),
            r#"{"status":"success","integration_status":"CONNECTED"}"#,
        )
        .unwrap();
        assert_eq!(v["integration_status"], "CONNECTED");
        let e = interpret_body(
            200,
            None,
            r#"{"status":"error","error":"boom","retryable":true}"#,
        )
        .unwrap_err();
        assert!(e.is_transient());
        let e = interpret_body(
            200,
            None,
            r#"{"status":"error","error":"no answer remembered","retryable":false,"remembered":false}"#,
        )
        .unwrap_err();
        assert!(matches!(e, BridgeError::NotRemembered { .. }), "{e:?}");
        assert!(!e.is_transient());
        let e = interpret_body(200, None, r#"{"status":"weird"}"#).unwrap_err();
        assert!(matches!(e, BridgeError::Malformed { .. }));
        assert!(!e.is_transient());
    }

    #[test]
    fn apps_script_html_pages() {
        let quota = "<html><head><title>Error</title><style>p{}</style></head><body><div>Service invoked too many times for one day: urlfetch.</div></body></html>";
        let e = interpret_body(200, Some("text/html; charset=utf-8"), quota).unwrap_err();
        match &e {
            BridgeError::Malformed {
                message, retryable, ..
            } => {
                assert!(
                    message.contains("Service invoked too many times"),
                    "{message}"
                );
                assert!(!message.contains("p{}"));
                assert!(*retryable);
            }
            other => panic!("{other:?}"),
        }
        let auth = "<html><title>Sign in - Google Accounts</title><body>Authorization is required to perform that action.</body></html>";
        let e = interpret_body(200, Some("text/html"), auth).unwrap_err();
        assert!(!e.is_transient());
        assert!(e.to_string().contains("Authorization is required"));
    }
}
