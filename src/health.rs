//! Health endpoint for orchestrators and operators.
//!
//! In: the poller's live [`PollerState`]. Out: `/healthz` (the process is alive), `/readyz`
//! (connected, topology declared, control state applied, and not halted: 200, else 503) and
//! `/status` (JSON) and `/metrics` (Prometheus).

use crate::control::replica::ReplicaStats;
use crate::control::Mode;
use crate::poller::PollerState;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

#[derive(Clone)]
struct Ctx {
    state: Arc<PollerState>,
    instance: String,
}

/// Binds `addr` and serves until `stop` is cancelled. Returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    state: Arc<PollerState>,
    instance: String,
    stop: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .with_state(Ctx { state, instance });
    tokio::spawn(async move {
        let serve = axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned());
        if let Err(e) = serve.await {
            tracing::error!(error = %e, "health endpoint stopped");
        }
    });
    Ok(bound)
}

async fn readyz(State(c): State<Ctx>) -> (StatusCode, &'static str) {
    if !c.state.connected.load(Ordering::SeqCst) {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not connected to the broker",
        )
    } else if c.state.gate.mode() == Mode::Halted {
        (StatusCode::SERVICE_UNAVAILABLE, "halted (master shut-off)")
    } else {
        (StatusCode::OK, "ready")
    }
}

async fn metrics(State(c): State<Ctx>) -> ([(axum::http::HeaderName, &'static str); 1], String) {
    let body = c.state.metrics.render(
        c.state.in_flight.load(Ordering::SeqCst),
        c.state.gate.mode(),
    );
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
}

async fn status(State(c): State<Ctx>) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "instance": c.instance,
        "connected": c.state.connected.load(Ordering::SeqCst),
        "in_flight": c.state.in_flight.load(Ordering::SeqCst),
        "processed": c.state.processed.load(Ordering::SeqCst),
        "control": c.state.gate.state(),
        "at_bridge": c.state.gate.at_bridge(),
        "recent_results": c.state.recent_results(),
    }))
}
