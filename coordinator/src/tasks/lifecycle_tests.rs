use super::*;
use crate::store::session::StoredTask;
use drover_protocol::task::{Requirements, RetryPolicy};
use drover_protocol::{Usage, WorkerInfo, WorkerState};

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
        },
        priority: 0,
        on_disconnect: None,
        lost_after_ms: None,
    }
}

fn worker(name: &str) -> WorkerView {
    let info = WorkerInfo {
        name: name.into(),
        state: WorkerState::Ready,
        connected: true,
        address: String::new(),
        version: String::new(),
        protocol_version: 2,
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

/// Records everything appended, like the store would.
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

    fn kinds(&self, id: &str) -> Vec<String> {
        self.events
            .iter()
            .filter(|e| e.task_id == id)
            .map(|e| e.kind.clone())
            .collect()
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

fn assert_replays_to_same(tasks: &Tasks, log: &Log) {
    let rebuilt = Tasks::restore(log.stored());
    assert_eq!(rebuilt.list(None), tasks.list(None));
}

#[test]
fn runs_to_success_with_contiguous_positions_and_replays() {
    let mut tasks = Tasks::default();
    let mut log = Log::default();
    let (id, a) = tasks.submit(1, spec(3));
    log.take(&a);
    let a = tasks.schedule(2, &[worker("w1")]);
    assert!(
        matches!(&a[1], TaskAction::Assign { worker, assignment } if worker == "w1" && assignment.epoch == 1)
    );
    log.take(&a);
    accept(&mut tasks, &mut log, "w1", &id, 1, ev(0, "started", "{}"));
    accept(
        &mut tasks,
        &mut log,
        "w1",
        &id,
        1,
        ev(1, "stdout", r#"{"data":"hi"}"#),
    );
    accept(
        &mut tasks,
        &mut log,
        "w1",
        &id,
        1,
        ev(2, "exited", r#"{"class":{"exited":0}}"#),
    );
    assert_eq!(
        log.kinds(&id),
        [
            "submitted",
            "assigned",
            "started",
            "stdout",
            "exited",
            "completed"
        ]
    );
    let positions: Vec<u64> = log.events.iter().map(|e| e.pos).collect();
    assert_eq!(positions, (0..6).collect::<Vec<_>>());
    let info = tasks.info(&id).unwrap();
    assert_eq!(
        (info.state, info.exit, info.events),
        (TaskState::Succeeded, Some(ExitClass::Exited(0)), 6)
    );
    assert_replays_to_same(&tasks, &log);
}

#[test]
fn duplicates_stale_epochs_gaps_and_strangers() {
    let mut tasks = Tasks::default();
    let mut log = Log::default();
    let (id, a) = tasks.submit(1, spec(3));
    log.take(&a);
    log.take(&tasks.schedule(2, &[worker("w1")]));
    accept(&mut tasks, &mut log, "w1", &id, 1, ev(0, "started", "{}"));
    assert_eq!(
        tasks.handle_event(3, "w1", &id, 1, ev(0, "started", "{}")),
        EventVerdict::Duplicate { seq: 0 }
    );
    assert!(matches!(
        tasks.handle_event(3, "w1", &id, 1, ev(5, "stdout", "{}")),
        EventVerdict::Fenced { .. }
    ));
    assert!(matches!(
        tasks.handle_event(3, "w1", &id, 0, ev(1, "stdout", "{}")),
        EventVerdict::Fenced { .. }
    ));
    assert!(matches!(
        tasks.handle_event(3, "w2", &id, 1, ev(1, "stdout", "{}")),
        EventVerdict::Fenced { .. }
    ));
    assert!(matches!(
        tasks.handle_event(3, "w1", "t99", 1, ev(1, "stdout", "{}")),
        EventVerdict::Fenced { .. }
    ));
    assert_eq!(log.kinds(&id).len(), 3, "nothing refused was stored");
}

#[test]
fn failures_retry_with_new_epochs_then_fail_once() {
    let mut tasks = Tasks::default();
    let mut log = Log::default();
    let (id, a) = tasks.submit(1, spec(2));
    log.take(&a);
    log.take(&tasks.schedule(2, &[worker("w1")]));
    accept(
        &mut tasks,
        &mut log,
        "w1",
        &id,
        1,
        ev(0, "exited", r#"{"class":{"exited":3}}"#),
    );
    let info = tasks.info(&id).unwrap();
    assert_eq!(info.state, TaskState::Queued);
    assert!(info.reason.unwrap().contains("exited with code 3"));
    assert!(
        tasks.schedule(50, &[worker("w1")]).is_empty(),
        "backoff holds the retry"
    );
    log.take(&tasks.schedule(200, &[worker("w1")]));
    assert_eq!(tasks.info(&id).unwrap().epoch, 2);
    assert!(matches!(
        tasks.handle_event(201, "w1", &id, 1, ev(1, "stdout", "{}")),
        EventVerdict::Fenced { .. }
    ));
    accept(
        &mut tasks,
        &mut log,
        "w1",
        &id,
        2,
        ev(0, "exited", r#"{"class":"oom_killed"}"#),
    );
    let info = tasks.info(&id).unwrap();
    assert_eq!(info.state, TaskState::Failed);
    assert_eq!(info.attempts, 2);
    assert_eq!(
        log.kinds(&id).iter().filter(|k| *k == "completed").count(),
        1
    );
    assert!(matches!(
        tasks.handle_event(300, "w1", &id, 2, ev(1, "stdout", "{}")),
        EventVerdict::Fenced { .. }
    ));
    assert_replays_to_same(&tasks, &log);
}

#[test]
fn lost_worker_reschedules_elsewhere() {
    let mut tasks = Tasks::default();
    let mut log = Log::default();
    let (id, a) = tasks.submit(1, spec(3));
    log.take(&a);
    log.take(&tasks.schedule(2, &[worker("w1")]));
    let a = tasks.handle_worker_attempts(3, "w1", None);
    log.take(&a);
    assert_eq!(log.kinds(&id)[2..], ["attempt_ended", "retry_scheduled"]);
    let a = tasks.schedule(1000, &[worker("w2")]);
    assert!(matches!(&a[1], TaskAction::Assign { worker, .. } if worker == "w2"));
    // A worker that comes back still running its attempt keeps it.
    log.take(&a);
    assert!(tasks
        .handle_worker_attempts(1001, "w2", Some(&[(id.clone(), 2)]))
        .is_empty());
    assert_replays_to_same(&tasks, &log);
}

#[test]
fn cancel_queued_and_running() {
    let mut tasks = Tasks::default();
    let mut log = Log::default();
    let (a_id, a) = tasks.submit(1, spec(3));
    log.take(&a);
    let (b_id, a) = tasks.submit(1, spec(3));
    log.take(&a);
    log.take(&tasks.schedule(2, &[worker("w1")]));
    // The second task does not fit next to the first (2 cpus, 1 each: it does), so place it too.
    let running: Vec<_> = tasks
        .list(Some(TaskState::Running))
        .into_iter()
        .map(|t| t.id)
        .collect();
    assert_eq!(running.len(), 2);
    let (done, a) = tasks.cancel(3, &a_id).unwrap();
    assert!(!done);
    assert!(a
        .iter()
        .any(|x| matches!(x, TaskAction::Cancel { worker, .. } if worker == "w1")));
    log.take(&a);
    accept(
        &mut tasks,
        &mut log,
        "w1",
        &a_id,
        1,
        ev(0, "exited", r#"{"class":"cancelled"}"#),
    );
    assert_eq!(tasks.info(&a_id).unwrap().state, TaskState::Cancelled);
    assert_eq!(tasks.cancel(4, &a_id).unwrap(), (true, vec![]));
    // Lost while cancelling: cancelled, not retried.
    log.take(&tasks.cancel(5, &b_id).unwrap().1);
    log.take(&tasks.handle_worker_attempts(6, "w1", None));
    assert_eq!(tasks.info(&b_id).unwrap().state, TaskState::Cancelled);
    let (c_id, a) = tasks.submit(7, spec(3));
    log.take(&a);
    log.take(&tasks.cancel(8, &c_id).unwrap().1);
    assert_eq!(tasks.info(&c_id).unwrap().state, TaskState::Cancelled);
    assert_replays_to_same(&tasks, &log);
}
