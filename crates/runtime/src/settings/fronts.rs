//! The sections of the front doors the top package serves (the operator console, the MCP
//! front door): aggregated here with the rest, read by those surfaces.

use crate::clock::de;
use serde::Deserialize;
use std::time::Duration;

/// The operator console (`command-poller console`, the `[console]` section).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleSettings {
    /// Address the console serves on (`--listen` overrides it).
    pub listen: std::net::SocketAddr,
    /// An idle session ends after this long, and its broker connection is closed
    /// (`idle_timeout_secs`).
    #[serde(rename = "idle_timeout_secs", deserialize_with = "de::secs")]
    pub idle_timeout: Duration,
    /// Mark the session cookie `Secure` (set it when a TLS proxy serves the console).
    pub secure_cookies: bool,
    /// Failed logins allowed per user name, and per client address, within `login_window_secs`.
    pub max_failed_logins: usize,
    #[serde(rename = "login_window_secs", deserialize_with = "de::secs")]
    pub login_window: Duration,
    /// Largest request body accepted, in bytes.
    pub max_form_bytes: usize,
    /// The audit chain file `command-poller audit sink` writes, for an action's story; empty:
    /// the story page says it is not configured.
    pub audit_file: String,
    /// Addresses of reverse proxies in front of the console: from them, the client is the last
    /// address in `X-Forwarded-For` that is not one of them (throttled as that client). From
    /// anyone else the header is ignored, so it can't be forged to dodge the throttle.
    #[serde(default)]
    pub trusted_proxies: Vec<std::net::IpAddr>,
    /// Environment variable holding the broker URL (`amqp://console:…`) the console publishes
    /// its security alerts as (repeated failed logins against an operator's name); unset: they
    /// are logged only. Never logged.
    #[serde(default = "default_console_alert_url_env")]
    pub alert_url_env: String,
}

fn default_console_alert_url_env() -> String {
    "CONSOLE_ALERT_AMQP_URL".into()
}

/// The MCP front door over streamable HTTP (`command-poller mcp --http`, the `[mcp]` section).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct McpSettings {
    /// Page origins (`scheme://host[:port]`) allowed to call besides loopback pages; a request
    /// with any other `Origin` is refused (403). Requests without `Origin` (not from a browser)
    /// are not affected.
    pub allowed_origins: Vec<String>,
    /// Requests one client (token) may have in flight at once; one more is refused (429).
    pub max_calls_in_flight: usize,
    /// Live sessions one client (token) may hold; one more `initialize` is refused (429).
    pub max_sessions: usize,
    /// A session without a request for this long ends (`session_idle_secs`).
    #[serde(rename = "session_idle_secs", deserialize_with = "de::secs")]
    pub session_idle: Duration,
}

impl McpSettings {
    /// `text` as a page origin (`scheme://host[:port]`, http or https, nothing after it), in the
    /// form browsers send.
    pub fn origin_of(text: &str) -> Result<String, String> {
        let u = url::Url::parse(text).map_err(|e| e.to_string())?;
        if !matches!(u.scheme(), "http" | "https") {
            return Err("http or https only".into());
        }
        if u.path() != "/"
            || u.query().is_some()
            || u.fragment().is_some()
            || !u.username().is_empty()
        {
            return Err("an origin is scheme://host[:port], with nothing after it".into());
        }
        Ok(u.origin().ascii_serialization())
    }
}
