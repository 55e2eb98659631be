//! The acceptance loop and the verdict in the lifecycle: time as a parameter, and after every
//! step the state rebuilt from the log equals the live one.

use super::*;
use crate::store::session::StoredTask;
use drover_protocol::acceptance::Feedback;
use drover_protocol::task::{Criterion, Requirements, VerdictSpec};
use drover_protocol::{Usage, WorkerInfo, WorkerState};

fn spec(max_iterations: u32, verdict: bool) -> TaskSpec {
    let mut s: TaskSpec = serde_json::from_value(json!({
        "name": "agent", "command": ["./agent.sh"], "outputs": ["out/*"],
    }))
    .unwrap();
    s.requirements = Requirements {
        cpus: 1,
        ..Default::default()
    };
    s.retry.backoff_ms = 100;
    s.acceptance = vec![Criterion {
        name: "tests".into(),
        command: vec!["./test.sh".into()],
        timeout_ms: 1000,
    }];
    s.max_iterations = max_iterations;
    s.verdict = verdict.then(VerdictSpec::default);
    s
}

fn worker(name: &str) -> WorkerView {
    let info = WorkerInfo {
        name: name.into(),
        state: WorkerState::Ready,
        connected: true,
        address: String::new(),
        version: String::new(),
        protocol_version: 3,
        first_seen_ms: 0,
        registered_ms: 0,
        state_changed_ms: 0,
        last_heartbeat_ms: 0,
        last_heartbeat_age_ms: 0,
        resources: crate::fleet::tests::report(2, &[]),
        usage: Usage::default(),
    };
    WorkerView::from(&info)
}

/// A session log, checked for replay after every step.
#[derive(Default)]
struct Run {
    tasks: Tasks,
    task: Vec<NewTask>,
    events: Vec<NewEvent>,
    seq: HashMap<u64, u64>,
    assigned: Vec<(String, Assignment)>,
}

impl Run {
    fn take(&mut self, actions: Vec<TaskAction>) {
        for a in actions {
            match a {
                TaskAction::PutTask(t) => self.task.push(t),
                TaskAction::Append(evs) => self.events.extend(evs),
                TaskAction::Assign { worker, assignment } => {
                    self.assigned.push((worker, *assignment))
                }
                TaskAction::Cancel { .. } => {}
            }
        }
        self.tasks.sanity_check();
        let rebuilt = Tasks::restore(vec![StoredTask {
            task: self.task[0].clone(),
            events: self.events.clone(),
        }]);
        assert_eq!(
            rebuilt.list(None),
            self.tasks.list(None),
            "replay equals live"
        );
    }

    fn submit(&mut self, now: u64, spec: TaskSpec) -> String {
        let (id, a) = self.tasks.submit(now, spec);
        self.take(a);
        id
    }

    fn schedule(&mut self, now: u64, workers: &[&str]) {
        let views: Vec<WorkerView> = workers.iter().map(|w| worker(w)).collect();
        let a = self.tasks.schedule(now, &views);
        self.take(a);
    }

    /// The worker of the last assignment sends an event.
    fn send(&mut self, now: u64, id: &str, kind: &str, payload: serde_json::Value) {
        let (w, a) = self.assigned.last().cloned().unwrap();
        let seq = self.seq.entry(a.epoch).or_insert(0);
        let e = AttemptEvent {
            seq: *seq,
            ts_ms: now,
            kind: kind.into(),
            payload: payload.to_string(),
        };
        *seq += 1;
        match self.tasks.handle_event(now, &w, id, a.epoch, e) {
            EventVerdict::Accept { actions, .. } => self.take(actions),
            other => panic!("{kind}: expected accept, got {other:?}"),
        }
    }

    fn check(&mut self, now: u64, id: &str, n: u32, passed: bool) {
        let payload = json!({"iteration": n, "name": "tests", "passed": passed,
            "exit": if passed { 0 } else { 1 }, "excerpt": format!("iteration {n} output")});
        self.send(now, id, "criterion_checked", payload);
    }

    fn kinds(&self) -> Vec<&str> {
        self.events.iter().map(|e| e.kind.as_str()).collect()
    }

    fn info(&self, id: &str) -> TaskInfo {
        self.tasks.info(id).unwrap()
    }
}

#[test]
fn two_iterations_then_satisfied_in_one_attempt() {
    let mut r = Run::default();
    let id = r.submit(1, spec(3, false));
    r.schedule(2, &["w1"]);
    assert_eq!(r.assigned[0].1.kind, AttemptKind::Work);
    assert_eq!(
        (r.assigned[0].1.iteration, &r.assigned[0].1.feedback),
        (0, &None)
    );
    r.send(3, &id, "started", json!({}));
    r.send(4, &id, "iteration_started", json!({"n": 1}));
    r.check(5, &id, 1, false);
    assert_eq!(r.info(&id).iteration, 1);
    assert!(!r.info(&id).criteria[0].passed);
    r.send(6, &id, "iteration_started", json!({"n": 2}));
    assert!(
        r.info(&id).criteria.is_empty(),
        "iteration 2 has checked nothing yet"
    );
    r.check(7, &id, 2, true);
    r.send(8, &id, "exited", json!({"class": {"exited": 0}}));
    let t = r.info(&id);
    assert_eq!(
        (t.state, t.iteration, t.attempts),
        (TaskState::Satisfied, 2, 1)
    );
    assert_eq!(t.finished_ms, Some(8));
    assert_eq!(
        r.kinds(),
        [
            "submitted",
            "assigned",
            "started",
            "iteration_started",
            "criterion_checked",
            "iteration_started",
            "criterion_checked",
            "exited",
            "completed"
        ]
    );
}

#[test]
fn never_satisfied_fails_with_max_iterations_reached() {
    let mut r = Run::default();
    let id = r.submit(1, spec(2, false));
    r.schedule(2, &["w1"]);
    r.send(3, &id, "started", json!({}));
    for n in 1..=2 {
        r.send(4, &id, "iteration_started", json!({"n": n}));
        r.check(5, &id, n, false);
    }
    r.send(6, &id, "exited", json!({"class": {"exited": 0}}));
    let t = r.info(&id);
    assert_eq!(
        (t.state, t.iteration, t.attempts),
        (TaskState::Failed, 2, 1)
    );
    let reason = t.reason.unwrap();
    assert!(
        reason.starts_with("max_iterations_reached: 2 of 2"),
        "{reason}"
    );
    assert!(reason.contains("tests (exit 1)"), "{reason}");
}

#[test]
fn a_lost_worker_mid_iteration_2_resumes_there_with_the_feedback() {
    let mut r = Run::default();
    let id = r.submit(1, spec(3, false));
    r.schedule(2, &["w1"]);
    r.send(3, &id, "started", json!({}));
    r.send(4, &id, "iteration_started", json!({"n": 1}));
    r.check(5, &id, 1, false);
    r.send(6, &id, "iteration_started", json!({"n": 2}));
    let a = r.tasks.handle_worker_gone(7, "w1", WorkerGone::Lost);
    r.take(a);
    assert_eq!(r.info(&id).state, TaskState::Queued);
    // Before the backoff: nothing; after it, on w2, at iteration 2 with iteration 1's feedback.
    r.schedule(50, &["w2"]);
    assert_eq!(r.assigned.len(), 1);
    r.schedule(200, &["w2"]);
    let (w, a) = r.assigned.last().cloned().unwrap();
    assert_eq!(
        (w.as_str(), a.epoch, a.attempt, a.iteration),
        ("w2", 2, 2, 2)
    );
    let f: Feedback = serde_json::from_str(a.feedback.as_deref().unwrap()).unwrap();
    assert_eq!((f.iteration, f.failed[0].name.as_str()), (1, "tests"));
    assert_eq!(f.failed[0].excerpt, "iteration 1 output");
    // A coordinator restarted now would send the same assignment.
    let mut rebuilt = Tasks::restore(vec![StoredTask {
        task: r.task[0].clone(),
        events: r.events[..r.events.len() - 1].to_vec(),
    }]);
    let again = rebuilt.schedule(200, &[worker("w2")]);
    match &again[1] {
        TaskAction::Assign { assignment, .. } => assert_eq!(**assignment, a),
        other => panic!("{other:?}"),
    }
    r.send(201, &id, "started", json!({}));
    r.send(202, &id, "iteration_started", json!({"n": 2}));
    r.check(203, &id, 2, true);
    r.send(204, &id, "exited", json!({"class": {"exited": 0}}));
    let t = r.info(&id);
    assert_eq!(
        (t.state, t.iteration, t.attempts),
        (TaskState::Satisfied, 2, 2)
    );
}

#[test]
fn the_verdict_runs_on_another_worker_and_rejects() {
    let mut r = Run::default();
    let id = r.submit(1, spec(3, true));
    r.schedule(2, &["w1"]);
    r.send(3, &id, "started", json!({}));
    r.send(4, &id, "iteration_started", json!({"n": 1}));
    r.check(5, &id, 1, true);
    r.send(6, &id, "outputs_stored", json!({"files": 1}));
    r.send(7, &id, "exited", json!({"class": {"exited": 0}}));
    let t = r.info(&id);
    assert_eq!(t.state, TaskState::Queued);
    let v = t.verdict.unwrap();
    assert_eq!(
        (v.epoch, v.work_worker.as_deref(), v.outputs_epoch),
        (0, Some("w1"), Some(1))
    );
    // w1 is the least loaded but did the work: the verdict goes to w2.
    r.schedule(8, &["w1", "w2"]);
    let (w, a) = r.assigned.last().cloned().unwrap();
    assert_eq!(w, "w2");
    assert_eq!(
        (a.epoch, a.kind),
        (
            2,
            AttemptKind::Verdict {
                outputs_epoch: Some(1)
            }
        )
    );
    assert_eq!(r.info(&id).attempts, 1, "a verdict is not a work attempt");
    r.send(9, &id, "started", json!({"kind": "verdict"}));
    r.send(10, &id, "criterion_checked",
        json!({"iteration": 0, "name": "tests", "passed": false, "exit": 1, "excerpt": "no report", "verdict": true}));
    r.send(11, &id, "exited", json!({"class": {"exited": 0}}));
    let t = r.info(&id);
    assert_eq!(t.state, TaskState::Rejected);
    assert_eq!(t.verdict.unwrap().passed, Some(false));
    assert!(t
        .reason
        .unwrap()
        .contains("the verdict on w2 failed: tests (exit 1)"));
    assert_eq!(t.iteration, 1, "the verdict's checks are not an iteration");
    assert_eq!(
        &r.kinds()[7..],
        [
            "verdict_requested",
            "assigned",
            "started",
            "criterion_checked",
            "exited",
            "completed"
        ]
    );
}

#[test]
fn a_lost_verdict_is_run_again_then_verifies_on_the_only_worker() {
    let mut r = Run::default();
    let id = r.submit(1, spec(3, true));
    r.schedule(2, &["w1"]);
    r.send(3, &id, "started", json!({}));
    r.send(4, &id, "iteration_started", json!({"n": 1}));
    r.check(5, &id, 1, true);
    r.send(6, &id, "exited", json!({"class": {"exited": 0}}));
    r.schedule(7, &["w1", "w2"]);
    assert_eq!(r.assigned.last().unwrap().0, "w2");
    let a = r.tasks.handle_worker_gone(8, "w2", WorkerGone::Lost);
    r.take(a);
    let t = r.info(&id);
    assert_eq!(t.state, TaskState::Queued);
    assert!(t.reason.unwrap().starts_with("retrying the verdict after"));
    // Only the worker that did the work is left: it runs the verdict rather than none.
    r.schedule(200, &["w1"]);
    let (w, a) = r.assigned.last().cloned().unwrap();
    assert_eq!((w.as_str(), a.epoch), ("w1", 3));
    assert_eq!(
        a.kind,
        AttemptKind::Verdict {
            outputs_epoch: None
        }
    );
    r.send(201, &id, "started", json!({}));
    r.send(202, &id, "criterion_checked",
        json!({"iteration": 0, "name": "tests", "passed": true, "exit": 0, "excerpt": "", "verdict": true}));
    r.send(203, &id, "exited", json!({"class": {"exited": 0}}));
    let t = r.info(&id);
    assert_eq!((t.state, t.attempts, t.epoch), (TaskState::Verified, 1, 3));
    assert_eq!(t.verdict.unwrap().passed, Some(true));
}

#[test]
fn the_verdict_checks_only_what_the_satisfying_attempt_stored() {
    let mut r = Run::default();
    let id = r.submit(1, spec(3, true));
    r.schedule(2, &["w1"]);
    r.send(3, &id, "started", json!({}));
    r.send(4, &id, "iteration_started", json!({"n": 1}));
    r.send(5, &id, "outputs_stored", json!({"files": 1}));
    r.send(6, &id, "exited", json!({"class": {"exited": 2}}));
    assert_eq!(r.info(&id).state, TaskState::Queued);
    r.schedule(200, &["w1"]);
    r.send(201, &id, "started", json!({}));
    r.send(202, &id, "iteration_started", json!({"n": 1}));
    r.check(203, &id, 1, true);
    r.send(204, &id, "outputs_failed", json!({"error": "disk full"}));
    r.send(205, &id, "exited", json!({"class": {"exited": 0}}));
    let v = r.info(&id).verdict.unwrap();
    assert_eq!(
        (v.outputs_epoch, v.work_worker.as_deref()),
        (None, Some("w1"))
    );
}
