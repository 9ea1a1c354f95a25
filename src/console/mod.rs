//! The operator console: one web page for the on-call person (state, levers, the approvals
//! inbox, an action's story).
//!
//! In: HTTP requests from browsers. Out: server-rendered HTML ([`pages`]); levers and decisions
//! published over the broker as the logged-in person, exactly like the CLI: a person logs in with
//! their own broker user and password, the console proves them by opening an AMQP connection as
//! that user and keeps it for the session ([`session`]); nothing can be done here without the
//! broker rights the CLI would need. Stateless across processes: run as many as you like.

mod actions;
pub mod alerts;
mod approvals;
mod guard;
mod incidents;
mod levers;
mod login;
pub mod pages;
pub mod session;
pub mod state;

pub use login::{client_address, safe_next};

use crate::approval::approver::Approver;
use crate::approval::wire::{PendingView, ReplyOutcome, Request};
use crate::control::operator::{new_request_id, Operator};
use crate::control::ControlCommand;
use crate::settings::{ApprovalSettings, ConsoleSettings, ControlSettings};
use actions::actions;
use approvals::{approvals, decide};
use axum::extract::{ConnectInfo, DefaultBodyLimit, Form, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use levers::{lever, overview};
use login::{login, login_page, logout};
use minijinja::context;
use pages::{Flash, Viewer};
use serde::Deserialize;
use session::{LoginLimiter, Lookup, Roles, Sessions};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// The session cookie's name.
pub const COOKIE: &str = "poller_session";

/// How long the console waits for the replicas' or a desk's answer.
const ANSWER_WAIT: Duration = Duration::from_millis(1500);

/// What the console needs of the settings.
#[derive(Debug, Clone)]
pub struct Parts {
    pub console: ConsoleSettings,
    pub control: ControlSettings,
    pub approval: ApprovalSettings,
    pub commands_queue: String,
    /// The broker nodes whose hosts, ports and vhost the console logs people in at (their user
    /// and password are replaced by theirs).
    pub endpoints: crate::broker::Endpoints,
    pub poller_user: String,
    pub replication: crate::settings::Replication,
    /// Where the console's own security alerts go (`None`: logged only).
    pub alerts: Option<alerts::AlertSink>,
    /// The audit chain's key, to verify `console.audit_file` before incidents are read from it.
    pub chain_key: Option<crate::bridge::signing::Secret>,
}

impl Parts {
    pub fn from_settings(s: &crate::settings::Settings) -> Self {
        Self {
            console: s.console.clone(),
            control: s.control.clone(),
            approval: s.approval.clone(),
            commands_queue: s.topology.commands_queue.clone(),
            endpoints: s.amqp.checked_endpoints(),
            poller_user: s.poller_user(),
            replication: s.topology.replication,
            chain_key: s.secrets.audit_chain_key.clone(),
            alerts: s.secrets.console_alert_url.as_ref().and_then(|url| {
                match crate::broker::Endpoints::parse(&url.expose()) {
                    Ok(endpoints) => Some(alerts::AlertSink {
                        endpoints,
                        exchange: s.topology.alerts_exchange.clone(),
                        instance: format!("console@{}", s.instance()),
                    }),
                    Err(e) => {
                        tracing::error!(variable = %s.console.alert_url_env, error = %e, "console: the alert URL can't be used; failed logins are logged only");
                        None
                    }
                }
            }),
        }
    }
}

pub struct Console {
    parts: Parts,
    sessions: Mutex<Sessions<Arc<lapin::Connection>>>,
    limiter: Mutex<LoginLimiter>,
    /// When security was last alerted about each operator name (once per login window).
    alerted: Mutex<std::collections::HashMap<String, Instant>>,
    /// Operators' sessions' followers of the state stream, by session token.
    followers: Mutex<std::collections::HashMap<String, state::Follower>>,
}

impl Console {
    /// Tells security (once per login window per name) that an operator's name is under a
    /// password-guessing attack. Names that are not operators are only logged.
    fn alert_login_abuse(&self, user: &str, client: &str, now: Instant) {
        if !self.roles(user).operator {
            return;
        }
        let window = self.parts.console.login_window;
        {
            let mut alerted = lock(&self.alerted);
            alerted.retain(|_, at| now.duration_since(*at) < window);
            if alerted.contains_key(user) {
                return;
            }
            alerted.insert(user.to_owned(), now);
        }
        let Some(sink) = self.parts.alerts.clone() else {
            tracing::error!(user, "console security: no alert URL configured (console.alert_url_env); security is not alerted");
            return;
        };
        let alert = alerts::login_abuse(
            user,
            client,
            self.parts.console.max_failed_logins,
            window,
            &sink.instance,
        );
        tokio::spawn(async move {
            if let Err(e) = sink.publish(&alert).await {
                tracing::error!(error = %e, alert = %serde_json::to_string(&alert).unwrap_or_default(), "console security alert not published; here it is");
            }
        });
    }

    pub fn new(parts: Parts) -> Arc<Self> {
        Arc::new(Self {
            sessions: Mutex::new(Sessions::new(parts.console.idle_timeout)),
            limiter: Mutex::new(LoginLimiter::new(
                parts.console.max_failed_logins,
                parts.console.login_window,
            )),
            alerted: Mutex::default(),
            followers: Mutex::default(),
            parts,
        })
    }

    fn roles(&self, user: &str) -> Roles {
        Roles {
            operator: self.parts.control.operators.iter().any(|o| o == user),
            approver: self.parts.approval.approvers.iter().any(|a| a == user),
        }
    }

    /// The broker URL of `user` with `password`.
    fn endpoints_for(&self, user: &str, password: &str) -> Option<crate::broker::Endpoints> {
        self.parts.endpoints.with_credentials(user, password)
    }

    fn cookie(&self, token: &str) -> String {
        format!(
            "{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
            self.parts.console.idle_timeout.as_secs(),
            if self.parts.console.secure_cookies {
                "; Secure"
            } else {
                ""
            }
        )
    }
}

/// The console's routes.
pub fn router(console: Arc<Console>) -> Router {
    let limit = console.parts.console.max_form_bytes;
    Router::new()
        .route("/", get(home))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/overview", get(overview))
        .route("/lever", post(lever))
        .route("/approvals", get(approvals))
        .route("/approvals/decide", post(decide))
        .route("/actions", get(actions))
        .route("/incidents", get(incidents::incidents))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::map_response(hardened))
        .with_state(console)
}

/// The headers every console answer carries: never framed (the levers can't be clicked through
/// another page), never cached, never sniffed, no referrer to other sites.
pub const HARDENING: [(&str, &str); 5] = [
    ("x-frame-options", "DENY"),
    (
        "content-security-policy",
        "frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    ),
    ("cache-control", "no-store"),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "same-origin"),
];

async fn hardened(mut r: Response) -> Response {
    for (name, value) in HARDENING {
        r.headers_mut().insert(
            header::HeaderName::from_static(name),
            header::HeaderValue::from_static(value),
        );
    }
    r
}

/// Serves the console on `listener` until `stop`; idle sessions are ended every few seconds.
pub async fn serve(
    listener: tokio::net::TcpListener,
    console: Arc<Console>,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let sweeper = {
        let (c, stop) = (console.clone(), stop.clone());
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(5));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = every.tick() => {}
                }
                let gone = lock(&c.sessions).expire(Instant::now());
                for conn in gone {
                    crate::broker::close(&conn, "console session idle").await;
                }
            }
        })
    };
    let app = router(console).into_make_service_with_connect_info::<SocketAddr>();
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await;
    sweeper.abort();
    served
}

/// A serializable value for a template.
fn ser<T: serde::Serialize>(v: &T) -> minijinja::Value {
    minijinja::Value::from(minijinja::value::Serde(v))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn page(status: StatusCode, html: String) -> Response {
    (status, Html(html)).into_response()
}

async fn home(State(c): State<Arc<Console>>, headers: HeaderMap) -> Response {
    match c.page_session(&headers, "/", guard::Need::Session).await {
        Ok(w) if w.viewer.operator => Redirect::to("/overview").into_response(),
        Ok(_) => Redirect::to("/approvals").into_response(),
        Err(r) => r,
    }
}

async fn not_found() -> Response {
    page(
        StatusCode::NOT_FOUND,
        pages::message(None, "Not found", "err", "There is no such page.", "/"),
    )
}

#[cfg(test)]
mod tests {
    use super::guard::cookie_token;
    use super::*;

    /// Behind a trusted proxy the client is the last forwarded address that is not a proxy;
    /// from anyone else `X-Forwarded-For` changes nothing (a forged one can't dodge the
    /// throttle), and a garbled one names nobody.
    #[test]
    fn the_client_is_read_from_a_trusted_proxy_only() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let proxy = ip("10.0.0.7");
        let trusted = [proxy, ip("10.0.0.8")];
        assert_eq!(
            client_address(proxy, &["203.0.113.5"], &trusted),
            ip("203.0.113.5")
        );
        // A client's own X-Forwarded-For is to the left of what the proxies add.
        assert_eq!(
            client_address(proxy, &["1.2.3.4, 203.0.113.5, 10.0.0.8"], &trusted),
            ip("203.0.113.5")
        );
        assert_eq!(
            client_address(proxy, &["1.2.3.4", "203.0.113.5"], &trusted),
            ip("203.0.113.5")
        );
        assert_eq!(
            client_address(ip("198.51.100.9"), &["1.2.3.4"], &trusted),
            ip("198.51.100.9"),
            "an untrusted peer forged the header"
        );
        assert_eq!(client_address(proxy, &["not-an-address"], &trusted), proxy);
        assert_eq!(client_address(proxy, &[], &trusted), proxy);
        assert_eq!(client_address(proxy, &["10.0.0.8"], &trusted), proxy);
    }

    #[test]
    fn next_stays_on_this_site() {
        assert_eq!(safe_next(Some("/approvals")), "/approvals");
        assert_eq!(safe_next(Some("//evil.example/x")), "/");
        assert_eq!(safe_next(Some("https://evil.example")), "/");
        assert_eq!(safe_next(Some("/\\evil")), "/");
        assert_eq!(safe_next(None), "/");
        // What the query string decodes to (the open redirect: Chromium drops the tab
        // and lands on //evil.example).
        for bad in [
            "/\t/evil.example/login",
            "/%09/evil.example/login",
            "/%0a/evil.example",
            "/\nx",
            "/%5Cevil.example",
            "/%2F/evil.example",
            "/\u{7f}/x",
        ] {
            assert_eq!(safe_next(Some(bad)), "/", "{bad:?}");
        }
        assert_eq!(safe_next(Some("/actions?id=a%20b")), "/actions?id=a%20b");
        assert_eq!(safe_next(Some("/overview/../approvals")), "/approvals");
    }

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            format!("a=1; {COOKIE}=abc; b=2").parse().unwrap(),
        );
        assert_eq!(cookie_token(&h).as_deref(), Some("abc"));
        assert_eq!(cookie_token(&HeaderMap::new()), None);
    }
}
