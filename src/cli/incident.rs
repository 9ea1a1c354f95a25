//! Incidents from the command line: `incident list` and `show` read the audit file,
//! `audit export --incident` writes an incident's bundle and `audit verify-bundle` checks one,
//! with the chain key and no other configuration; `incident open` and `close` are levers.

use super::args::{AuditCommand, IncidentCommand};
use crate::audit::incident::{self, Bundle};
use crate::bridge::signing::Secret;
use std::process::ExitCode;

/// `incident ...` with the configuration loaded: a read with its chain key, or a lever.
pub(super) async fn run(
    settings: &crate::settings::Settings,
    cmd: IncidentCommand,
    request_id: String,
) -> anyhow::Result<ExitCode> {
    if cmd.reads_back() {
        return read_back(cmd, settings.secrets.audit_chain_key.clone());
    }
    let (lever, op) = super::levers::incident_lever(cmd, request_id);
    super::levers::operate(settings, op, lever).await
}

/// `incident list` and `incident show`, with the chain key `key`.
pub(super) fn read_back(cmd: IncidentCommand, key: Option<Secret>) -> anyhow::Result<ExitCode> {
    match cmd {
        IncidentCommand::List { file } => {
            for i in incident::read(&file, key.as_ref())? {
                let state = match &i.closed {
                    Some(c) => format!("closed {} by {}", c.at, c.by),
                    None => "OPEN".into(),
                };
                println!(
                    "{}\t{:?}\topened {} by {}\t{state}\t{}",
                    i.id, i.opener, i.opened_at, i.opened_by, i.reason
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        IncidentCommand::Show { id, file, json } => {
            let found = incident::read(&file, key.as_ref())?
                .into_iter()
                .find(|i| i.id == id)
                .ok_or(incident::IncidentError::NotFound(id))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&found)?);
            } else {
                print!("{}", incident::render(&found));
            }
            Ok(ExitCode::SUCCESS)
        }
        IncidentCommand::Open { .. } | IncidentCommand::Close { .. } => {
            anyhow::bail!("opening or closing an incident is a lever, not a read")
        }
    }
}

/// `audit export --incident` and `audit verify-bundle`, with the chain key `key`.
pub(super) fn bundle(cmd: AuditCommand, key: Option<Secret>) -> anyhow::Result<ExitCode> {
    match cmd {
        AuditCommand::Export {
            file,
            incident: id,
            out,
            bridge_version,
        } => {
            let b = incident::export(&file, key.as_ref(), &id, bridge_version)?;
            let text = serde_json::to_string_pretty(&b)?;
            std::fs::write(&out, text)
                .map_err(|e| anyhow::anyhow!("writing {}: {e}", out.display()))?;
            eprintln!(
                "incident {id}: {} chain lines written to {}",
                b.lines.len(),
                out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::VerifyBundle { bundle } => {
            let text = std::fs::read_to_string(&bundle)
                .map_err(|e| anyhow::anyhow!("reading {}: {e}", bundle.display()))?;
            let b: Bundle = serde_json::from_str(&text)
                .map_err(|e| anyhow::anyhow!("{} is not a bundle: {e}", bundle.display()))?;
            let report = incident::verify_bundle(&b, key.as_ref());
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(if report.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        _ => anyhow::bail!("not a bundle command"),
    }
}
