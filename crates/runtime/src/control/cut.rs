//! A revoke or disconnect carried out at the provider, once for the fleet: the runbook's step 2
//! of Emergency-INT-E01 and -E02, done by the bridge instead of by hand.
//!
//! In: a cut lever the enforced state already shows (the operator stored it first, so the
//! service's refreshes are refused whatever happens here). Out: a [`CutReport`]: the bridge's
//! answer per credential (`revoked at provider`, or `deleted locally, revoke by hand at <admin
//! page>`), or why the call failed.
//!
//! Every replica receives the lever; the one that takes its claim in the result store calls the
//! bridge, stores the report (sealed) and announces it; the others answer that it is carried
//! out elsewhere, and a lever delivered again is answered from the stored report. The call is
//! never held back by a pause or halt (step 2 comes after step 1) nor by a store that is down
//! (a cut is the safe side, and the bridge's dedup on the request id answers a repeat without
//! acting twice).

use crate::bridge::{AlwaysAdmit, Bridge, BridgeParams, BridgeRequest, Operation};
use poller_core::bridge::signing::Secret;
use poller_core::control::Cut;
use poller_core::store::{ClaimGuard, Claims, Taken};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

/// What a cut came to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CutReport {
    /// The replica that called the bridge.
    pub carried_out_by: String,
    pub operation: Operation,
    pub service: String,
    /// The bridge's answer (`{"status":"success","credentials":[...]}`); `None` when it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<serde_json::Value>,
    /// Why the bridge call failed: the cut is stored, the provider side is not done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// RFC 3339.
    pub at: String,
}

impl CutReport {
    /// One line per credential, for the alert: `GOOGLE_REFRESH_TOKEN: revoked at provider`.
    pub fn credentials(&self) -> Vec<String> {
        let Some(list) = self
            .answer
            .as_ref()
            .and_then(|a| a.get("credentials"))
            .and_then(|c| c.as_array())
        else {
            return Vec::new();
        };
        list.iter()
            .map(|c| {
                let field = |k: &str| c.get(k).and_then(|v| v.as_str()).unwrap_or("?");
                format!("{}: {}", field("credential"), field("outcome"))
            })
            .collect()
    }

    /// Whether every credential was revoked at the provider (nothing left to do by hand).
    pub fn complete_at_provider(&self) -> bool {
        let lines = self.credentials();
        !lines.is_empty() && lines.iter().all(|l| l.ends_with(": revoked at provider"))
    }
}

/// Where a cut was carried out.
#[derive(Debug, Clone, PartialEq)]
pub enum Carried {
    /// Here, just now: announce it.
    Here(CutReport),
    /// Earlier, by this or another replica (the lever was delivered again).
    Stored(CutReport),
    /// Another replica holds the lever's claim: it carries it out and announces it.
    Elsewhere(String),
}

/// The bridge and the result store, as a replica's control side uses them.
pub struct Cutter {
    bridge: Arc<dyn Bridge>,
    claims: Claims,
    seal: Secret,
}

impl Cutter {
    pub fn new(bridge: Arc<dyn Bridge>, claims: Claims, seal: Secret) -> Self {
        Self {
            bridge,
            claims,
            seal,
        }
    }

    /// Carries out `cut` of `service`, asked by operator `by` in control request `request_id`.
    pub async fn carry_out(&self, cut: Cut, service: &str, request_id: &str, by: &str) -> Carried {
        let key = lever_key(request_id);
        let claim = match ClaimGuard::take(&self.claims, key, Duration::ZERO).await {
            Ok(Taken::Mine(guard)) => Some(guard),
            Ok(Taken::Busy(owner)) => return Carried::Elsewhere(owner),
            Ok(Taken::Done(stored)) => match self.stored(&stored) {
                Some(report) => return Carried::Stored(report),
                None => {
                    tracing::warn!("a stored cut report can't be trusted; carrying the cut out again (the bridge answers a repeat as it did)");
                    None
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "result store unavailable; carrying the cut out anyway (the bridge answers a repeat as it did)");
                None
            }
        };
        let request = BridgeRequest {
            action_id: request_id.to_owned(),
            command_type: cut.into(),
            params: BridgeParams {
                service: service.to_owned(),
            },
            agent: bridge_agent(by),
            agent_verified: true,
            requested_at: crate::clock::now_rfc3339(),
            lookup: false,
        };
        let answer = self.bridge.execute(&request, &AlwaysAdmit).await;
        let report = CutReport {
            carried_out_by: self.claims.instance.clone(),
            operation: cut.into(),
            service: service.to_owned(),
            error: answer.as_ref().err().map(|e| e.to_string()),
            answer: answer.ok().map(|a| a.tool_result),
            at: crate::clock::now_rfc3339(),
        };
        if let Some(guard) = claim {
            let json = serde_json::to_string(&report).expect("a report serializes");
            if let Err(e) = guard.complete_json(&json, &self.seal).await {
                tracing::warn!(error = %e, "could not store the cut's report; a lever delivered again asks the bridge again");
            }
        }
        Carried::Here(report)
    }

    fn stored(&self, sealed: &str) -> Option<CutReport> {
        let json = poller_core::store::unseal(&self.seal, sealed).ok()?;
        serde_json::from_str(&json).ok()
    }
}

/// Who asks the bridge: `operator:<broker user>`, in the characters the web app accepts for an
/// agent (others become `_`), at most 64 of them.
fn bridge_agent(by: &str) -> String {
    format!("operator:{by}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '@' | ':' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect()
}

/// The store key of a lever's claim: apart from every agent's `<agent>/<action_id>` (no agent
/// id holds `#`).
fn lever_key(request_id: &str) -> String {
    format!("#lever/{request_id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(answer: serde_json::Value) -> CutReport {
        CutReport {
            carried_out_by: "r1".into(),
            operation: Operation::RevokeCredentials,
            service: "google".into(),
            answer: Some(answer),
            error: None,
            at: "t".into(),
        }
    }

    #[test]
    fn a_report_lists_each_credential_and_says_when_nothing_is_left_by_hand() {
        let done = report(serde_json::json!({"credentials": [
            {"credential": "GOOGLE_REFRESH_TOKEN", "outcome": "revoked at provider"},
            {"credential": "GOOGLE_ACCESS_TOKEN", "outcome": "revoked at provider"}
        ]}));
        assert_eq!(
            done.credentials()[0],
            "GOOGLE_REFRESH_TOKEN: revoked at provider"
        );
        assert!(done.complete_at_provider());
        let by_hand = report(serde_json::json!({"credentials": [
            {"credential": "MAILCHIMP_API_KEY", "outcome": "deleted locally, revoke by hand at https://admin.mailchimp.com/account/api/"}
        ]}));
        assert!(!by_hand.complete_at_provider());
        let failed = CutReport {
            answer: None,
            error: Some("bridge error".into()),
            ..done
        };
        assert!(failed.credentials().is_empty());
        assert!(!failed.complete_at_provider());
    }

    #[test]
    fn the_bridge_hears_the_operator_in_the_characters_it_accepts() {
        assert_eq!(bridge_agent("ops"), "operator:ops");
        assert_eq!(bridge_agent("alice.smith/x"), "operator:alice_smith_x");
        assert_eq!(bridge_agent(&"a".repeat(100)).len(), 64);
    }

    #[test]
    fn a_levers_key_is_apart_from_every_agents() {
        let key = lever_key("r-1");
        assert!(poller_core::intake::AgentId::parse(key.split('/').next().unwrap()).is_err());
    }
}
