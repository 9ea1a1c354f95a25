//! The checks settings pass at load, section by section, each naming the key at fault: what
//! deserializing can't say (ranges, URLs, timings that must fit together).

use super::*;

impl Settings {
    /// Every check, in the order their errors are reported.
    pub(super) fn check(&self) -> Result<(), SettingsError> {
        self.check_fronts()?;
        self.check_delivery()?;
        self.check_bridge()?;
        self.check_judges_and_limits()?;
        self.check_store()?;
        self.check_approval_and_panel()?;
        Ok(())
    }

    /// The broker nodes, the front doors and the health endpoint.
    fn check_fronts(&self) -> Result<(), SettingsError> {
        let bad = |m: String| Err(SettingsError::Invalid(m));
        if let Err(e) = self.amqp.endpoints() {
            let key = if self.amqp.urls.is_empty() {
                "amqp.url"
            } else {
                "amqp.urls"
            };
            return bad(format!("{key}: {e}"));
        }
        let m = &self.mcp;
        if m.max_calls_in_flight == 0 || m.max_sessions == 0 || m.session_idle.is_zero() {
            return bad("mcp.max_calls_in_flight, mcp.max_sessions and mcp.session_idle_secs: each at least 1".into());
        }
        for o in &m.allowed_origins {
            if let Err(e) = McpSettings::origin_of(o) {
                return bad(format!("mcp.allowed_origins: {o:?}: {e}"));
            }
        }
        if !self.health.status_listen.is_empty() {
            match self.health.status_listen.parse::<std::net::SocketAddr>() {
                Ok(a) if a.ip().is_loopback() => {}
                Ok(a) => {
                    return bad(format!(
                        "health.status_listen: {a} is not a loopback address; /status shows recent action ids and who paused the system, so it is served on loopback only (empty turns it off)"
                    ))
                }
                Err(e) => {
                    return bad(format!(
                        "health.status_listen: {:?}: {e}",
                        self.health.status_listen
                    ))
                }
            }
        }
        Ok(())
    }

    /// What a command may spend: in flight at once, and deliveries.
    fn check_delivery(&self) -> Result<(), SettingsError> {
        let bad = |m: String| Err(SettingsError::Invalid(m));
        if self.processing.max_in_flight == 0 {
            return bad(
                "processing.max_in_flight: must be at least 1 (0 would mean unlimited prefetch)"
                    .into(),
            );
        }
        let members = self.topology.replication.initial_group_size;
        if members == 0 || members.is_multiple_of(2) {
            return bad(format!(
                "topology.replication.initial_group_size: {members} must be odd (a quorum of an even group survives no more losses than the odd group one smaller)"
            ));
        }
        if self.topology.delivery_limit == 0 {
            return bad("topology.delivery_limit: must be at least 1".into());
        }
        // RabbitMQ 3.x counts a lost connection as a delivery: a rolling restart can cost a
        // command that waits in a replica's prefetch one delivery per node.
        let nodes = self.amqp.urls.len();
        if nodes > 1 && self.topology.delivery_limit as usize <= nodes {
            return bad(format!(
                "topology.delivery_limit: {} is not above the {nodes} nodes in amqp.urls; a rolling restart can spend one delivery per node (a lost connection counts as one) and dead-letter commands that did nothing wrong",
                self.topology.delivery_limit
            ));
        }
        Ok(())
    }

    /// The bridge: its URL, deadlines and the fleet's slots.
    fn check_bridge(&self) -> Result<(), SettingsError> {
        let bad = |m: String| Err(SettingsError::Invalid(m));
        if self.bridge.mode == BridgeMode::AppsScript && url::Url::parse(&self.bridge.url).is_err()
        {
            return bad(format!(
                "bridge.url: {:?} is not a URL (required with mode apps_script)",
                self.bridge.url
            ));
        }
        if self.bridge.request_timeout.is_zero() || self.bridge.request_timeout.as_secs() >= 360 {
            return bad("bridge.request_timeout_secs: must be between 1 and 359 (Apps Script stops executions at 6 minutes)".into());
        }
        if self.bridge.max_concurrency == 0 {
            return bad("bridge.max_concurrency: must be at least 1".into());
        }
        if self.bridge.slot_lease < Duration::from_secs(3) {
            return bad(format!(
                "bridge.slot_lease_secs: {} is below 3 (a live lease is renewed every third of it)",
                self.bridge.slot_lease.as_secs()
            ));
        }
        Ok(())
    }

    /// The judges' names, the per-agent limit and the trips.
    fn check_judges_and_limits(&self) -> Result<(), SettingsError> {
        let bad = |m: String| Err(SettingsError::Invalid(m));
        let mut names = std::collections::HashSet::new();
        for j in &self.panel.judges {
            if !names.insert(j.name()) {
                return bad(format!(
                    "panel.judges: judge name {:?} appears twice",
                    j.name()
                ));
            }
        }
        if let Some(l) = &self.intake.per_agent_limit {
            if l.count == 0 || l.window.is_zero() {
                return bad(
                    "intake.per_agent_limit: count and window_secs must be at least 1".into(),
                );
            }
        }
        let c = &self.control;
        if c.loosening_approvals == 0 || c.loosening_approvals > c.operators.len() {
            return bad(format!(
                "control.loosening_approvals: {} people can't be found among the {} operator(s) in control.operators: a halt could never be lifted (list a broker user per person, or set it to 1)",
                c.loosening_approvals,
                c.operators.len()
            ));
        }
        for (i, t) in self.control.trips.iter().enumerate() {
            if t.count == 0 || t.window.is_zero() {
                return bad(format!(
                    "control.trips[{i}]: count and window_secs must be at least 1"
                ));
            }
            if t.revoke_on_trip && t.command_type != crate::intake::CommandType::RefreshToken {
                return bad(format!(
                    "control.trips[{i}]: revoke_on_trip is for REFRESH_TOKEN trips only (a revoke refuses a service's refreshes; {} attempts hold no credentials to revoke)",
                    t.command_type
                ));
            }
        }
        Ok(())
    }

    /// The store: its URL, and claim timings that never spend a command's deliveries.
    fn check_store(&self) -> Result<(), SettingsError> {
        let bad = |m: String| Err(SettingsError::Invalid(m));
        let i = &self.idempotency;
        if i.backend != crate::store::Backend::Embedded && i.url.is_empty() {
            return bad("idempotency.url: required with the redis and postgres backends".into());
        }
        if i.claim_ttl < Duration::from_secs(3) {
            return bad(format!(
                "idempotency.claim_ttl_secs: {} is below 3 (a live claim is renewed every third of it)",
                i.claim_ttl.as_secs()
            ));
        }
        if i.max_waiting_duplicates_per_agent == 0 {
            return bad("idempotency.max_waiting_duplicates_per_agent: must be at least 1 (a redelivered copy after a lost connection waits for its original)".into());
        }
        if i.wait_for_in_flight <= i.claim_ttl {
            return bad(format!(
                "idempotency.wait_for_in_flight_ms: {} must exceed claim_ttl_secs ({} s), or a duplicate of a crashed replica's command goes back to the queue before the dead claim expires, spending its delivery limit",
                i.wait_for_in_flight.as_millis(), i.claim_ttl.as_secs()
            ));
        }
        // A duplicate waits for a live original instead of going back to the queue (each
        // requeue spends one of the command's deliveries): long enough for the longest the
        // original can take, its wait for a bridge slot included, and below the broker's
        // consumer_timeout (30 minutes), which would close the channel.
        let b = &self.bridge;
        let longest_call_ms = (b.retry_budget + 2 * b.request_timeout).as_millis() as u64;
        let rounds =
            1 + (self.processing.max_in_flight as u64).div_ceil(b.max_concurrency.max(1) as u64);
        let needed_ms = rounds * longest_call_ms;
        let wait_ms = i.wait_for_in_flight.as_millis() as u64;
        if wait_ms < needed_ms {
            return bad(format!(
                "idempotency.wait_for_in_flight_ms: {} is shorter than the longest a live command can take ({needed_ms} ms: {rounds} rounds of bridge.retry_budget_secs {} s + 2 x bridge.request_timeout_secs {} s, as processing.max_in_flight {} commands share bridge.max_concurrency {} slots, counted as if this replica had the fleet's slots to itself); a duplicate would go back to the queue while its original still runs, spending its delivery limit until it is dead-lettered",
                wait_ms, b.retry_budget.as_secs(), b.request_timeout.as_secs(), self.processing.max_in_flight, b.max_concurrency
            ));
        }
        if wait_ms > MAX_WAIT_FOR_IN_FLIGHT_MS {
            return bad(format!(
                "idempotency.wait_for_in_flight_ms: {wait_ms} is over {MAX_WAIT_FOR_IN_FLIGHT_MS} ms; RabbitMQ's consumer_timeout (30 minutes) would close the channel under a waiting duplicate"
            ));
        }
        Ok(())
    }

    /// Approvals, canaries and the panel's quorum.
    fn check_approval_and_panel(&self) -> Result<(), SettingsError> {
        let bad = |m: String| Err(SettingsError::Invalid(m));
        if self.approval.sweep_interval.is_zero() {
            return bad("approval.sweep_interval_ms: must be at least 1".into());
        }
        if self.approval.max_decision_bytes < 256 {
            return bad("approval.max_decision_bytes: must be at least 256".into());
        }
        if self.panel.canary.interval < Duration::from_secs(10) {
            return bad("panel.canary.interval_secs: must be at least 10".into());
        }
        if let Err(e) = crate::intake::AgentId::parse(&self.panel.canary.agent) {
            return bad(format!("panel.canary.agent: {e}"));
        }
        if self.panel.quorum > self.panel.judges.len() {
            return bad(format!(
                "panel.quorum: {} is more than the {} configured judges",
                self.panel.quorum,
                self.panel.judges.len()
            ));
        }
        Ok(())
    }
}
