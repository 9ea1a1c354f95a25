//! The operator's and approvers' levers from the command line: each sends one request to the
//! control or approvals exchange as the person's own broker user and prints the answers.

use super::args::{ApproverArgs, Command, IncidentCommand, OperatorArgs};
use crate::control::operator::Operator;
use crate::control::ControlCommand;
use crate::settings::Settings;
use std::process::ExitCode;
use std::time::Duration;

/// Sends an approver's request and prints the answer; exit status 3 when it was refused.
pub(super) async fn decide(
    settings: &Settings,
    ap: ApproverArgs,
    req: crate::approval::wire::Request,
) -> anyhow::Result<ExitCode> {
    use crate::approval::wire::ReplyOutcome;
    let approver = crate::approval::approver::Approver {
        settings: &settings.approval,
        endpoints: endpoints_of(ap.amqp_url, settings)?,
        wait: Duration::from_millis(ap.wait_ms),
    };
    let reply = approver.send(&req).await?;
    println!("{}", serde_json::to_string_pretty(&reply)?);
    Ok(if reply.outcome == ReplyOutcome::Refused {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    })
}

/// The broker nodes a command-line flag names (comma-separated), or the configured ones.
pub(super) fn endpoints_of(
    flag: Option<String>,
    settings: &Settings,
) -> anyhow::Result<crate::broker::Endpoints> {
    match flag {
        Some(list) => {
            crate::broker::Endpoints::parse(&list).map_err(|e| anyhow::anyhow!("--amqp-url: {e}"))
        }
        None => Ok(settings.amqp.checked_endpoints()),
    }
}

/// Pulls a lever and prints every replica's answer; exit status 1 when one refused it (or, for
/// a revoke or disconnect, when no replica reported the bridge carrying it out).
pub(super) async fn operate(
    settings: &Settings,
    op: OperatorArgs,
    cmd: ControlCommand,
) -> anyhow::Result<ExitCode> {
    let endpoints = endpoints_of(op.amqp_url, settings)?;
    let operator = Operator::new(settings, &endpoints, Duration::from_millis(op.wait_ms));
    let cmd_is_cut = cmd.cut().is_some();
    let report = operator.run(cmd).await?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    // A cut nobody reported carried out, or whose bridge call failed, is not done.
    let cut_undone = cmd_is_cut
        && !report
            .replicas
            .iter()
            .any(|r| r.cut.as_ref().is_some_and(|c| c.error.is_none()));
    let refused = report.replicas.iter().any(|r| !r.accepted) || cut_undone;
    Ok(if refused {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// `approve`: an approver's approval of a parked command, bound to its digest.
pub(super) async fn approve(
    settings: &Settings,
    ap: ApproverArgs,
    approval_id: String,
    digest: String,
    reason: String,
) -> anyhow::Result<ExitCode> {
    let req = crate::approval::wire::Request::Approve {
        approval_id,
        digest,
        reason,
    };
    decide(settings, ap, req).await
}

/// The lever on the fleet (`pause`, `halt`, `resume`, `second`), one agent (`quarantine`, `release`) or one
/// service (`revoke`, `disconnect`, `reconnected`), and the operator's flags.
pub(super) fn lever_of(command: Command, request_id: String) -> (ControlCommand, OperatorArgs) {
    match command {
        Command::Pause { reason, op } => (ControlCommand::Pause { reason, request_id }, op),
        Command::Halt { reason, op } => (ControlCommand::Halt { reason, request_id }, op),
        Command::Resume {
            reason,
            lift_halt,
            post_mortem,
            op,
        } => (
            ControlCommand::Resume {
                reason,
                lift_halt,
                post_mortem,
                request_id,
            },
            op,
        ),
        Command::Second {
            proposal,
            digest,
            reason,
            op,
        } => (
            ControlCommand::Second {
                proposal,
                digest,
                reason,
                request_id,
            },
            op,
        ),
        Command::Quarantine { agent, reason, op } => (
            ControlCommand::Quarantine {
                agent,
                reason,
                request_id,
            },
            op,
        ),
        Command::Release { agent, reason, op } => (
            ControlCommand::Release {
                agent,
                reason,
                request_id,
            },
            op,
        ),
        Command::Revoke {
            service,
            reason,
            op,
        } => (
            ControlCommand::Revoke {
                service,
                reason,
                request_id,
            },
            op,
        ),
        Command::Disconnect {
            service,
            reason,
            op,
        } => (
            ControlCommand::Disconnect {
                service,
                reason,
                request_id,
            },
            op,
        ),
        Command::Reconnected {
            service,
            reason,
            op,
        } => (
            ControlCommand::Reconnected {
                service,
                reason,
                request_id,
            },
            op,
        ),
        other => grant_lever(other, request_id),
    }
}

/// `grant` and `ungrant`: the lever, and the operator's flags.
fn grant_lever(command: Command, request_id: String) -> (ControlCommand, OperatorArgs) {
    match command {
        Command::Grant {
            agent,
            command_type,
            service,
            uses,
            for_secs,
            reason,
            op,
        } => (
            ControlCommand::Grant {
                agent,
                command_type,
                service,
                uses,
                for_secs,
                reason,
                request_id,
            },
            op,
        ),
        Command::Ungrant { grant, reason, op } => (
            ControlCommand::Ungrant {
                grant,
                reason,
                request_id,
            },
            op,
        ),
        _ => unreachable!("not a lever on the fleet, an agent, a service or a grant"),
    }
}

/// `incident open` and `incident close`: the lever, and the operator's flags.
pub(super) fn incident_lever(
    command: IncidentCommand,
    request_id: String,
) -> (ControlCommand, OperatorArgs) {
    match command {
        IncidentCommand::Open { reason, op } => {
            (ControlCommand::OpenIncident { reason, request_id }, op)
        }
        IncidentCommand::Close { id, reason, op } => (
            ControlCommand::CloseIncident {
                incident: id,
                reason,
                request_id,
            },
            op,
        ),
        _ => unreachable!("a read, answered before"),
    }
}
