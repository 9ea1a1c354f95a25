//! Incidents from the audit file, and the bundle the security team and the post-mortem get.
//!
//! In: the hash-chained audit file (and its chain key when keyed). Out: the incidents
//! ([`poller_core::incident`]) for `incident list` and `incident show`, and for `audit export
//! --incident ID` a self-verifying [`Bundle`]: the incident, the chain lines it was built from
//! exactly as written (their links checkable without the rest of the file), the policy digests
//! in force and the bridge's deployment version when the exporter knows it. [`verify_bundle`]
//! checks every line's hash, the links between consecutive lines, and that the incident is
//! what its own lines give, so an edited summary or a dropped line is caught.

use super::chain::{self, ChainError, ReadLine};
use crate::bridge::signing::Secret;
use poller_core::audit::AuditRecord;
use poller_core::incident::{incidents, Incident};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::path::Path;

/// What the bundle says it is.
pub const BUNDLE_FORMAT: &str = "command-poller/incident-bundle/1";

#[derive(Debug, thiserror::Error)]
pub enum IncidentError {
    #[error(transparent)]
    Chain(#[from] ChainError),
    #[error("the audit file does not verify (line {line}: {why}): no incident is read from a chain that may have been altered")]
    Unverified { line: usize, why: String },
    #[error("no incident {0} in the audit file (`command-poller incident list` shows them)")]
    NotFound(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bundle {
    pub format: String,
    pub incident: Incident,
    /// Every policy digest that decided or was reloaded within it (also in `incident`).
    pub policy_sha256: BTreeSet<String>,
    /// The web app deployment the exporter names (`--bridge-version`), when known.
    pub bridge_version: Option<String>,
    /// Whether the chain is keyed: verifying then needs the chain key.
    pub keyed: bool,
    /// The chain lines the incident was built from, exactly as written, in chain order.
    pub lines: Vec<String>,
    /// RFC 3339.
    pub exported_at: String,
}

/// What [`verify_bundle`] found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BundleReport {
    pub lines: usize,
    /// Runs of consecutive lines whose links were checked against each other.
    pub linked_runs: usize,
    pub first_bad: Option<String>,
}

impl BundleReport {
    pub fn ok(&self) -> bool {
        self.first_bad.is_none()
    }
}

/// The records of `lines`, numbered; a line whose record this version can't read is left out
/// (its hash still counts in a verification).
fn numbered(lines: &[String]) -> Vec<(u64, AuditRecord)> {
    lines
        .iter()
        .filter_map(|l| {
            let r = ReadLine::parse(l).ok()?;
            Some((r.seq, serde_json::from_str(&r.record).ok()?))
        })
        .collect()
}

/// Every incident in the audit file at `path`, after verifying the whole chain.
pub fn read(path: &Path, key: Option<&Secret>) -> Result<Vec<Incident>, IncidentError> {
    let report = chain::verify_with(path, key)?;
    if let Some(bad) = report.first_bad {
        return Err(IncidentError::Unverified {
            line: bad.line,
            why: bad.why,
        });
    }
    Ok(incidents(&numbered(&chain::lines(path)?)))
}

/// The bundle of incident `id`.
pub fn export(
    path: &Path,
    key: Option<&Secret>,
    id: &str,
    bridge_version: Option<String>,
) -> Result<Bundle, IncidentError> {
    let incident = read(path, key)?
        .into_iter()
        .find(|i| i.id == id)
        .ok_or_else(|| IncidentError::NotFound(id.to_owned()))?;
    let lines = chain::lines(path)?
        .into_iter()
        .filter(|l| {
            ReadLine::parse(l)
                .map(|r| incident.seqs.contains(&r.seq))
                .unwrap_or(false)
        })
        .collect();
    Ok(Bundle {
        format: BUNDLE_FORMAT.into(),
        policy_sha256: incident.policy_sha256.clone(),
        incident,
        bridge_version,
        keyed: key.is_some(),
        lines,
        exported_at: crate::clock::now_rfc3339(),
    })
}

/// Checks a bundle on its own: each line's hash, each link between consecutive lines, and the
/// incident against what its lines give.
pub fn verify_bundle(b: &Bundle, key: Option<&Secret>) -> BundleReport {
    let mut report = BundleReport {
        lines: b.lines.len(),
        linked_runs: 0,
        first_bad: None,
    };
    let bad = |why: String| Some(why);
    if b.format != BUNDLE_FORMAT {
        report.first_bad = bad(format!("format {:?} is not {BUNDLE_FORMAT}", b.format));
        return report;
    }
    if b.keyed != key.is_some() {
        report.first_bad = bad(if b.keyed {
            "a keyed chain's bundle: verifying it needs the chain key (AUDIT_CHAIN_KEY)".into()
        } else {
            "an unkeyed bundle checked with a chain key: its lines were not written with it".into()
        });
        return report;
    }
    let mut previous: Option<ReadLine> = None;
    for (i, l) in b.lines.iter().enumerate() {
        let n = i + 1;
        let line = match ReadLine::parse(l) {
            Ok(line) => line,
            Err(e) => {
                report.first_bad = bad(format!("line {n} is not a chain line: {e}"));
                return report;
            }
        };
        if !line.holds(key) {
            report.first_bad = bad(format!(
                "line {n} (seq {}): its hash does not match its record (altered)",
                line.seq
            ));
            return report;
        }
        match &previous {
            Some(p) if line.seq <= p.seq => {
                report.first_bad = bad(format!("line {n}: seq {} out of order", line.seq));
                return report;
            }
            Some(p) if line.seq == p.seq + 1 && line.prev != p.hash => {
                report.first_bad = bad(format!(
                    "line {n} (seq {}): does not link to seq {}",
                    line.seq, p.seq
                ));
                return report;
            }
            Some(p) if line.seq == p.seq + 1 => {}
            _ => report.linked_runs += 1,
        }
        previous = Some(line);
    }
    let rebuilt = incidents(&numbered(&b.lines))
        .into_iter()
        .find(|i| i.id == b.incident.id);
    if rebuilt.as_ref() != Some(&b.incident) {
        report.first_bad = bad(
            "the incident is not what its own lines give (the summary was edited, or lines were dropped)"
                .into(),
        );
    } else if b.policy_sha256 != b.incident.policy_sha256 {
        report.first_bad = bad("policy_sha256 differs from the incident's".into());
    }
    report
}

/// `show`: the incident as an investigator reads it.
pub fn render(i: &Incident) -> String {
    let mut out = format!(
        "incident {}: opened {} by {} ({:?}): {}\n",
        i.id, i.opened_at, i.opened_by, i.opener, i.reason
    );
    match &i.closed {
        Some(c) => out.push_str(&format!("closed {} by {}: {}\n", c.at, c.by, c.reason)),
        None => out.push_str("still open\n"),
    }
    out.push_str("\ntimeline:\n");
    for e in &i.timeline {
        out.push_str(&format!("  #{:<6} {}  {}\n", e.seq, e.at, e.what));
    }
    out.push_str("\naffected actions by agent:\n");
    for (agent, ids) in &i.by_agent {
        out.push_str(&format!("  {agent}: {}\n", ids.join(", ")));
    }
    out.push_str("by service:\n");
    for (service, ids) in &i.by_service {
        out.push_str(&format!("  {service}: {}\n", ids.join(", ")));
    }
    out.push_str("policy digests in force:\n");
    for d in &i.policy_sha256 {
        out.push_str(&format!("  {d}\n"));
    }
    out
}
