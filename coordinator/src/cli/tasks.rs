//! Task commands: `submit`, `tasks`, `task show`, `events`, `cancel` and `outputs`.
//!
//! `submit` packs a spec's inputs into a tar archive (in an unlinked temporary file, never
//! whole in memory) and sends it with the spec; `outputs` fetches an attempt's outputs archive
//! the same way and unpacks it into the destination as hostile input (see
//! `drover_worker::archive`), refusing to overwrite files unless `--force`.
//!
//! `--follow` polls the session by position (events `next..`) every [`FOLLOW_POLL`], so a
//! follower that reconnects misses nothing and sees nothing twice.

use super::client::OperatorClient;
use super::output::{age, table, timestamp};
use super::settings::Resolved;
use super::{exit, CliError};
use crate::tasks::lifecycle::describe_exit;
use crate::tasks::units::format_size;
use crate::tasks::{load_spec, pack_inputs, InputFile, WaitReason, WorkerView};
use clap::Args;
use drover_protocol::task::{
    OutputsInfo, SessionEvent, TaskInfo, TaskState, MAX_INPUT_ARCHIVE_BYTES, MAX_OUTPUT_BYTES,
};
use drover_protocol::{OperatorRequest, OperatorResponse};
use drover_worker::archive::{self, EntryKind, UnpackOptions};
use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How often `--follow` asks for new events.
pub const FOLLOW_POLL: Duration = Duration::from_millis(200);

#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// Task spec file, TOML or JSON (docs/task-spec.md; examples in examples/).
    pub spec: PathBuf,
    /// Stream the task's events until it ends, then exit with its status (0 succeeded,
    /// satisfied or verified; 1 failed, cancelled or rejected).
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

#[derive(Debug, Args)]
pub struct OutputsArgs {
    /// Task id.
    pub id: String,
    /// Directory to write the files into, under their paths in the workspace (created if
    /// missing).
    #[arg(long, value_name = "DIR")]
    pub dest: PathBuf,
    /// Which attempt's outputs, 1 for the first [default: the last attempt that stored any].
    #[arg(long, value_name = "N")]
    pub attempt: Option<u32>,
    /// Replace files that already exist in DIR (otherwise nothing is written and the command
    /// fails, naming them).
    #[arg(long)]
    pub force: bool,
    /// Print what was written as JSON (schema in docs/json-schema.md).
    #[arg(long)]
    pub json: bool,
}

/// A file created for this process and already unlinked, so it is gone however we exit.
fn anonymous_file(what: &str) -> Result<std::fs::File, CliError> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = std::env::temp_dir().join(format!(
        "drover-{what}-{}-{:016x}.tar",
        std::process::id(),
        rand::random::<u64>()
    ));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| {
            CliError::new(
                exit::FAILURE,
                format!("cannot create a temporary file {}: {e}", path.display()),
            )
        })?;
    let _ = std::fs::remove_file(&path);
    Ok(file)
}

/// Pack `inputs` into an anonymous file; returns it (at offset 0) and its length.
fn pack_to_file(spec: &Path, inputs: &[InputFile]) -> Result<(std::fs::File, u64), CliError> {
    let failed = |e: String| {
        CliError::new(
            exit::FAILURE,
            format!("{}: cannot pack the inputs: {e}", spec.display()),
        )
    };
    let file = anonymous_file("inputs")?;
    let (writer, skipped) =
        pack_inputs(inputs, std::io::BufWriter::new(file)).map_err(|e| failed(e.to_string()))?;
    for s in skipped {
        eprintln!(
            "drover: note: not shipping {}: {}",
            s.path.display(),
            s.reason
        );
    }
    let mut file = writer
        .into_inner()
        .map_err(|e| failed(e.error().to_string()))?;
    let len = file
        .seek(SeekFrom::End(0))
        .and_then(|len| file.seek(SeekFrom::Start(0)).map(|_| len))
        .map_err(|e| failed(e.to_string()))?;
    if len > MAX_INPUT_ARCHIVE_BYTES {
        return Err(CliError::new(
            exit::CONFIG,
            format!(
                "{}: inputs: the packed archive is {} (tar headers for many small files), over \
                 the {} limit; ship fewer files, e.g. one archive of them",
                spec.display(),
                format_size(len),
                format_size(MAX_INPUT_ARCHIVE_BYTES)
            ),
        ));
    }
    Ok((file, len))
}

pub async fn submit(s: &Resolved, args: SubmitArgs) -> Result<(), CliError> {
    // A bad spec is bad input in a file, like a bad config: 64, with the file and field named.
    let loaded = load_spec(&args.spec).map_err(|e| CliError::new(exit::CONFIG, e.to_string()))?;
    let packed = match loaded.inputs.is_empty() {
        true => None,
        false => Some(pack_to_file(&args.spec, &loaded.inputs)?),
    };
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
    let id = match packed {
        None => client.submit(loaded.spec, None).await?,
        Some((file, len)) => {
            let mut file = tokio::fs::File::from_std(file);
            client.submit(loaded.spec, Some((&mut file, len))).await?
        }
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
        Some(state) if state.is_success() => Ok(()),
        None => Ok(()),
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
        "iteration_started" => format!(
            "iteration {} of {}",
            payload.get("n").and_then(|n| n.as_u64()).unwrap_or(0),
            payload.get("max").and_then(|n| n.as_u64()).unwrap_or(0)
        ),
        "criterion_checked" => criterion_line(&payload),
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

/// `tests: passed` / `tests: FAILED (exit 1): <last line of its output>`, with `[verdict]`
/// for the verdict's checks.
fn criterion_line(p: &serde_json::Value) -> String {
    let name = p.get("name").and_then(|n| n.as_str()).unwrap_or("?");
    let scope = match p.get("verdict").and_then(|v| v.as_bool()) {
        Some(true) => "[verdict] ".to_owned(),
        _ => format!(
            "[iteration {}] ",
            p.get("iteration").and_then(|n| n.as_u64()).unwrap_or(0)
        ),
    };
    if p.get("passed").and_then(|v| v.as_bool()) == Some(true) {
        return format!("{scope}{name}: passed");
    }
    let exit = match p.get("exit").and_then(|e| e.as_i64()) {
        Some(code) => format!("exit {code}"),
        None => "no exit".into(),
    };
    let last = p
        .get("excerpt")
        .and_then(|e| e.as_str())
        .and_then(|e| e.lines().rev().find(|l| !l.trim().is_empty()))
        .unwrap_or("");
    format!("{scope}{name}: FAILED ({exit}): {last}")
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

/// `drover task show`: the task and, when its spec declares outputs, what each attempt stored.
pub async fn show(s: &Resolved, id: String, json: bool) -> Result<(), CliError> {
    let mut client = OperatorClient::connect(s).await?;
    let result = async {
        let t = match client
            .ask(&OperatorRequest::ShowTask { id: id.clone() })
            .await?
        {
            OperatorResponse::Task(t) => t,
            other => return Err(super::run::unexpected(other)),
        };
        let outputs = match t.spec.outputs.is_empty() {
            true => Vec::new(),
            false => client.list_outputs(&id).await?,
        };
        // The worker's state tells whether the attempt is in trouble (lost, draining).
        let worker = match (&t.worker, json) {
            (Some(name), false) => {
                match client
                    .ask(&OperatorRequest::ShowWorker { name: name.clone() })
                    .await
                {
                    Ok(OperatorResponse::Worker(w)) => Some(w.state),
                    _ => None,
                }
            }
            _ => None,
        };
        Ok((t, outputs, worker))
    }
    .await;
    client.close().await;
    let (t, outputs, worker) = result?;
    if json {
        let mut value = serde_json::to_value(&*t)?;
        value["outputs"] = serde_json::to_value(&outputs)?;
        outln!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        out!("{}", task_detail(&t, worker));
        out!("{}", outputs_detail(&t, &outputs));
    }
    Ok(())
}

/// The `Outputs:` lines of `task show`.
pub fn outputs_detail(t: &TaskInfo, outputs: &[OutputsInfo]) -> String {
    if t.spec.outputs.is_empty() {
        return String::new();
    }
    let mut text = format!("{:<11}{}\n", "Outputs:", t.spec.outputs.join(" "));
    if outputs.is_empty() {
        text += &format!("{:<11}none stored yet\n", "");
    }
    for o in outputs {
        text += &format!(
            "{:<11}attempt {}: {} files, {} (drover outputs {} --attempt {} --dest DIR)\n",
            "",
            o.attempt,
            o.files,
            format_size(o.bytes),
            t.id,
            o.attempt
        );
    }
    text
}

/// `drover outputs`: fetch an attempt's outputs archive and unpack it into `--dest`.
pub async fn outputs(s: &Resolved, args: OutputsArgs) -> Result<(), CliError> {
    let file = anonymous_file("outputs")?;
    let mut async_file = tokio::fs::File::from_std(file);
    let mut client = OperatorClient::connect(s).await?;
    let fetched = client
        .fetch_outputs(&args.id, args.attempt, &mut async_file)
        .await;
    client.close().await;
    let info = fetched?;
    let mut file = async_file.into_std().await;
    let rewind = |file: &mut std::fs::File| {
        file.seek(SeekFrom::Start(0))
            .map_err(|e| CliError::new(exit::FAILURE, format!("cannot read back the archive: {e}")))
    };
    rewind(&mut file)?;
    let entries_limit = drover_protocol::task::MAX_OUTPUT_FILES * 4;
    let listed = archive::list(
        std::io::BufReader::new(&file),
        MAX_OUTPUT_BYTES,
        entries_limit,
    )
    .map_err(|e| {
        CliError::new(
            exit::FAILURE,
            format!("the outputs archive of {}: {e}", args.id),
        )
    })?;
    let dest = &args.dest;
    if !args.force {
        let existing: Vec<String> = listed
            .entries
            .iter()
            .filter(|e| e.kind != EntryKind::Dir)
            .filter(|e| std::fs::symlink_metadata(dest.join(&e.path)).is_ok())
            .map(|e| e.path.display().to_string())
            .collect();
        if !existing.is_empty() {
            let shown: Vec<_> = existing.iter().take(10).cloned().collect();
            let more = existing.len().saturating_sub(10);
            return Err(CliError::new(
                exit::FAILURE,
                format!(
                    "{} of the outputs already exist in {}: {}{}; nothing was written. Pass \
                     --force to overwrite them, or choose another --dest",
                    existing.len(),
                    dest.display(),
                    shown.join(", "),
                    if more > 0 {
                        format!(" and {more} more")
                    } else {
                        String::new()
                    }
                ),
            ));
        }
    }
    std::fs::create_dir_all(dest).map_err(|e| {
        CliError::new(
            exit::FAILURE,
            format!("cannot create {}: {e}", dest.display()),
        )
    })?;
    rewind(&mut file)?;
    let opts = UnpackOptions {
        overwrite: args.force,
        max_bytes: MAX_OUTPUT_BYTES,
        max_entries: entries_limit,
    };
    let written = archive::unpack(std::io::BufReader::new(&file), dest, opts).map_err(|e| {
        CliError::new(
            exit::FAILURE,
            format!(
                "writing the outputs of {} into {}: {e}",
                args.id,
                dest.display()
            ),
        )
    })?;
    let files: Vec<&archive::Entry> = written
        .entries
        .iter()
        .filter(|e| e.kind != EntryKind::Dir)
        .collect();
    if args.json {
        let list: Vec<_> = files
            .iter()
            .map(|e| serde_json::json!({ "path": e.path, "bytes": e.bytes }))
            .collect();
        let out = serde_json::json!({
            "task_id": info.task_id,
            "attempt": info.attempt,
            "epoch": info.epoch,
            "dest": dest,
            "files": list,
            "bytes": written.bytes,
            "archive_bytes": info.archive_bytes,
            "sha256": info.sha256,
        });
        outln!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    if files.is_empty() {
        outln!(
            "attempt {} of {} stored no files (its outputs globs matched nothing); nothing written to {}",
            info.attempt,
            info.task_id,
            dest.display()
        );
        return Ok(());
    }
    outln!(
        "wrote {} files ({}) from attempt {} of {} into {}:",
        files.len(),
        format_size(written.bytes),
        info.attempt,
        info.task_id,
        dest.display()
    );
    for e in files {
        outln!(
            "  {}  {}",
            dest.join(&e.path).display(),
            format_size(e.bytes)
        );
    }
    Ok(())
}

/// `Iteration`, `Criteria` and `Verdict` lines for a task with acceptance criteria or a verdict.
fn acceptance_rows(t: &TaskInfo) -> Vec<(&'static str, String)> {
    let mut rows = Vec::new();
    if !t.spec.acceptance.is_empty() {
        rows.push((
            "Iteration",
            format!(
                "{} of max_iterations {} (iterations are counted apart from attempts)",
                t.iteration, t.spec.max_iterations
            ),
        ));
    }
    if !t.criteria.is_empty() {
        let list: Vec<String> = t
            .criteria
            .iter()
            .map(|c| match (c.passed, c.exit) {
                (true, _) => format!("{} passed", c.name),
                (false, Some(code)) => format!("{} FAILED (exit {code})", c.name),
                (false, None) => format!("{} FAILED (no exit)", c.name),
            })
            .collect();
        rows.push(("Criteria", list.join(", ")));
    }
    if let Some(v) = &t.verdict {
        let result = match v.passed {
            Some(true) => "passed".to_owned(),
            Some(false) => "FAILED".to_owned(),
            None if v.epoch == 0 => "waiting for a worker".to_owned(),
            None => "running".to_owned(),
        };
        rows.push((
            "Verdict",
            format!(
                "{result} on {} (work by {}, outputs of epoch {})",
                v.worker.as_deref().unwrap_or("-"),
                v.work_worker.as_deref().unwrap_or("-"),
                v.outputs_epoch
                    .map_or("- (none stored)".into(), |e| e.to_string())
            ),
        ));
    } else if t.spec.verdict.is_some() {
        rows.push(("Verdict", "after the criteria pass on the worker".into()));
    }
    rows
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

/// `drover task show`; `worker` is the state of the task's worker when known, shown when it
/// is not `ready` (an attempt on a lost or draining worker is about to move).
pub fn task_detail(t: &TaskInfo, worker: Option<drover_protocol::WorkerState>) -> String {
    let retrying = t.state == TaskState::Queued
        && t.attempts > 0
        && t.verdict.as_ref().is_none_or(|v| v.epoch > 0);
    let worker_line = match (&t.worker, worker) {
        (Some(w), Some(state)) if state != drover_protocol::WorkerState::Ready => {
            format!("{w} ({state})")
        }
        (Some(w), _) => w.clone(),
        (None, _) => "-".into(),
    };
    let mut rows = vec![
        ("ID", t.id.clone()),
        ("Name", t.name.clone()),
        (
            "State",
            if retrying {
                format!("{} (retrying)", t.state)
            } else {
                t.state.to_string()
            },
        ),
        (
            "Attempts",
            format!(
                "{} (epoch {}{}; retry.max_attempts {})",
                t.attempts,
                t.epoch,
                match &t.verdict {
                    Some(v) if v.epoch == t.epoch && v.epoch > 0 => ", the verdict's",
                    _ => "",
                },
                t.spec.retry.max_attempts
            ),
        ),
        ("Worker", worker_line),
        ("Submitted", timestamp(t.submitted_ms)),
        ("Command", t.spec.command.join(" ")),
    ];
    if t.spec.network == drover_protocol::task::NetworkPolicy::Proxy {
        rows.push(("Network", format!("proxy to {}", t.spec.egress.join(", "))));
    }
    if !t.spec.secrets.is_empty() {
        let grants: Vec<String> = t
            .spec
            .secrets
            .iter()
            .map(|g| format!("{} for {}", g.name, g.hosts.join(", ")))
            .collect();
        rows.push(("Secrets", grants.join("; ")));
    }
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
    rows.extend(acceptance_rows(t));
    rows.push(("Events", format!("{} (drover events {})", t.events, t.id)));
    rows.iter()
        .map(|(k, v)| format!("{:<11}{v}\n", format!("{k}:")))
        .collect()
}
