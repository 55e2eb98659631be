//! Task commands: `submit`, `tasks`, `task show`, `events` and `cancel`.
//!
//! `--follow` polls the session by position (events `next..`) every [`FOLLOW_POLL`], so a
//! follower that reconnects misses nothing and sees nothing twice.

use super::client::OperatorClient;
use super::output::{age, table, timestamp};
use super::settings::Resolved;
use super::{exit, CliError};
use crate::tasks::lifecycle::describe_exit;
use crate::tasks::{load_spec, WaitReason, WorkerView};
use clap::Args;
use drover_protocol::task::{SessionEvent, TaskInfo, TaskState};
use drover_protocol::{OperatorRequest, OperatorResponse};
use std::path::PathBuf;
use std::time::Duration;

/// How often `--follow` asks for new events.
pub const FOLLOW_POLL: Duration = Duration::from_millis(200);

#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// Task spec file, TOML or JSON (docs/task-spec.md; examples in examples/).
    pub spec: PathBuf,
    /// Stream the task's events until it ends, then exit with its status (0 succeeded,
    /// 1 failed or cancelled).
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// Print events as JSON lines while following (and the id as JSON).
    #[arg(long)]
    pub json: bool,
    /// Refuse to submit (exit 1, nothing queued) when no known worker could ever run the
    /// task — none has its arch, labels and total cpus/memory/gpus. Without it such a task is
    /// queued with a warning, in case a matching worker joins.
    #[arg(long)]
    pub no_queue: bool,
}

#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Task id.
    pub id: String,
    /// First position to print.
    #[arg(long, default_value_t = 0)]
    pub from: u64,
    /// Stop before this position (exclusive).
    #[arg(long)]
    pub to: Option<u64>,
    /// Keep printing new events until the task ends.
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// One JSON object per line (schema in docs/json-schema.md), payload parsed.
    #[arg(long)]
    pub json: bool,
}

async fn ask(
    client: &mut OperatorClient,
    req: OperatorRequest,
) -> Result<OperatorResponse, CliError> {
    match client.request(&req).await? {
        OperatorResponse::Error { kind, message } => Err(super::run::error_response(kind, message)),
        other => Ok(other),
    }
}

pub async fn submit(s: &Resolved, args: SubmitArgs) -> Result<(), CliError> {
    // A bad spec is bad input in a file, like a bad config: 64, with the file and field named.
    let loaded = load_spec(&args.spec).map_err(|e| CliError::new(exit::CONFIG, e.to_string()))?;
    if !loaded.inputs.is_empty() {
        return Err(CliError::new(
            exit::CONFIG,
            format!(
                "{}: `inputs` are not shipped yet by this version of drover; remove them, or put the files \
                 where the task can reach them",
                args.spec.display()
            ),
        ));
    }
    if !loaded.spec.outputs.is_empty() {
        eprintln!("drover: note: `outputs` are not collected yet by this version; the task runs without them");
    }
    let mut client = OperatorClient::connect(s).await?;
    let request = OperatorRequest::ListWorkers {
        state: None,
        label: None,
    };
    let workers = match ask(&mut client, request).await? {
        OperatorResponse::Workers(list) => list,
        other => return Err(super::run::unexpected(other)),
    };
    let views: Vec<WorkerView> = workers
        .iter()
        .map(|w| WorkerView::new(w, Default::default()))
        .collect();
    let never = WaitReason::new(&loaded.spec.requirements, &views);
    if never.is_unsatisfiable() {
        if args.no_queue {
            client.close().await;
            return Err(CliError::new(
                exit::FAILURE,
                format!(
                    "{}: not submitted (--no-queue): no known worker could ever run it: {never}",
                    args.spec.display()
                ),
            ));
        }
        eprintln!(
            "drover: warning: no known worker could ever run this task: {never}; it stays \
             queued until a matching worker joins (`drover cancel ID` to drop it)"
        );
    }
    let id = match ask(&mut client, OperatorRequest::Submit { spec: loaded.spec }).await? {
        OperatorResponse::Submitted { id } => id,
        other => return Err(super::run::unexpected(other)),
    };
    if args.json {
        outln!("{}", serde_json::json!({ "id": id }));
    } else {
        outln!("{id}");
    }
    let result = match args.follow {
        true => follow(&mut client, &id, 0, None, args.json).await,
        false => Ok(None),
    };
    client.close().await;
    let state = result?;
    match state {
        Some(TaskState::Succeeded) | None => Ok(()),
        Some(other) => Err(CliError::new(exit::FAILURE, format!("task {id} {other}"))),
    }
}

/// Print events from `from` until the task ends (or `to`); returns the final state if it ended.
async fn follow(
    client: &mut OperatorClient,
    id: &str,
    mut next: u64,
    to: Option<u64>,
    json: bool,
) -> Result<Option<TaskState>, CliError> {
    loop {
        let req = OperatorRequest::Events {
            id: id.to_owned(),
            from: next,
            to,
            limit: 1000,
        };
        let (events, _len) = match ask(client, req).await? {
            OperatorResponse::Events { events, len } => (events, len),
            other => return Err(super::run::unexpected(other)),
        };
        let mut completed = false;
        for e in &events {
            print_event(e, json);
            next = e.pos + 1;
            completed |= e.kind == "completed";
        }
        if to.is_some_and(|t| next >= t) {
            return Ok(None);
        }
        if completed {
            return match ask(client, OperatorRequest::ShowTask { id: id.to_owned() }).await? {
                OperatorResponse::Task(t) => Ok(Some(t.state)),
                other => Err(super::run::unexpected(other)),
            };
        }
        if events.is_empty() {
            tokio::time::sleep(FOLLOW_POLL).await;
        }
    }
}

fn print_event(e: &SessionEvent, json: bool) {
    let payload: serde_json::Value =
        serde_json::from_str(&e.payload).unwrap_or(serde_json::Value::Null);
    if json {
        let line = serde_json::json!({
            "task_id": e.task_id, "pos": e.pos, "epoch": e.epoch, "seq": e.seq,
            "ts_ms": e.ts_ms, "kind": e.kind, "payload": payload,
        });
        outln!("{line}");
        return;
    }
    let time = timestamp(e.ts_ms);
    let clock = time.get(11..19).unwrap_or(&time);
    let body = match e.kind.as_str() {
        "stdout" | "stderr" => payload
            .get("data")
            .and_then(|d| d.as_str())
            .unwrap_or("")
            .trim_end_matches('\n')
            .to_owned(),
        _ => payload.to_string(),
    };
    let mut lines = body.lines();
    let first = lines.next().unwrap_or("");
    outln!(
        "{:>5}  {clock}  a{:<3} {:<16} {first}",
        e.pos,
        e.epoch,
        e.kind
    );
    for more in lines {
        outln!("{:>5}  {:8}  {:4} {:<16} {more}", "", "", "", "");
    }
}

pub async fn events(s: &Resolved, args: EventsArgs) -> Result<(), CliError> {
    let mut client = OperatorClient::connect(s).await?;
    let result = if args.follow {
        follow(&mut client, &args.id, args.from, args.to, args.json)
            .await
            .map(drop)
    } else {
        print_slice(&mut client, &args).await
    };
    client.close().await;
    result
}

async fn print_slice(client: &mut OperatorClient, args: &EventsArgs) -> Result<(), CliError> {
    let mut next = args.from;
    loop {
        let req = OperatorRequest::Events {
            id: args.id.clone(),
            from: next,
            to: args.to,
            limit: 1000,
        };
        let events = match ask(client, req).await? {
            OperatorResponse::Events { events, .. } => events,
            other => return Err(super::run::unexpected(other)),
        };
        let Some(last) = events.last() else {
            return Ok(());
        };
        next = last.pos + 1;
        for e in &events {
            print_event(e, args.json);
        }
    }
}

pub async fn cancel(s: &Resolved, id: String) -> Result<(), CliError> {
    let mut client = OperatorClient::connect(s).await?;
    let answer = ask(&mut client, OperatorRequest::Cancel { id: id.clone() }).await;
    client.close().await;
    match answer? {
        OperatorResponse::CancelRequested {
            already_final: true,
            ..
        } => {
            outln!("{id} had already ended; nothing to cancel");
            Ok(())
        }
        OperatorResponse::CancelRequested { .. } => {
            outln!("{id}: cancel requested");
            Ok(())
        }
        other => Err(super::run::unexpected(other)),
    }
}

pub fn tasks_table(list: &[TaskInfo], now_ms: u64) -> String {
    if list.is_empty() {
        return "No tasks match.\n".into();
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|t| {
            vec![
                t.id.clone(),
                t.name.clone(),
                t.state.to_string(),
                t.attempts.to_string(),
                t.worker.clone().unwrap_or_else(|| "-".into()),
                age(now_ms.saturating_sub(t.submitted_ms)),
                t.reason.clone().unwrap_or_default(),
            ]
        })
        .collect();
    table(
        &["ID", "NAME", "STATE", "ATTEMPTS", "WORKER", "AGE", "REASON"],
        &rows,
    )
}

pub fn task_detail(t: &TaskInfo) -> String {
    let mut rows = vec![
        ("ID", t.id.clone()),
        ("Name", t.name.clone()),
        ("State", t.state.to_string()),
        ("Attempts", format!("{} (epoch {})", t.attempts, t.epoch)),
        ("Worker", t.worker.clone().unwrap_or_else(|| "-".into())),
        ("Submitted", timestamp(t.submitted_ms)),
        ("Command", t.spec.command.join(" ")),
    ];
    if let Some(f) = t.finished_ms {
        rows.push(("Finished", timestamp(f)));
    }
    if let Some(x) = t.exit {
        rows.push(("Last exit", describe_exit(x)));
    }
    if let Some(r) = &t.reason {
        rows.push((
            if t.state == TaskState::Queued {
                "Waiting"
            } else {
                "Reason"
            },
            r.clone(),
        ));
    }
    rows.push(("Events", format!("{} (drover events {})", t.events, t.id)));
    rows.iter()
        .map(|(k, v)| format!("{:<11}{v}\n", format!("{k}:")))
        .collect()
}
