//! A service cut off at the provider: the runbook's step 2 of both emergencies, as operator
//! levers. `revoke SERVICE` (Emergency-INT-E01: "revoke the potentially compromised
//! credentials") and `disconnect SERVICE` (Emergency-INT-E02: "disconnect the unauthorized
//! integration") are recorded in the stored control state, so every replica refuses the
//! service's REFRESH_TOKEN from then on, and carried out once through the bridge, which revokes
//! at the provider where it can and deletes the stored tokens either way.
//!
//! In: the control state. Out: whether a command is refused because of a cut, and the words
//! of that refusal. The refusal stands until the service is reconnected by hand (SOP-INT-03)
//! and an operator records it (`command-poller reconnected SERVICE`).

use super::{now, ControlState, Refusal};
use crate::intake::CommandType;
use serde::{Deserialize, Serialize};

/// Which lever cut the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Cut {
    /// Its credentials revoked (E01 step 2).
    Revoked,
    /// The integration disconnected (E02 step 2).
    Disconnected,
}

impl Cut {
    pub fn as_str(self) -> &'static str {
        match self {
            Cut::Revoked => "revoked",
            Cut::Disconnected => "disconnected",
        }
    }

    /// The lever's name on the command line.
    pub fn lever(self) -> &'static str {
        match self {
            Cut::Revoked => "revoke",
            Cut::Disconnected => "disconnect",
        }
    }
}

impl From<Cut> for crate::bridge::Operation {
    fn from(c: Cut) -> Self {
        match c {
            Cut::Revoked => crate::bridge::Operation::RevokeCredentials,
            Cut::Disconnected => crate::bridge::Operation::DisconnectIntegration,
        }
    }
}

/// One service cut off: by whom, when, why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Revocation {
    pub cut: Cut,
    pub by: String,
    pub reason: String,
    /// RFC 3339.
    pub since: String,
    /// The control request that cut it (the bridge call's action_id).
    pub request_id: String,
}

/// Whether a command of `command_type` for `service` is refused by a cut in `state`, and which.
/// Only REFRESH_TOKEN is: a status check reads (it tells the service is no longer connected) and
/// CONNECT_INTEGRATION is blocked by policy whatever the state.
pub fn refusing<'a>(
    state: &'a ControlState,
    command_type: CommandType,
    service: &str,
) -> Option<&'a Revocation> {
    (command_type == CommandType::RefreshToken)
        .then(|| state.revoked.get(service))
        .flatten()
}

/// The REJECTED reason for a command refused by a cut.
pub fn refusal(service: &str, r: &Revocation) -> String {
    format!(
        "service {service} was {} by {} at {} ({}, request {}): REFRESH_TOKEN for it is refused until it is reconnected by hand (runbook SOP-INT-03) and an operator records that (`command-poller reconnected {service}`)",
        r.cut.as_str(),
        r.by,
        r.since,
        r.reason,
        r.request_id
    )
}

/// `current` with `service`'s cut lifted (it was reconnected by hand).
pub(super) fn reconnected(
    current: &ControlState,
    service: &str,
    reason: &str,
) -> Result<ControlState, Refusal> {
    crate::intake::Service::parse(service).map_err(Refusal::BadService)?;
    if reason.trim().is_empty() {
        return Err(Refusal::NoReason);
    }
    let mut new = current.clone();
    new.revoked.remove(service);
    Ok(new)
}

/// `current` with `service` cut off by the lever `(reason, by, request_id)` (a cut already
/// there stays: who did it first and why).
pub(super) fn cut_off(
    current: &ControlState,
    cut: Cut,
    service: &str,
    (reason, by, request_id): (&str, &str, &str),
) -> Result<ControlState, Refusal> {
    crate::intake::Service::parse(service).map_err(Refusal::BadService)?;
    if reason.trim().is_empty() {
        return Err(Refusal::NoReason);
    }
    let mut new = current.clone();
    new.revoked
        .entry(service.to_owned())
        .or_insert_with(|| Revocation {
            cut,
            by: by.to_owned(),
            reason: reason.to_owned(),
            since: now(),
            request_id: request_id.to_owned(),
        });
    Ok(new)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cut(state: &mut ControlState, service: &str) {
        state.revoked.insert(
            service.into(),
            Revocation {
                cut: Cut::Revoked,
                by: "ops".into(),
                reason: "E01".into(),
                since: "t".into(),
                request_id: "r".into(),
            },
        );
    }

    #[test]
    fn each_cut_asks_the_bridge_for_its_own_operation() {
        use crate::bridge::Operation;
        assert_eq!(Operation::from(Cut::Revoked), Operation::RevokeCredentials);
        assert_eq!(
            Operation::from(Cut::Disconnected),
            Operation::DisconnectIntegration
        );
    }

    #[test]
    fn only_a_refresh_of_the_cut_service_is_refused() {
        let mut s = ControlState::initial();
        cut(&mut s, "google");
        assert!(refusing(&s, CommandType::RefreshToken, "google").is_some());
        assert!(refusing(&s, CommandType::RefreshToken, "meta").is_none());
        assert!(refusing(&s, CommandType::CheckIntegrationStatus, "google").is_none());
        let why = refusal(
            "google",
            refusing(&s, CommandType::RefreshToken, "google").unwrap(),
        );
        assert!(why.contains("revoked by ops"), "{why}");
        assert!(why.contains("SOP-INT-03"), "{why}");
        assert!(why.contains("command-poller reconnected google"), "{why}");
    }
}
