//! Health endpoint for orchestrators and operators.
//!
//! In: the poller's live [`PollerState`]. Out: on the pod's port, `/healthz` (the process is
//! alive), `/readyz` (connected, topology declared, control state applied, the idempotency
//! store answering, and not halted: 200, else 503) and `/metrics` (Prometheus); on a loopback port of its own, `/status` (JSON: the
//! control state, recent action ids and statuses), which is for the operator on the machine.

use crate::control::replica::ReplicaStats;
use crate::settle::state::{Component, Health};
use crate::worker::PollerState;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use poller_core::control::Mode;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthSettings {
    /// Address of the health endpoint (/healthz, /readyz, /metrics); port 0 picks a free one.
    pub listen: std::net::SocketAddr,
    /// Address of `/status` (recent action ids, who paused and why): loopback only, so it is
    /// never served on the pod's port. Empty: not served.
    pub status_listen: String,
}

#[derive(Clone)]
struct Ctx {
    state: Arc<PollerState>,
    instance: String,
}

/// Binds `addr` and serves `/healthz`, `/readyz` and `/metrics` until `stop` is cancelled.
/// Returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    state: Arc<PollerState>,
    instance: String,
    stop: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(Ctx { state, instance });
    bind_and_serve(addr, app, stop, "health endpoint").await
}

/// Serves `app` on `addr` in the background until `stop`; returns the bound address.
async fn bind_and_serve(
    addr: SocketAddr,
    app: Router,
    stop: CancellationToken,
    what: &'static str,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        let serve = axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned());
        if let Err(e) = serve.await {
            tracing::error!(error = %e, "{what} stopped");
        }
    });
    Ok(bound)
}

/// Serves `/status` alone on `addr` (the settings refuse a non-loopback one) until `stop`.
pub async fn serve_status(
    addr: SocketAddr,
    state: Arc<PollerState>,
    instance: String,
    stop: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let app = Router::new()
        .route("/status", get(status))
        .with_state(Ctx { state, instance });
    bind_and_serve(addr, app, stop, "status endpoint").await
}

async fn readyz(State(c): State<Ctx>) -> (StatusCode, String) {
    let s = &c.state;
    match readiness(
        s.connected.load(Ordering::SeqCst),
        s.store_ok.load(Ordering::SeqCst),
        s.gate.mode(),
        &s.components.snapshot(),
    ) {
        Ok(()) => (StatusCode::OK, "ready".into()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
    }
}

/// Ready: connected, the store answering, not halted, and no component failed (a failed one
/// is started again by the supervisor, or its session is).
fn readiness(
    connected: bool,
    store_ok: bool,
    mode: Mode,
    components: &BTreeMap<Component, Health>,
) -> Result<(), String> {
    if !connected {
        return Err("not connected to the broker".into());
    }
    if !store_ok {
        return Err("the idempotency store is unreachable".into());
    }
    if mode == Mode::Halted {
        return Err("halted (master shut-off)".into());
    }
    match components
        .iter()
        .find(|(_, h)| matches!(h, Health::Failed { .. }))
    {
        Some((c, Health::Failed { error })) => Err(format!("{} failed: {error}", c.name())),
        _ => Ok(()),
    }
}

/// OpenMetrics to a scraper that asks for it (Prometheus does), the classic text format to one
/// that doesn't; each labelled with its own content type, so the scraper parses it right.
async fn metrics(
    State(c): State<Ctx>,
    headers: axum::http::HeaderMap,
) -> ([(axum::http::HeaderName, &'static str); 1], String) {
    let body = c.state.metrics.render(
        c.state.in_flight.load(Ordering::SeqCst),
        c.state.gate.mode(),
    );
    let wants_openmetrics = headers
        .get(axum::http::header::ACCEPT)
        .and_then(|a| a.to_str().ok())
        .is_some_and(|a| a.contains("application/openmetrics-text"));
    if wants_openmetrics {
        (
            [(
                axum::http::header::CONTENT_TYPE,
                crate::metrics::OPENMETRICS_CONTENT_TYPE,
            )],
            body,
        )
    } else {
        (
            [(
                axum::http::header::CONTENT_TYPE,
                crate::metrics::CLASSIC_CONTENT_TYPE,
            )],
            crate::metrics::classic_text(&body),
        )
    }
}

async fn status(State(c): State<Ctx>) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "instance": c.instance,
        "connected": c.state.connected.load(Ordering::SeqCst),
        "in_flight": c.state.in_flight.load(Ordering::SeqCst),
        "processed": c.state.processed.load(Ordering::SeqCst),
        "control": c.state.gate.state(),
        "policy_sha256": *c.state.policy_sha256.lock().unwrap_or_else(|p| p.into_inner()),
        "broker_node": *c.state.broker_node.lock().unwrap_or_else(|p| p.into_inner()),
        "at_bridge": c.state.gate.at_bridge(),
        "recent_results": c.state.recent_results(),
        "components": c.state.components.snapshot(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_component_makes_the_replica_unready_and_says_which() {
        let mut components = BTreeMap::new();
        components.insert(
            Component::Consumer,
            Health::Waiting {
                why: "paused".into(),
            },
        );
        assert_eq!(readiness(true, true, Mode::Paused, &components), Ok(()));
        components.insert(
            Component::ApprovalSweeper,
            Health::Failed {
                error: "panicked".into(),
            },
        );
        assert_eq!(
            readiness(true, true, Mode::Running, &components),
            Err("approval_sweeper failed: panicked".into())
        );
        assert!(readiness(true, true, Mode::Halted, &BTreeMap::new()).is_err());
        assert!(readiness(true, false, Mode::Running, &BTreeMap::new()).is_err());
        assert!(readiness(false, true, Mode::Running, &BTreeMap::new()).is_err());
    }

    #[test]
    fn a_components_name_is_its_json_name() {
        for c in [
            Component::Consumer,
            Component::ControlReplica,
            Component::ApprovalDesk,
            Component::ApprovalSweeper,
            Component::Canary,
            Component::StoreProbe,
        ] {
            assert_eq!(serde_json::to_value(c).unwrap(), c.name());
        }
    }

    async fn get_status(addr: SocketAddr, path: &str) -> u16 {
        crate::tls::ensure_crypto_provider();
        reqwest::get(format!("http://{addr}{path}"))
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    #[tokio::test]
    async fn status_is_not_served_on_the_pods_port() {
        let state = Arc::new(PollerState::default());
        let stop = CancellationToken::new();
        let pod = serve(
            ([127, 0, 0, 1], 0).into(),
            state.clone(),
            "i".into(),
            stop.clone(),
        )
        .await
        .unwrap();
        assert_eq!(get_status(pod, "/healthz").await, 200);
        assert_eq!(get_status(pod, "/metrics").await, 200);
        assert_eq!(get_status(pod, "/status").await, 404);
        let local = serve_status(([127, 0, 0, 1], 0).into(), state, "i".into(), stop.clone())
            .await
            .unwrap();
        assert_eq!(get_status(local, "/status").await, 200);
        stop.cancel();
    }
}
