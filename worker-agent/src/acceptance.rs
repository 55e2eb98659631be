//! Acceptance criteria on the worker: each criterion a fresh sandboxed process in the
//! attempt's workspace, configured like the task (environment, network, isolation, limits)
//! but with its own timeout; and the verdict attempt, which runs only the verdict's criteria
//! in a fresh workspace holding the outputs of the attempt it checks.
//!
//! Every check is recorded as a `criterion_checked` event (`iteration`, `name`, `passed`,
//! `exit`, `excerpt`, and `verdict: true` in a verdict). The loop that runs the command again
//! with `DROVER_FEEDBACK_FILE` lives in [`crate::executor`]; the feedback's format is
//! [`drover_protocol::acceptance::Feedback`], shared with the coordinator, which rebuilds it
//! from the session when an attempt replaces a dead one.

use crate::sandbox::{AttemptSpec, Sandbox};
use crate::workspace::{self, Emit};
use drover_protocol::acceptance::excerpt;
use drover_protocol::task::{Criterion, CriterionResult, ExitClass, Limits};
use drover_protocol::Assignment;
use serde_json::json;
use std::path::Path;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio_util::sync::CancellationToken;

/// Name of the file in the workspace that holds the feedback of the iteration before
/// (`DROVER_FEEDBACK_FILE`).
pub const FEEDBACK_FILE: &str = ".drover-feedback.json";

/// Most bytes of each of a criterion's stdout and stderr kept in memory (the tail).
const KEEP_BYTES: usize = 64 * 1024;

/// Where and how criteria run: the attempt's sandbox configuration.
#[derive(Debug)]
pub struct Checks<'a> {
    pub sandbox: &'a Sandbox,
    pub a: &'a Assignment,
    pub workspace: &'a Path,
    pub limits: &'a Limits,
    /// `DROVER_ITERATION` (and the like) for each criterion.
    pub extra_env: &'a [(String, String)],
    pub cancel: &'a CancellationToken,
    pub tx: &'a Emit,
    /// `network = proxy`: the attempt's egress proxy (criteria go out through it too).
    pub egress: Option<&'a crate::egress::Egress>,
}

impl Checks<'_> {
    /// Run `criteria` in order (all of them, so the feedback names every failure) and emit
    /// one `criterion_checked` each. Stops early only when cancelled.
    pub async fn run(
        &self,
        criteria: &[Criterion],
        iteration: u32,
        verdict: bool,
    ) -> Vec<CriterionResult> {
        let mut results = Vec::with_capacity(criteria.len());
        for c in criteria {
            if self.cancel.is_cancelled() {
                break;
            }
            let r = self.check(c).await;
            let mut payload = json!({
                "iteration": iteration, "name": r.name, "passed": r.passed,
                "exit": r.exit, "excerpt": r.excerpt,
            });
            if verdict {
                payload["verdict"] = json!(true);
            }
            let _ = self
                .tx
                .send(("criterion_checked".into(), payload.to_string()))
                .await;
            results.push(r);
        }
        results
    }

    async fn check(&self, c: &Criterion) -> CriterionResult {
        let mut limits = self.limits.clone();
        limits.wall_time_ms = Some(c.timeout_ms);
        let spec = AttemptSpec {
            task_id: &self.a.task_id,
            attempt: self.a.attempt,
            argv: &c.command,
            env: &self.a.spec.env,
            workspace: self.workspace,
            limits: &limits,
            network: self.a.spec.network,
            isolation: self.a.spec.isolation,
            checkpoint_file: None,
            extra_env: self.extra_env,
            egress: self.egress,
            // Criteria run only after the attempt was confirmed (see `executor`).
            confirmation: None,
        };
        let failed = |why: String| CriterionResult {
            name: c.name.clone(),
            passed: false,
            exit: None,
            excerpt: why,
        };
        let mut attempt = match self.sandbox.spawn(spec).await {
            Ok(at) => at,
            Err(e) => return failed(format!("could not start the criterion: {e}")),
        };
        let out = tail(attempt.stdout.take());
        let err = tail(attempt.stderr.take());
        // The criterion's events pipe is read and dropped: criteria do not write the session.
        let events = tail(attempt.events.take());
        let (outcome, mut text, err, _) =
            tokio::join!(attempt.wait(self.cancel.clone()), out, err, events);
        text.extend_from_slice(&err);
        let mut excerpt = excerpt(&text);
        let exit = match outcome.class {
            ExitClass::Exited(code) => Some(code),
            other => {
                let note = match other {
                    ExitClass::TimedOut => format!("(timed out after {} ms)", c.timeout_ms),
                    other => format!("({})", describe(other)),
                };
                if !excerpt.is_empty() && !excerpt.ends_with('\n') {
                    excerpt.push('\n');
                }
                excerpt.push_str(&note);
                None
            }
        };
        CriterionResult {
            name: c.name.clone(),
            passed: exit == Some(0),
            exit,
            excerpt,
        }
    }
}

fn describe(class: ExitClass) -> String {
    match class {
        ExitClass::Exited(c) => format!("exited with code {c}"),
        ExitClass::Signaled(s) => format!("killed by signal {s}"),
        ExitClass::OomKilled => "killed for memory (OOM)".into(),
        ExitClass::TimedOut => "timed out".into(),
        ExitClass::Cancelled => "cancelled".into(),
    }
}

/// Read a pipe to its end, keeping the last [`KEEP_BYTES`].
async fn tail<R: AsyncRead + Unpin>(pipe: Option<R>) -> Vec<u8> {
    let Some(mut pipe) = pipe else {
        return Vec::new();
    };
    let mut kept = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => return kept,
            Ok(n) => {
                kept.extend_from_slice(&buf[..n]);
                if kept.len() > 2 * KEEP_BYTES {
                    kept.drain(..kept.len() - KEEP_BYTES);
                }
            }
        }
    }
}

/// A verdict attempt, after `started`: unpack the outputs it checks (fetched like inputs)
/// into the fresh `workspace`, run the verdict's criteria there, and emit `exited` (0 when
/// the criteria ran, whatever they found; the coordinator reads their results). Returns the
/// `exited` payload.
pub async fn run_verdict(
    conn: Option<quinn::Connection>,
    work_dir: &Path,
    checks: &Checks<'_>,
    outputs_epoch: Option<u64>,
) -> String {
    let a = checks.a;
    let fail =
        |message: String| json!({ "class": ExitClass::Exited(127), "error": message }).to_string();
    if outputs_epoch.is_some() {
        let Some(conn) = conn else {
            return fail("no connection to the coordinator to fetch the outputs from".into());
        };
        match workspace::receive_inputs(&conn, work_dir, &a.task_id, a.epoch, checks.workspace)
            .await
        {
            Ok(r) => {
                let payload = json!({
                    "files": r.files, "bytes": r.bytes, "archive_bytes": r.archive_bytes,
                    "outputs_epoch": outputs_epoch,
                });
                let _ = checks
                    .tx
                    .send(("verdict_outputs_unpacked".into(), payload.to_string()))
                    .await;
            }
            Err(e) => {
                return fail(format!(
                    "could not put the outputs to check in the verdict's workspace: {e}"
                ))
            }
        }
    }
    let criteria = a.spec.verdict_criteria().unwrap_or(&[]);
    let results = checks.run(criteria, 0, true).await;
    let class = if checks.cancel.is_cancelled() {
        ExitClass::Cancelled
    } else {
        ExitClass::Exited(0)
    };
    json!({
        "class": class,
        "criteria": results.len(),
        "passed": results.iter().filter(|r| r.passed).count(),
    })
    .to_string()
}
