//! The acceptance loop and the verdict as the coordinator sees them, derived from the session
//! like the rest of a task's state (no I/O, no clock).
//!
//! The loop itself runs on the worker, inside one attempt: after the main command exits 0 it
//! runs each criterion and records `criterion_checked {iteration, name, passed, exit,
//! excerpt}`; when one failed and iterations are left it records `iteration_started {n}` and
//! runs the command again with the feedback. The coordinator folds those events into
//! [`Progress`], and from it decides, when the attempt's `exited` arrives, whether the task is
//! `satisfied`, goes on to its verdict, or failed with `max_iterations_reached`
//! ([`work_outcome`]). An attempt that replaces a dead one gets [`Progress::resume_point`]:
//! the iteration to go on at and the feedback file that iteration had.
//!
//! The verdict is a separate attempt (its own epoch, [`drover_protocol::AttemptKind::Verdict`])
//! placed on another worker when one fits; it records `criterion_checked {verdict: true, ..}`
//! and its `exited` ends the task `verified` or `rejected` ([`verdict_outcome`]).

use drover_protocol::acceptance::Feedback;
use drover_protocol::task::{CriterionResult, ExitClass, TaskSpec, TaskState, VerdictInfo};
use serde_json::Value;

/// What the session says of a task's acceptance loop and verdict.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    /// `n` of the last `iteration_started` (0 before the first).
    pub iteration: u32,
    /// The iteration of `checks`.
    checks_iter: u32,
    /// Results of the work attempts' criteria in `checks_iter`, in the order they ran.
    checks: Vec<CriterionResult>,
    /// The feedback `iteration` was started with (JSON), if it is not the first.
    feedback: Option<String>,
    /// The epoch of the last work attempt that stored outputs.
    pub outputs_epoch: Option<u64>,
    /// Set by `verdict_requested`: the work is done and only the verdict is left.
    pub verdict: Option<Verdict>,
}

/// A requested verdict.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verdict {
    /// The worker whose work it checks.
    pub work_worker: Option<String>,
    /// The outputs it checks.
    pub outputs_epoch: Option<u64>,
    /// Verdict attempts assigned so far.
    pub tries: u32,
    /// Epoch and worker of the latest verdict attempt.
    pub epoch: u64,
    pub worker: Option<String>,
    /// Results of the latest verdict attempt.
    pub results: Vec<CriterionResult>,
}

/// A `criterion_checked` payload.
fn parse_result(v: &Value) -> Option<CriterionResult> {
    Some(CriterionResult {
        name: v.get("name")?.as_str()?.to_owned(),
        passed: v.get("passed")?.as_bool()?,
        exit: v
            .get("exit")
            .and_then(|e| e.as_i64())
            .and_then(|e| i32::try_from(e).ok()),
        excerpt: v
            .get("excerpt")
            .and_then(|e| e.as_str())
            .unwrap_or("")
            .to_owned(),
    })
}

impl Progress {
    /// Fold in one stored worker event of `epoch` (live or replayed: the same code).
    pub fn apply_worker_event(&mut self, epoch: u64, kind: &str, payload: &str) {
        match kind {
            "iteration_started" | "criterion_checked" | "outputs_stored" => {}
            _ => return,
        }
        let v: Value = serde_json::from_str(payload).unwrap_or_default();
        let in_verdict = self.verdict.as_ref().is_some_and(|d| d.epoch == epoch);
        match kind {
            "outputs_stored" if !in_verdict => self.outputs_epoch = Some(epoch),
            "iteration_started" if !in_verdict => {
                let n = v.get("n").and_then(|n| n.as_u64()).unwrap_or(1) as u32;
                if n <= 1 {
                    self.feedback = None;
                } else if self.checks_iter == n - 1 {
                    self.feedback = Feedback::from_results(n - 1, &self.checks)
                        .and_then(|f| serde_json::to_string(&f).ok());
                }
                self.iteration = n;
            }
            "criterion_checked" => {
                let Some(result) = parse_result(&v) else {
                    return;
                };
                if in_verdict {
                    if let Some(d) = self.verdict.as_mut() {
                        d.results.push(result);
                    }
                    return;
                }
                let n = v
                    .get("iteration")
                    .and_then(|n| n.as_u64())
                    .unwrap_or(u64::from(self.iteration)) as u32;
                if n != self.checks_iter {
                    self.checks_iter = n;
                    self.checks.clear();
                }
                self.checks.push(result);
            }
            _ => {}
        }
    }

    /// Whether every criterion of `spec` ran in the current iteration and passed.
    fn current_passed(&self, spec: &TaskSpec) -> bool {
        self.complete(spec) && self.checks.iter().all(|c| c.passed)
    }

    /// Whether every criterion of `spec` ran in the current iteration.
    fn complete(&self, spec: &TaskSpec) -> bool {
        self.checks_iter == self.iteration && self.checks.len() >= spec.acceptance.len()
    }

    /// Where a new work attempt starts: the current iteration with the feedback it had, or
    /// the next one when the current one was fully checked and failed. `(0, None)` before the
    /// first iteration.
    pub fn resume_point(&self, spec: &TaskSpec) -> (u32, Option<String>) {
        if spec.acceptance.is_empty() || self.iteration == 0 {
            return (0, None);
        }
        if self.complete(spec) && !self.current_passed(spec) && self.iteration < spec.max_iterations
        {
            let next = Feedback::from_results(self.iteration, &self.checks)
                .and_then(|f| serde_json::to_string(&f).ok());
            return (self.iteration + 1, next);
        }
        (self.iteration, self.feedback.clone())
    }

    /// Record a `verdict_requested` (live or replayed).
    pub fn request_verdict(&mut self, work_worker: Option<String>, outputs_epoch: Option<u64>) {
        self.verdict = Some(Verdict {
            work_worker,
            outputs_epoch,
            ..Verdict::default()
        });
    }

    /// Record the assignment of a verdict attempt (live or replayed).
    pub fn verdict_assigned(&mut self, epoch: u64, worker: Option<String>) {
        if let Some(d) = self.verdict.as_mut() {
            d.tries += 1;
            d.epoch = epoch;
            d.worker = worker;
            d.results.clear();
        }
    }

    /// Whether `epoch` is the current verdict attempt.
    pub fn is_verdict_epoch(&self, epoch: u64) -> bool {
        self.verdict
            .as_ref()
            .is_some_and(|d| d.epoch == epoch && d.tries > 0)
    }

    /// The latest results to show: the verdict's once it checked any, else the current
    /// iteration's.
    pub fn shown_criteria(&self) -> Vec<CriterionResult> {
        match &self.verdict {
            Some(d) if !d.results.is_empty() => d.results.clone(),
            _ if self.checks_iter == self.iteration => self.checks.clone(),
            _ => Vec::new(),
        }
    }

    /// The operator's view of the verdict of a task in `state`.
    pub fn verdict_info(&self, state: TaskState) -> Option<VerdictInfo> {
        let d = self.verdict.as_ref()?;
        Some(VerdictInfo {
            epoch: d.epoch,
            worker: d.worker.clone(),
            work_worker: d.work_worker.clone(),
            outputs_epoch: d.outputs_epoch,
            passed: match state {
                TaskState::Verified => Some(true),
                TaskState::Rejected => Some(false),
                _ => None,
            },
        })
    }
}

/// How a work attempt that exited 0 ends under acceptance criteria.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkOutcome {
    /// No criteria: plain success.
    Succeeded,
    /// Every criterion passed and no verdict is asked for.
    Satisfied,
    /// Every criterion passed: the verdict is next.
    Verdict,
    /// The last allowed iteration failed its criteria.
    MaxIterations(String),
    /// The worker stopped its loop without a pass and with iterations left (it should not):
    /// retried like a failure.
    Incomplete(String),
}

/// Decide a work attempt's end after `exited(0)`.
pub fn work_outcome(spec: &TaskSpec, p: &Progress) -> WorkOutcome {
    if spec.acceptance.is_empty() {
        return match spec.verdict {
            Some(_) => WorkOutcome::Verdict,
            None => WorkOutcome::Succeeded,
        };
    }
    if p.current_passed(spec) {
        return match spec.verdict {
            Some(_) => WorkOutcome::Verdict,
            None => WorkOutcome::Satisfied,
        };
    }
    let failed = failed_names(&p.checks);
    if p.iteration >= spec.max_iterations && p.complete(spec) {
        return WorkOutcome::MaxIterations(format!(
            "max_iterations_reached: {} of {} iterations ended with criteria failing (last: {failed})",
            p.iteration, spec.max_iterations
        ));
    }
    WorkOutcome::Incomplete(format!(
        "ended its acceptance loop at iteration {} of {} without every criterion passing",
        p.iteration, spec.max_iterations
    ))
}

fn failed_names(results: &[CriterionResult]) -> String {
    let failed: Vec<String> = results
        .iter()
        .filter(|c| !c.passed)
        .map(|c| match c.exit {
            Some(code) => format!("{} (exit {code})", c.name),
            None => format!("{} (no exit)", c.name),
        })
        .collect();
    if failed.is_empty() {
        "none".into()
    } else {
        failed.join(", ")
    }
}

/// How a verdict attempt ends: `Ok(final state, reason)` when it produced a result, `Err(why)`
/// when it could not run (retried while tries are left).
pub fn verdict_outcome(
    spec: &TaskSpec,
    p: &Progress,
    class: ExitClass,
) -> Result<(TaskState, Option<String>), String> {
    let d = p.verdict.as_ref().ok_or("no verdict requested")?;
    if !class.is_success() {
        return Err(format!(
            "the verdict attempt {}",
            super::lifecycle::describe_exit(class)
        ));
    }
    let want = spec.verdict_criteria().map_or(0, |c| c.len());
    let on = d.worker.as_deref().unwrap_or("-");
    if d.results.len() >= want && d.results.iter().all(|c| c.passed) {
        return Ok((TaskState::Verified, None));
    }
    if d.results.len() < want && d.results.iter().all(|c| c.passed) {
        return Err(format!(
            "the verdict on {on} checked {} of {want} criteria",
            d.results.len()
        ));
    }
    Ok((
        TaskState::Rejected,
        Some(format!(
            "the verdict on {on} failed: {} (work by {}, outputs of attempt epoch {})",
            failed_names(&d.results),
            d.work_worker.as_deref().unwrap_or("-"),
            d.outputs_epoch
                .map_or("none stored".to_owned(), |e| e.to_string()),
        )),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(criteria: &[&str], max: u32) -> TaskSpec {
        let mut s: TaskSpec = serde_json::from_value(json!({
            "name": "t", "command": ["true"], "max_iterations": max,
        }))
        .unwrap();
        s.acceptance = criteria
            .iter()
            .map(|n| drover_protocol::task::Criterion {
                name: (*n).into(),
                command: vec!["true".into()],
                timeout_ms: 1000,
            })
            .collect();
        s
    }

    fn checked(p: &mut Progress, epoch: u64, n: u32, name: &str, passed: bool) {
        let payload = json!({"iteration": n, "name": name, "passed": passed,
            "exit": if passed { 0 } else { 1 }, "excerpt": "out"});
        p.apply_worker_event(epoch, "criterion_checked", &payload.to_string());
    }

    fn started(p: &mut Progress, epoch: u64, n: u32) {
        p.apply_worker_event(epoch, "iteration_started", &json!({ "n": n }).to_string());
    }

    #[test]
    fn resume_point_follows_iterations_and_feedback() {
        let s = spec(&["a", "b"], 3);
        let mut p = Progress::default();
        assert_eq!(p.resume_point(&s), (0, None));
        started(&mut p, 1, 1);
        assert_eq!(p.resume_point(&s), (1, None));
        checked(&mut p, 1, 1, "a", true);
        // Died between criteria: iteration 1 again.
        assert_eq!(p.resume_point(&s), (1, None));
        checked(&mut p, 1, 1, "b", false);
        // Fully checked and failed: the next iteration, with this one's feedback.
        let (n, f) = p.resume_point(&s);
        assert_eq!(n, 2);
        let f: Feedback = serde_json::from_str(&f.unwrap()).unwrap();
        assert_eq!((f.iteration, f.failed.len()), (1, 1));
        assert_eq!(f.failed[0].name, "b");
        started(&mut p, 1, 2);
        // Died during iteration 2 (its command): iteration 2 with iteration 1's feedback.
        let (n, f2) = p.resume_point(&s);
        assert_eq!(n, 2);
        assert_eq!(serde_json::from_str::<Feedback>(&f2.unwrap()).unwrap(), f);
        // A resumed attempt starts iteration 2 again: the feedback is kept.
        started(&mut p, 2, 2);
        assert_eq!(p.resume_point(&s).0, 2);
        assert!(p.resume_point(&s).1.is_some());
    }

    #[test]
    fn outcomes_satisfied_verdict_and_max_iterations() {
        let mut s = spec(&["a"], 2);
        let mut p = Progress::default();
        started(&mut p, 1, 1);
        checked(&mut p, 1, 1, "a", false);
        assert!(matches!(work_outcome(&s, &p), WorkOutcome::Incomplete(_)));
        started(&mut p, 1, 2);
        checked(&mut p, 1, 2, "a", false);
        match work_outcome(&s, &p) {
            WorkOutcome::MaxIterations(why) => {
                assert!(why.starts_with("max_iterations_reached: 2 of 2"), "{why}")
            }
            other => panic!("{other:?}"),
        }
        let mut ok = Progress::default();
        started(&mut ok, 1, 1);
        checked(&mut ok, 1, 1, "a", true);
        assert_eq!(work_outcome(&s, &ok), WorkOutcome::Satisfied);
        s.verdict = Some(Default::default());
        assert_eq!(work_outcome(&s, &ok), WorkOutcome::Verdict);
    }

    #[test]
    fn verdict_results_decide_verified_or_rejected() {
        let mut s = spec(&["a"], 2);
        s.verdict = Some(Default::default());
        let mut p = Progress::default();
        p.request_verdict(Some("w1".into()), Some(1));
        p.verdict_assigned(2, Some("w2".into()));
        assert!(p.is_verdict_epoch(2));
        // Nothing checked although it exited 0: it could not run, not a rejection.
        assert!(verdict_outcome(&s, &p, ExitClass::Exited(0)).is_err());
        checked(&mut p, 2, 0, "a", false);
        let (state, why) = verdict_outcome(&s, &p, ExitClass::Exited(0)).unwrap();
        assert_eq!(state, TaskState::Rejected);
        assert!(why.unwrap().contains("a (exit 1)"));
        // A verdict's results do not touch the work's.
        assert_eq!(p.iteration, 0);
        p.verdict_assigned(3, Some("w2".into()));
        checked(&mut p, 3, 0, "a", true);
        assert_eq!(
            verdict_outcome(&s, &p, ExitClass::Exited(0)).unwrap().0,
            TaskState::Verified
        );
        assert!(verdict_outcome(&s, &p, ExitClass::Exited(127)).is_err());
    }
}
