//! The console's own security alerts: repeated failed logins against an operator's name.
//!
//! In: the name, the client last seen failing, how many failures within the window. Out: an
//! [`Alert`] for `security.high` ([`login_abuse`], pure) and its publication as the console's
//! own broker user ([`AlertSink::publish`]), on a connection of its own opened for the alert:
//! the console holds no broker identity but the people logged in.

use crate::broker::names::message_type;
use crate::broker::{self, BrokerError, Endpoints, Outgoing, Publisher};
use crate::outcome::{Alert, Priority};
use std::time::Duration;

/// Where the console's alerts go, and as whom.
#[derive(Debug, Clone)]
pub struct AlertSink {
    /// The console's broker user (`console.alert_url_env`): it may publish alerts, nothing else.
    pub endpoints: Endpoints,
    pub exchange: String,
    /// Named in the alert (`poller_instance`): which console saw it.
    pub instance: String,
}

/// Security's alert: `failures` failed logins as operator `user` within `window`, the last from
/// `client`. The operator's own correct password still logs in; the failing clients are
/// throttled.
pub fn login_abuse(
    user: &str,
    client: &str,
    failures: usize,
    window: Duration,
    instance: &str,
) -> Alert {
    Alert {
        alert_id: uuid::Uuid::new_v4().to_string(),
        team: "security".into(),
        priority: Priority::High,
        action_id: None,
        command_type: None,
        service: None,
        agent: None,
        status: None,
        summary: format!(
            "{failures} failed console logins as operator {user} within {} s (the last from {client})",
            window.as_secs()
        ),
        rationale: "Someone is guessing an operator's password at the console. The failing clients are throttled; the operator's correct password still logs in.".into(),
        action_required: format!("Ask {user} whether it was them. If not, find the clients in the console's log (`console audit: failed login`), block them at the proxy, and rotate {user}'s broker password (rabbitmqctl change_password)."),
        poller_instance: instance.to_owned(),
        at: crate::clock::now_rfc3339(),
        approval: None,
    }
}

impl AlertSink {
    /// Publishes `alert` (confirmed) as the console's user, on a connection opened for it.
    pub async fn publish(&self, alert: &Alert) -> Result<(), BrokerError> {
        let (conn, _) = broker::connect(&self.endpoints, "command-poller-console-alerts").await?;
        let sent = async {
            let publisher = Publisher::open(&conn).await?;
            publisher
                .publish(&Outgoing {
                    exchange: self.exchange.clone(),
                    routing_key: alert.routing_key(),
                    body: serde_json::to_vec(alert).expect("an alert serializes"),
                    message_type: message_type::ALERT,
                    user_id: Some(self.endpoints.user()),
                    ..Default::default()
                })
                .await
        }
        .await;
        broker::close(&conn, "alert sent").await;
        sent
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_alert_names_the_operator_the_client_and_goes_to_security_high() {
        let a = login_abuse(
            "ops-admin",
            "203.0.113.5",
            5,
            Duration::from_secs(300),
            "console-1",
        );
        assert_eq!(a.routing_key(), "security.high");
        assert!(a.summary.contains("ops-admin") && a.summary.contains("203.0.113.5"));
        assert!(a.summary.contains("5 failed") && a.summary.contains("300 s"));
        assert!(a
            .action_required
            .contains("rotate ops-admin's broker password"));
        assert_eq!(a.poller_instance, "console-1");
    }
}
