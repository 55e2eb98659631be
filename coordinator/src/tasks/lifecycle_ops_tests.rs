//! Issue 5 in the lifecycle state machine: checkpoint resume, the OOM policy and drain
//! deadlines, each checked live and after a replay of the session (time is a parameter).

use super::*;
use crate::store::session::StoredTask;
use drover_protocol::task::{Limits, OomPolicy, Requirements, RetryPolicy};
use drover_protocol::{Usage, WorkerInfo, WorkerState};

const MIB: u64 = 1 << 20;

fn spec(max_attempts: u32) -> TaskSpec {
    TaskSpec {
        name: "t".into(),
        command: vec!["true".into()],
        env: Default::default(),
        inputs: vec![],
        outputs: vec![],
        requirements: Requirements {
            cpus: 1,
            ..Default::default()
        },
        limits: Default::default(),
        network: Default::default(),
        isolation: Default::default(),
        retry: RetryPolicy {
            max_attempts,
            backoff_ms: 100,
            ..RetryPolicy::default()
        },
        priority: 0,
        on_disconnect: None,
        lost_after_ms: None,
        acceptance: vec![],
        max_iterations: drover_protocol::task::DEFAULT_MAX_ITERATIONS,
        verdict: None,
        egress: Vec::new(),
        secrets: Vec::new(),
    }
}

fn worker(name: &str, memory_bytes: u64) -> WorkerView {
    let mut resources = crate::fleet::tests::report(2, &[]);
    resources.memory_total_bytes = memory_bytes;
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
        resources,
        usage: Usage::default(),
    };
    WorkerView::from(&info)
}

/// Everything appended, as the store would keep it.
#[derive(Default)]
struct Log {
    task: Vec<NewTask>,
    events: Vec<NewEvent>,
}

impl Log {
    fn take(&mut self, actions: &[TaskAction]) {
        for a in actions {
            match a {
                TaskAction::PutTask(t) => self.task.push(t.clone()),
                TaskAction::Append(evs) => self.events.extend(evs.iter().cloned()),
                _ => {}
            }
        }
    }

    fn stored(&self) -> Vec<StoredTask> {
        self.task
            .iter()
            .map(|t| StoredTask {
                task: t.clone(),
                events: self
                    .events
                    .iter()
                    .filter(|e| e.task_id == t.id)
                    .cloned()
                    .collect(),
            })
            .collect()
    }

    fn last(&self, kind: &str) -> serde_json::Value {
        let e = self
            .events
            .iter()
            .rev()
            .find(|e| e.kind == kind)
            .unwrap_or_else(|| panic!("no {kind} event"));
        serde_json::from_str(&e.payload).expect("payload is JSON")
    }
}

fn ev(seq: u64, kind: &str, payload: &str) -> AttemptEvent {
    AttemptEvent {
        seq,
        ts_ms: 5,
        kind: kind.into(),
        payload: payload.into(),
    }
}

fn accept(tasks: &mut Tasks, log: &mut Log, w: &str, id: &str, epoch: u64, e: AttemptEvent) {
    match tasks.handle_event(10, w, id, epoch, e) {
        EventVerdict::Accept { actions, .. } => log.take(&actions),
        other => panic!("expected accept, got {other:?}"),
    }
    tasks.sanity_check();
}

/// Schedule and return the single assignment made.
fn assign(
    tasks: &mut Tasks,
    log: &mut Log,
    now: u64,
    workers: &[WorkerView],
) -> (String, Assignment) {
    let actions = tasks.schedule(now, workers);
    log.take(&actions);
    match &actions[..] {
        [TaskAction::Append(_), TaskAction::Assign { worker, assignment }] => {
            (worker.clone(), (**assignment).clone())
        }
        other => panic!("expected one assignment, got {other:?}"),
    }
}

fn same_after_replay(tasks: &Tasks, log: &Log) -> Tasks {
    let rebuilt = Tasks::restore(log.stored());
    assert_eq!(rebuilt.list(None), tasks.list(None));
    assert_eq!(rebuilt.retrying(), tasks.retrying());
    assert_eq!(rebuilt.reserved(), tasks.reserved());
    rebuilt
}

#[test]
fn new_attempt_gets_the_last_checkpoint_and_records_resuming_from_it() {
    let mut tasks = Tasks::default();
    let mut log = Log::default();
    let (id, a) = tasks.submit(1, spec(3));
    log.take(&a);
    let (_, first) = assign(&mut tasks, &mut log, 2, &[worker("w1", 8 << 30)]);
    assert_eq!(first.checkpoint, None);
    let started = r#"{"attempt":1,"resumed_from_checkpoint":false}"#;
    accept(
        &mut tasks,
        &mut log,
        "w1",
        &id,
        1,
        ev(0, "started", started),
    );
    accept(
        &mut tasks,
        &mut log,
        "w1",
        &id,
        1,
        ev(1, "checkpoint", r#"{"type":"checkpoint","step":1}"#),
    );
    accept(
        &mut tasks,
        &mut log,
        "w1",
        &id,
        1,
        ev(2, "checkpoint", r#"{"type":"checkpoint","step":2}"#),
    );
    let ckpt_pos = log.events.last().map(|e| e.pos).expect("stored");
    log.take(&tasks.handle_worker_gone(20, "w1", super::WorkerGone::Lost));

    // Whether rebuilt from the log or not, attempt 2 carries the second checkpoint.
    let mut tasks = same_after_replay(&tasks, &log);
    let (w, second) = assign(&mut tasks, &mut log, 2000, &[worker("w2", 8 << 30)]);
    assert_eq!((w.as_str(), second.attempt), ("w2", 2));
    assert_eq!(
        second.checkpoint.as_deref(),
        Some(r#"{"type":"checkpoint","step":2}"#)
    );
    let started = r#"{"attempt":2,"resumed_from_checkpoint":true}"#;
    accept(
        &mut tasks,
        &mut log,
        "w2",
        &id,
        2,
        ev(0, "started", started),
    );
    let resumed = log.last("resumed");
    assert_eq!(resumed["attempt"], 2);
    assert_eq!(resumed["checkpoint"]["pos"], ckpt_pos);
    assert_eq!(resumed["checkpoint"]["epoch"], 1);
    assert_eq!(resumed["checkpoint"]["seq"], 2);
    let resumed_event = log
        .events
        .iter()
        .find(|e| e.kind == "resumed")
        .expect("stored");
    assert_eq!(
        (resumed_event.epoch, resumed_event.seq),
        (2, None),
        "a coordinator event of epoch 2"
    );
    same_after_replay(&tasks, &log);
}

fn oom_spec(on_oom: OomPolicy) -> TaskSpec {
    let mut s = spec(4);
    s.limits = Limits {
        memory_bytes: Some(64 * MIB),
        ..Limits::default()
    };
    s.retry.on_oom = on_oom;
    s.retry.memory_ceiling_bytes = Some(200 * MIB);
    s
}

fn oom_exit(limit: u64) -> String {
    json!({ "class": "oom_killed", "memory_limit_bytes": limit, "peak_memory_bytes": limit, "oom_kills": 1 })
        .to_string()
}

#[test]
fn oom_with_more_memory_grows_to_the_ceiling_on_a_worker_that_fits_then_fails() {
    let mut tasks = Tasks::default();
    let mut log = Log::default();
    let (id, a) = tasks.submit(1, oom_spec(OomPolicy::RetryWithMoreMemory));
    log.take(&a);
    let small = worker("small", 100 * MIB);
    let big = worker("big", 8 << 30);
    let (w, first) = assign(&mut tasks, &mut log, 2, std::slice::from_ref(&small));
    assert_eq!(
        (w.as_str(), first.spec.limits.memory_bytes),
        ("small", Some(64 * MIB))
    );
    accept(
        &mut tasks,
        &mut log,
        "small",
        &id,
        1,
        ev(0, "exited", &oom_exit(64 * MIB)),
    );
    let retry = log.last("retry_scheduled");
    assert_eq!(retry["memory_bytes"], 128 * MIB);
    let why = retry["reason"].as_str().unwrap_or_default();
    assert!(
        why.contains("64 MiB limit, peak 64 MiB") && why.contains("128 MiB"),
        "{why}"
    );
    assert_eq!(tasks.retrying()[0].attempts, 1);

    // The retry reserves 128 MiB: the small worker no longer fits, even when it is the only one.
    let mut tasks = same_after_replay(&tasks, &log);
    assert!(tasks
        .schedule(5000, std::slice::from_ref(&small))
        .is_empty());
    let (w, second) = assign(&mut tasks, &mut log, 5000, &[small.clone(), big.clone()]);
    assert_eq!(w, "big");
    assert_eq!(second.spec.limits.memory_bytes, Some(128 * MIB));
    assert_eq!(second.spec.requirements.memory_bytes, 128 * MIB);
    assert_eq!(tasks.reserved()["big"].memory_bytes, 128 * MIB);

    // Next OOM: clamped to the 200 MiB ceiling; at the ceiling another OOM fails the task.
    accept(
        &mut tasks,
        &mut log,
        "big",
        &id,
        2,
        ev(0, "exited", &oom_exit(128 * MIB)),
    );
    assert_eq!(log.last("retry_scheduled")["memory_bytes"], 200 * MIB);
    let (_, third) = assign(&mut tasks, &mut log, 60_000, std::slice::from_ref(&big));
    assert_eq!(third.spec.limits.memory_bytes, Some(200 * MIB));
    accept(
        &mut tasks,
        &mut log,
        "big",
        &id,
        3,
        ev(0, "exited", &oom_exit(200 * MIB)),
    );
    let t = tasks.info(&id).expect("task");
    assert_eq!((t.state, t.attempts), (TaskState::Failed, 3));
    assert!(
        t.reason
            .as_deref()
            .unwrap_or_default()
            .contains("ceiling of 200 MiB"),
        "{t:?}"
    );
    same_after_replay(&tasks, &log);
}

#[test]
fn oom_policies_fail_and_plain_retry() {
    let mut tasks = Tasks::default();
    let mut log = Log::default();
    let (id, a) = tasks.submit(1, oom_spec(OomPolicy::Fail));
    log.take(&a);
    assign(&mut tasks, &mut log, 2, &[worker("w", 8 << 30)]);
    accept(
        &mut tasks,
        &mut log,
        "w",
        &id,
        1,
        ev(0, "exited", &oom_exit(64 * MIB)),
    );
    let t = tasks.info(&id).expect("task");
    assert_eq!(
        t.state,
        TaskState::Failed,
        "no retry although 3 attempts are left"
    );
    assert!(
        t.reason.as_deref().unwrap_or_default().contains("on_oom"),
        "{t:?}"
    );

    let mut s = oom_spec(OomPolicy::Retry);
    s.retry.memory_ceiling_bytes = None;
    let (id, a) = tasks.submit(3, s);
    log.take(&a);
    assign(&mut tasks, &mut log, 4, &[worker("w", 8 << 30)]);
    accept(
        &mut tasks,
        &mut log,
        "w",
        &id,
        1,
        ev(0, "exited", &oom_exit(64 * MIB)),
    );
    let (_, second) = assign(&mut tasks, &mut log, 5000, &[worker("w", 8 << 30)]);
    assert_eq!(
        second.spec.limits.memory_bytes,
        Some(64 * MIB),
        "same memory"
    );
    same_after_replay(&tasks, &log);
}

#[test]
fn drain_deadline_reschedules_without_counting_the_attempt() {
    let mut tasks = Tasks::default();
    let mut log = Log::default();
    let (id, a) = tasks.submit(1, spec(1));
    log.take(&a);
    let (_, first) = assign(&mut tasks, &mut log, 2, &[worker("w1", 8 << 30)]);
    accept(&mut tasks, &mut log, "w1", &id, 1, ev(0, "started", "{}"));
    assert_eq!(tasks.running_on("w1"), vec![id.clone()]);

    let actions = tasks.handle_drain_deadline(100, "w1");
    log.take(&actions);
    assert!(actions.contains(&TaskAction::Cancel {
        worker: "w1".into(),
        task_id: id.clone(),
        epoch: first.epoch
    }));
    assert_eq!(log.last("attempt_ended")["reason"], "drained");
    assert_eq!(log.last("retry_scheduled")["counted"], false);
    assert!(tasks.running_on("w1").is_empty());
    let retrying = tasks.retrying();
    assert_eq!((retrying[0].attempts, retrying[0].max_attempts), (1, 2));
    assert!(retrying[0].reason.contains("drained"), "{retrying:?}");
    // The stopped attempt's late exit is fenced.
    let late = AttemptEvent {
        seq: 1,
        ts_ms: 5,
        kind: "exited".into(),
        payload: r#"{"class":"cancelled"}"#.into(),
    };
    assert!(matches!(
        tasks.handle_event(101, "w1", &id, 1, late),
        EventVerdict::Fenced { .. }
    ));

    // max_attempts = 1, yet the task runs again at once (no backoff), and it still counts
    // its real failures: this second attempt failing ends the task.
    let mut tasks = same_after_replay(&tasks, &log);
    let (w, second) = assign(&mut tasks, &mut log, 100, &[worker("w2", 8 << 30)]);
    assert_eq!((w.as_str(), second.attempt), ("w2", 2));
    accept(
        &mut tasks,
        &mut log,
        "w2",
        &id,
        2,
        ev(0, "exited", r#"{"class":{"exited":1}}"#),
    );
    let t = tasks.info(&id).expect("task");
    assert_eq!(t.state, TaskState::Failed);
    assert!(
        t.reason
            .as_deref()
            .unwrap_or_default()
            .starts_with("attempt 1 of 1"),
        "{t:?}"
    );
    assert!(
        tasks.handle_drain_deadline(200, "w1").is_empty(),
        "nothing left there"
    );
    same_after_replay(&tasks, &log);
}
