//! `check-config --online`: what `run` would trip on, checked before it does.
//!
//! In: loaded settings. Out: one [`Finding`] per check, each naming the configuration key it is
//! about: the judges' prompt files and API-key variables, the bridge secret and URL, the
//! idempotency store (reachable, writable, its sealing key), and the broker (reachable as the
//! configured user; the exchanges and queues the poller needs, or the right to declare them).
//! Secrets are checked for presence only, never printed.

use crate::settings::{BridgeMode, Settings};
use lapin::options::{ExchangeDeclareOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use serde::Serialize;
use std::time::Duration;

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// The configuration key (or environment variable) the check is about.
    pub key: String,
    pub ok: bool,
    pub detail: String,
}

impl Finding {
    fn ok(key: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            ok: true,
            detail: detail.into(),
        }
    }

    fn problem(key: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            ok: false,
            detail: detail.into(),
        }
    }
}

/// Runs every check; never stops at the first problem.
pub async fn check(settings: &Settings) -> Vec<Finding> {
    let mut out = Vec::new();
    match crate::compose::build_panel(
        &settings.panel,
        &settings.secrets.judge_api_keys,
        std::sync::Arc::new(crate::store::local::MemWindows::default()),
    ) {
        Ok(p) => out.push(Finding::ok(
            "panel.judges",
            format!(
                "{} judge(s): prompt files read, API-key variables set",
                p.size()
            ),
        )),
        Err(e) => out.push(Finding::problem("panel.judges", e.to_string())),
    }
    out.push(bridge(settings));
    out.extend(audit_key(settings));
    out.extend(store(settings).await);
    out.extend(broker(settings).await);
    out
}

/// What can be told of the secrets without connecting anywhere (`check-config` without
/// `--online`): the bridge's secret and URL, the store key, the audit chain key, each when set;
/// placeholders and short keys are problems.
pub fn secrets(s: &Settings) -> Vec<Finding> {
    let mut out = Vec::new();
    // A secret not set is `--online`'s to report (a config checked without its secrets).
    if s.bridge.mode == BridgeMode::AppsScript && s.secrets.bridge.is_some() {
        out.push(bridge(s));
    }
    if let Some(k) = &s.secrets.store_key {
        out.push(match k.check_strong(&s.idempotency.key_env) {
            Ok(()) => Finding::ok("idempotency.key_env", "the store key is set"),
            Err(why) => Finding::problem("idempotency.key_env", why),
        });
    }
    out.extend(audit_key(s));
    out
}

/// The audit chain key, when one is set.
fn audit_key(s: &Settings) -> Option<Finding> {
    s.secrets
        .audit_chain_key
        .as_ref()
        .map(|k| match k.check_strong(&s.audit.chain_key_env) {
            Ok(()) => Finding::ok("audit.chain_key_env", "the chain key is set"),
            Err(why) => Finding::problem("audit.chain_key_env", why),
        })
}

fn bridge(s: &Settings) -> Finding {
    let b = &s.bridge;
    let secret_set = s.secrets.bridge.is_some();
    match b.mode {
        BridgeMode::Simulator => Finding::ok(
            "bridge.mode",
            "simulator (in-process; a random secret when the variable is unset)",
        ),
        BridgeMode::AppsScript if !secret_set => Finding::problem(
            "bridge.secret_env",
            format!("the environment variable {} is not set", b.secret_env),
        ),
        BridgeMode::AppsScript => match s
            .secrets
            .bridge
            .as_ref()
            .map(|k| k.check_strong(&b.secret_env))
        {
            Some(Err(why)) => Finding::problem("bridge.secret_env", why),
            _ if crate::bridge::signing::is_placeholder(&b.url) => Finding::problem(
                "bridge.url",
                "holds a placeholder (as the shipped Secret template does): set the web app's /exec URL",
            ),
            _ => bridge_url(b),
        },
    }
}

/// The web app's URL (for the apps_script bridge).
fn bridge_url(b: &crate::settings::BridgeSettings) -> Finding {
    match url::Url::parse(&b.url) {
        Ok(_) => Finding::ok(
            "bridge.url",
            format!("{} set; the URL parses", b.secret_env),
        ),
        Err(e) => Finding::problem("bridge.url", format!("not a URL: {e}")),
    }
}

async fn store(s: &Settings) -> Vec<Finding> {
    let mut out = Vec::new();
    if let Some(why) = s.embedded_store_refused() {
        out.push(Finding::problem(
            "idempotency.backend",
            format!("`run` refuses it: {why}"),
        ));
    }
    match crate::store::store_key(&s.idempotency, s.secrets.store_key.clone()) {
        Ok(_) => out.push(Finding::ok(
            "idempotency.key_env",
            "the store key is available",
        )),
        Err(e) => out.push(Finding::problem("idempotency.key_env", e.to_string())),
    }
    let key = match s.idempotency.backend {
        crate::store::Backend::Embedded => "idempotency.path",
        _ => "idempotency.url",
    };
    let opened =
        tokio::time::timeout(Duration::from_secs(10), crate::store::open(&s.idempotency)).await;
    let store = match opened {
        Ok(Ok(store)) => store,
        Ok(Err(e)) => {
            out.push(Finding::problem(key, format!("can't open the store: {e}")));
            return out;
        }
        Err(_) => {
            out.push(Finding::problem(
                key,
                "the store did not answer within 10 s",
            ));
            return out;
        }
    };
    // Writable: a claim and its release, under a key no command can have.
    let probe = format!("~check-config/{}", uuid::Uuid::new_v4().simple());
    let owner = "check-config";
    let written = async {
        store.claim(&probe, owner, Duration::from_secs(30)).await?;
        store.release(&probe, owner).await
    };
    match tokio::time::timeout(Duration::from_secs(10), written).await {
        Ok(Ok(())) => out.push(Finding::ok(key, "reachable and writable")),
        Ok(Err(e)) => out.push(Finding::problem(key, format!("not writable: {e}"))),
        Err(_) => out.push(Finding::problem(key, "a write did not finish within 10 s")),
    }
    out
}

async fn broker(s: &Settings) -> Vec<Finding> {
    let endpoints = s.amqp.checked_endpoints();
    let key = if s.amqp.urls.is_empty() {
        "amqp.url"
    } else {
        "amqp.urls"
    };
    let conn = match crate::broker::connect(&endpoints, "command-poller-check-config").await {
        Ok(c) => c,
        Err(e) => {
            return vec![Finding::problem(
                key,
                format!(
                    "can't connect to {} as the configured user: {e}",
                    endpoints.redacted().join(", ")
                ),
            )]
        }
    };
    let (conn, node) = conn;
    let mut out = vec![Finding::ok(
        key,
        format!(
            "connected to {} (node {} of {}) as {}",
            node.shown,
            node.index + 1,
            endpoints.len(),
            s.poller_user()
        ),
    )];
    let t = &s.topology;
    let exchanges = [
        ("topology.commands_exchange", &t.commands_exchange),
        ("topology.results_exchange", &t.results_exchange),
        ("topology.alerts_exchange", &t.alerts_exchange),
        ("topology.dead_letter_exchange", &t.dead_letter_exchange),
        ("control.exchange", &s.control.exchange),
        ("control.state_exchange", &s.control.state_exchange),
        ("audit.exchange", &s.audit.exchange),
    ];
    let queues = [
        ("topology.commands_queue", &t.commands_queue),
        ("topology.dead_letter_queue", &t.dead_letter_queue),
        ("control.state_queue", &s.control.state_queue),
        ("control.events_queue", &s.control.events_queue),
        ("audit.queue", &s.audit.queue),
    ];
    let missing = "missing: the poller declares it at start if its user may configure it (the shipped definitions create it)";
    for (key, name) in exchanges {
        let ch = match conn.create_channel().await {
            Ok(c) => c,
            Err(e) => {
                out.push(Finding::problem(key, format!("broker: {e}")));
                continue;
            }
        };
        let passive = ExchangeDeclareOptions {
            passive: true,
            ..Default::default()
        };
        // The kind is not checked by a passive declare.
        match ch
            .exchange_declare(
                name.as_str().into(),
                lapin::ExchangeKind::Topic,
                passive,
                FieldTable::default(),
            )
            .await
        {
            Ok(()) => out.push(Finding::ok(key, format!("exchange {name} exists"))),
            Err(_) => out.push(Finding::problem(key, format!("exchange {name} {missing}"))),
        }
    }
    for (key, name) in queues {
        let Ok(ch) = conn.create_channel().await else {
            out.push(Finding::problem(key, "broker: no channel"));
            continue;
        };
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        match ch
            .queue_declare(name.as_str().into(), passive, FieldTable::default())
            .await
        {
            Ok(_) => out.push(Finding::ok(key, format!("queue {name} exists"))),
            Err(_) => out.push(Finding::problem(key, format!("queue {name} {missing}"))),
        }
    }
    crate::broker::close(&conn, "check-config done").await;
    out.extend(other_nodes(&endpoints, node.index, key, &s.poller_user()).await);
    out
}

/// Every node of a cluster but `connected` (where the topology was checked): each must take
/// the poller's user too, or a failover finds out. Each is its own finding.
async fn other_nodes(
    endpoints: &crate::broker::Endpoints,
    connected: usize,
    key: &str,
    user: &str,
) -> Vec<Finding> {
    let mut out = Vec::new();
    let shown = endpoints.redacted();
    for index in (0..endpoints.len()).filter(|i| *i != connected) {
        let which = format!(
            "node {} of {} ({})",
            index + 1,
            endpoints.len(),
            shown[index]
        );
        match crate::broker::connect(&endpoints.only(index), "command-poller-check-config").await {
            Ok((conn, _)) => {
                crate::broker::close(&conn, "check-config done").await;
                out.push(Finding::ok(key, format!("{which} takes {user} too")));
            }
            Err(e) => out.push(Finding::problem(
                key,
                format!("{which}: can't connect as the configured user ({e}); the poller fails over to it when the node it uses is lost"),
            )),
        }
    }
    out
}
