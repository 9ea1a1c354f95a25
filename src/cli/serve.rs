//! The long-running modes: the poller (with its health and status endpoints), the bridge
//! simulator, the operator console and the MCP front door; each stops on SIGTERM or Ctrl-C.

use super::levers::endpoints_of;
use crate::settings::Settings;
use anyhow::Context;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// `run`: the poller until SIGTERM, with its health endpoint (and `/status` on loopback).
pub(super) async fn poller(settings: Settings) -> anyhow::Result<ExitCode> {
    let listen = settings.health.listen;
    let status_listen = settings.health.status_listen.clone();
    let poller = crate::worker::Poller::from_settings(settings).await?;
    let shutdown = CancellationToken::new();
    let health = crate::health::serve(
        listen,
        poller.state(),
        poller.instance().to_owned(),
        shutdown.clone(),
    )
    .await
    .with_context(|| format!("binding the health endpoint on {listen}"))?;
    tracing::info!(addr = %health, "health endpoint listening");
    if let Ok(addr) = status_listen.parse::<std::net::SocketAddr>() {
        let status = crate::health::serve_status(
            addr,
            poller.state(),
            poller.instance().to_owned(),
            shutdown.clone(),
        )
        .await
        .with_context(|| format!("binding the status endpoint on {addr}"))?;
        tracing::info!(addr = %status, "status endpoint listening (loopback only)");
    }
    tokio::spawn(watch_signals(shutdown.clone()));
    tokio::spawn(watch_reload(poller.state().reload.clone()));
    poller.run(shutdown).await;
    tracing::info!("poller stopped");
    Ok(ExitCode::SUCCESS)
}

/// `bridge-simulator`: a local stand-in for the Apps Script web app.
pub(super) async fn bridge_simulator(
    settings: &Settings,
    listen: std::net::SocketAddr,
    latency_ms: u64,
) -> anyhow::Result<ExitCode> {
    let secret = settings.secrets.bridge.clone().with_context(|| {
        format!(
            "set {} to the shared bridge secret",
            settings.bridge.secret_env
        )
    })?;
    let mut cfg = crate::bridge::simulator::SimulatorConfig::new(secret);
    cfg.latency = Duration::from_millis(latency_ms);
    let sim = crate::bridge::simulator::start(cfg, listen).await?;
    println!("bridge simulator listening on {}", sim.url());
    let stop = CancellationToken::new();
    watch_signals(stop.clone()).await;
    drop(sim);
    Ok(ExitCode::SUCCESS)
}

/// `console`: the operators' and approvers' web page.
pub(super) async fn console(
    settings: &Settings,
    listen: Option<std::net::SocketAddr>,
) -> anyhow::Result<ExitCode> {
    let addr = listen.unwrap_or(settings.console.listen);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("console: listening on {addr}"))?;
    tracing::info!(addr = %listener.local_addr()?, "console listening");
    let stop = CancellationToken::new();
    tokio::spawn(watch_signals(stop.clone()));
    let console = crate::console::Console::new(crate::console::Parts::from_settings(settings));
    crate::console::serve(listener, console, stop).await?;
    Ok(ExitCode::SUCCESS)
}

/// `mcp`: the agents' front door, on stdio as one agent, or on streamable HTTP for the clients
/// of a clients file.
pub(super) async fn mcp(
    settings: &Settings,
    amqp_url: Option<String>,
    timeout_secs: u64,
    http: Option<std::net::SocketAddr>,
    clients: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    let exchange = settings.topology.commands_exchange.clone();
    let deadline = Duration::from_secs(timeout_secs);
    match (http, clients, amqp_url) {
        (Some(addr), Some(file), _) => {
            let clients = crate::mcp::server::http::Clients::load(&file, &exchange, deadline)
                .map_err(anyhow::Error::msg)?;
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("mcp: listening on {addr}"))?;
            tracing::info!(addr = %listener.local_addr()?, "MCP front door on streamable HTTP at /mcp");
            let stop = CancellationToken::new();
            tokio::spawn(watch_signals(stop.clone()));
            crate::mcp::server::http::serve(listener, clients, settings.mcp.clone(), stop).await?;
        }
        (_, _, Some(url)) => {
            let door =
                crate::mcp::FrontDoor::new(endpoints_of(Some(url), settings)?, exchange, deadline);
            tracing::info!(agent = %door.agent(), "MCP front door on stdio");
            crate::mcp::server::serve_stdio(door).await?;
        }
        _ => anyhow::bail!(
            "mcp: give --amqp-url (or AGENT_AMQP_URL) for stdio, or --http with --clients"
        ),
    }
    Ok(ExitCode::SUCCESS)
}

/// Asks for a policy reload on every SIGHUP.
async fn watch_reload(reload: std::sync::Arc<tokio::sync::Notify>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::error!(
                "no SIGHUP handler: reload the policy with `command-poller policy reload`"
            );
            return;
        };
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading the policy");
            reload.notify_one();
        }
    }
    #[cfg(not(unix))]
    let _ = reload;
}

/// Cancels `token` on SIGTERM or Ctrl-C.
pub(super) async fn watch_signals(token: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: draining"),
            _ = tokio::signal::ctrl_c() => tracing::info!("interrupt: draining"),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    token.cancel();
}
