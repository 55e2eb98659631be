//! Fleet operations: `drover drain`, `drover undrain`, and `drover status` with what needs an
//! operator's eye (lost and draining workers, retrying tasks).

use super::client::OperatorClient;
use super::output;
use super::settings::Resolved;
use super::{exit, CliError, ConnArgs, JsonArg};
use crate::tasks::units::parse_duration;
use clap::Args;
use drover_protocol::{
    Attention, FleetSummary, OperatorRequest, OperatorResponse, RetryingTask, WorkerNote,
    WorkerState,
};
use serde::Serialize;

#[derive(Debug, Args)]
pub struct DrainArgs {
    /// The worker's name (its certificate name; `drover workers` lists them).
    pub name: String,
    /// How long running attempts may go on, e.g. 10m, 90s, 1h30m. Past it, those still running
    /// are stopped and rescheduled on other workers (not counted against their max_attempts).
    /// Without it they run to their end. Draining again replaces the deadline.
    #[arg(long, value_name = "DURATION", value_parser = parse_deadline)]
    pub deadline: Option<u64>,
    #[command(flatten)]
    pub conn: ConnArgs,
    #[command(flatten)]
    pub json: JsonArg,
}

#[derive(Debug, Args)]
pub struct UndrainArgs {
    /// The worker's name.
    pub name: String,
    #[command(flatten)]
    pub conn: ConnArgs,
    #[command(flatten)]
    pub json: JsonArg,
}

fn parse_deadline(s: &str) -> Result<u64, String> {
    parse_duration(s).map_err(|e| format!("{e} (e.g. --deadline 10m)"))
}

async fn ask(s: &Resolved, reqs: Vec<OperatorRequest>) -> Result<Vec<OperatorResponse>, CliError> {
    let mut client = OperatorClient::connect(s).await?;
    let mut answers = Vec::with_capacity(reqs.len());
    let mut failed = None;
    for req in reqs {
        match client.request(&req).await {
            Ok(OperatorResponse::Error { kind, message }) => {
                failed = Some(super::run::error_response(kind, message));
                break;
            }
            Ok(answer) => answers.push(answer),
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    client.close().await;
    match failed {
        Some(e) => Err(e),
        None => Ok(answers),
    }
}

pub async fn drain(s: &Resolved, args: DrainArgs) -> Result<(), CliError> {
    let req = OperatorRequest::Drain {
        name: args.name,
        deadline_in_ms: args.deadline,
    };
    report(s, req, args.json.json).await
}

pub async fn undrain(s: &Resolved, args: UndrainArgs) -> Result<(), CliError> {
    report(
        s,
        OperatorRequest::Undrain { name: args.name },
        args.json.json,
    )
    .await
}

async fn report(s: &Resolved, req: OperatorRequest, json: bool) -> Result<(), CliError> {
    match ask(s, vec![req]).await?.pop() {
        Some(OperatorResponse::Drain(r)) => {
            if json {
                outln!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                out!("{}", output::drain_report(&r));
            }
            Ok(())
        }
        Some(other) => Err(super::run::unexpected(other)),
        None => Err(CliError::new(
            exit::FAILURE,
            "the coordinator did not answer",
        )),
    }
}

/// `drover status --json`: the fleet summary with the lists behind its counts that need
/// attention.
#[derive(Debug, Serialize)]
pub struct StatusJson<'a> {
    #[serde(flatten)]
    pub summary: &'a FleetSummary,
    pub lost: Vec<&'a WorkerNote>,
    pub draining: Vec<&'a WorkerNote>,
    pub retrying: &'a [RetryingTask],
}

pub async fn status(s: &Resolved, json: bool) -> Result<(), CliError> {
    let answers = ask(
        s,
        vec![OperatorRequest::FleetStatus, OperatorRequest::Attention],
    )
    .await?;
    let mut answers = answers.into_iter();
    let (Some(OperatorResponse::FleetStatus(summary)), Some(OperatorResponse::Attention(att))) =
        (answers.next(), answers.next())
    else {
        return Err(CliError::new(
            exit::FAILURE,
            "unexpected answer from the coordinator to a status request",
        ));
    };
    if json {
        let (lost, draining) = split(&att);
        let doc = StatusJson {
            summary: &summary,
            lost,
            draining,
            retrying: &att.retrying,
        };
        outln!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        out!("{}", output::status(&summary));
        out!("{}", output::attention(&att));
    }
    Ok(())
}

/// The attention note of worker `name`, if it has one (lost, draining, or drained); `None`
/// also when the coordinator cannot say (the caller prints what it has).
pub async fn note(s: &Resolved, name: &str) -> Option<WorkerNote> {
    match ask(s, vec![OperatorRequest::Attention]).await.ok()?.pop()? {
        OperatorResponse::Attention(a) => a.workers.into_iter().find(|w| w.name == name),
        _ => None,
    }
}

/// Lost workers, and the rest (draining, or with a drain waiting for them to return).
pub fn split(att: &Attention) -> (Vec<&WorkerNote>, Vec<&WorkerNote>) {
    att.workers
        .iter()
        .partition(|w| w.state == WorkerState::Lost)
}
