use super::*;
use crate::store::session::StoredTask;
use drover_protocol::task::{OnDisconnect, Requirements, RetryPolicy};
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

/// Submits `n` tasks of `spec(max_attempts)` at time 1, logging what each submit wrote; their
/// ids in submission order.
fn submit_many(tasks: &mut Tasks, log: &mut Log, n: usize, max_attempts: u32) -> Vec<String> {
    (0..n)
        .map(|_| {
            let (id, a) = tasks.submit(1, spec(max_attempts));
            log.take(&a);
            id
        })
        .collect()
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
    let a = tasks.handle_worker_gone(3, "w1", WorkerGone::Lost);
    log.take(&a);
    assert_eq!(log.kinds(&id)[2..], ["attempt_ended", "retry_scheduled"]);
    let a = tasks.schedule(1000, &[worker("w2")]);
    assert!(matches!(&a[1], TaskAction::Assign { worker, .. } if worker == "w2"));
    // A worker that comes back still running its attempt keeps it (reattached).
    log.take(&a);
    let a = tasks.handle_worker_attempts(1001, "w2", &[(id.clone(), 2)], true);
    log.take(&a);
    assert_eq!(log.kinds(&id).last().unwrap(), "attempt_reattached");
    assert_eq!(tasks.info(&id).unwrap().state, TaskState::Running);
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
    log.take(&tasks.handle_worker_gone(6, "w1", WorkerGone::Lost));
    assert_eq!(tasks.info(&b_id).unwrap().state, TaskState::Cancelled);
    let (c_id, a) = tasks.submit(7, spec(3));
    log.take(&a);
    log.take(&tasks.cancel(8, &c_id).unwrap().1);
    assert_eq!(tasks.info(&c_id).unwrap().state, TaskState::Cancelled);
    assert_replays_to_same(&tasks, &log);
}

fn keep_running_spec(lost_after_ms: Option<u64>) -> TaskSpec {
    TaskSpec {
        on_disconnect: Some(OnDisconnect::KeepRunning),
        lost_after_ms,
        ..spec(3)
    }
}

/// Submit and place one task on `w1`; returns its id.
fn placed(tasks: &mut Tasks, log: &mut Log, spec: TaskSpec) -> String {
    let (id, a) = tasks.submit(1, spec);
    log.take(&a);
    log.take(&tasks.schedule(2, &[worker("w1")]));
    assert_eq!(tasks.info(&id).unwrap().state, TaskState::Running);
    id
}

fn cancels(actions: &[TaskAction]) -> Vec<(String, String, u64)> {
    actions
        .iter()
        .filter_map(|a| match a {
            TaskAction::Cancel {
                worker,
                task_id,
                epoch,
            } => Some((worker.clone(), task_id.clone(), *epoch)),
            _ => None,
        })
        .collect()
}

#[test]
fn keep_running_attempt_survives_a_lost_worker_and_is_reattached() {
    let mut tasks = Tasks::default();
    let mut log = Log::default();
    let id = placed(&mut tasks, &mut log, keep_running_spec(Some(10_000)));
    accept(&mut tasks, &mut log, "w1", &id, 1, ev(0, "started", "{}"));
    accept(&mut tasks, &mut log, "w1", &id, 1, ev(1, "stdout", "{}"));
    let before = log.events.len();
    // Lost at t=100: nothing ends, nothing is written.
    assert!(tasks
        .handle_worker_gone(100, "w1", WorkerGone::Lost)
        .is_empty());
    tasks.sanity_check();
    let info = tasks.info(&id).unwrap();
    assert_eq!(info.state, TaskState::Running);
    assert!(info.reason.unwrap().contains("lost"));
    // Not yet past lost_after: still kept, and no placement would move it.
    assert!(tasks.tick(10_099).is_empty());
    assert!(!tasks.has_placeable(10_099));
    assert_eq!(log.events.len(), before);
    // Back at t=5000 with the attempt: reattached, same epoch.
    let a = tasks.handle_worker_attempts(5_000, "w1", &[(id.clone(), 1)], true);
    assert!(cancels(&a).is_empty());
    log.take(&a);
    tasks.sanity_check();
    assert_eq!(log.kinds(&id).last().unwrap(), "attempt_reattached");
    assert!(log
        .events
        .last()
        .unwrap()
        .payload
        .contains("\"detached_ms\":4900"));
    assert!(!tasks.has_detached());
    // The worker resends what it had no ack for: duplicates are acked, new ones follow on.
    assert_eq!(
        tasks.handle_event(5_001, "w1", &id, 1, ev(1, "stdout", "{}")),
        EventVerdict::Duplicate { seq: 1 }
    );
    accept(
        &mut tasks,
        &mut log,
        "w1",
        &id,
        1,
        ev(2, "exited", r#"{"class":{"exited":0}}"#),
    );
    let info = tasks.info(&id).unwrap();
    assert_eq!(
        (info.state, info.epoch, info.attempts),
        (TaskState::Succeeded, 1, 1)
    );
    // The final events resent after a lost ack are acknowledged, not refused.
    assert_eq!(
        tasks.handle_event(
            5_002,
            "w1",
            &id,
            1,
            ev(2, "exited", r#"{"class":{"exited":0}}"#)
        ),
        EventVerdict::Duplicate { seq: 2 }
    );
    assert!(matches!(
        tasks.handle_event(5_002, "w1", &id, 1, ev(3, "stdout", "{}")),
        EventVerdict::Fenced { .. }
    ));
    // Long after, the old detachment does nothing.
    assert!(tasks.tick(1_000_000).is_empty());
    let seqs: Vec<u64> = log.events.iter().filter_map(|e| e.seq).collect();
    assert_eq!(seqs, [0, 1, 2]);
    assert_replays_to_same(&tasks, &log);
}

#[test]
fn keep_running_past_lost_after_is_rescheduled_and_the_stale_attempt_fenced() {
    let mut tasks = Tasks::default();
    let mut log = Log::default();
    let id = placed(&mut tasks, &mut log, keep_running_spec(Some(10_000)));
    accept(&mut tasks, &mut log, "w1", &id, 1, ev(0, "started", "{}"));
    assert!(tasks
        .handle_worker_gone(100, "w1", WorkerGone::Lost)
        .is_empty());
    // A second loss report does not restart the clock.
    assert!(tasks
        .handle_worker_gone(5_000, "w1", WorkerGone::Lost)
        .is_empty());
    let a = tasks.tick(10_100);
    log.take(&a);
    tasks.sanity_check();
    assert_eq!(
        log.kinds(&id)[3..],
        ["attempt_ended", "retry_scheduled"],
        "{:?}",
        log.kinds(&id)
    );
    assert!(log.events[3].payload.contains("worker_lost"));
    log.take(&tasks.schedule(20_000, &[worker("w2")]));
    assert_eq!(tasks.info(&id).unwrap().epoch, 2);
    // w1 comes back still running epoch 1: told to kill it; nothing stored for it.
    let before = log.events.len();
    let a = tasks.handle_worker_attempts(20_001, "w1", &[(id.clone(), 1)], true);
    assert_eq!(cancels(&a), [("w1".to_owned(), id.clone(), 1)]);
    log.take(&a);
    assert_eq!(log.events.len(), before);
    assert!(matches!(
        tasks.handle_event(20_002, "w1", &id, 1, ev(1, "stdout", "{}")),
        EventVerdict::Fenced { .. }
    ));
    assert_eq!(tasks.info(&id).unwrap().worker.as_deref(), Some("w2"));
    assert_replays_to_same(&tasks, &log);
}

#[test]
fn kill_attempts_and_goodbyes_end_at_once() {
    let mut tasks = Tasks::default();
    let mut log = Log::default();
    let kill = placed(&mut tasks, &mut log, spec(3));
    let a = tasks.handle_worker_gone(100, "w1", WorkerGone::Lost);
    log.take(&a);
    assert_eq!(tasks.info(&kill).unwrap().state, TaskState::Queued);
    // keep_running on a worker that says goodbye: it stops its attempts, so they end now.
    let mut tasks = Tasks::default();
    let mut log = Log::default();
    let keep = placed(&mut tasks, &mut log, keep_running_spec(None));
    log.take(&tasks.handle_worker_gone(100, "w1", WorkerGone::Down));
    assert_eq!(tasks.info(&keep).unwrap().state, TaskState::Queued);
    assert!(!tasks.has_detached());
    tasks.sanity_check();
}

#[test]
fn the_workers_started_event_sets_the_policy_and_survives_a_restart() {
    let mut tasks = Tasks::default();
    let mut log = Log::default();
    // The spec does not choose; the worker's default is keep_running with 2 s.
    let id = placed(&mut tasks, &mut log, spec(3));
    let started = r#"{"attempt":1,"on_disconnect":"keep_running","lost_after_ms":2000}"#;
    accept(
        &mut tasks,
        &mut log,
        "w1",
        &id,
        1,
        ev(0, "started", started),
    );
    // The coordinator restarts: the policy comes back from the session.
    let mut tasks = Tasks::restore(log.stored());
    assert!(tasks
        .handle_worker_gone(50, "w1", WorkerGone::Lost)
        .is_empty());
    assert!(tasks.tick(2_049).is_empty());
    log.take(&tasks.tick(2_050));
    assert_eq!(tasks.info(&id).unwrap().state, TaskState::Queued);
    // And a worker that says kill in `started` overrides a keep_running spec.
    let mut tasks = Tasks::default();
    let mut log = Log::default();
    let id = placed(&mut tasks, &mut log, keep_running_spec(None));
    let started = r#"{"attempt":1,"on_disconnect":"kill","lost_after_ms":2000}"#;
    accept(
        &mut tasks,
        &mut log,
        "w1",
        &id,
        1,
        ev(0, "started", started),
    );
    log.take(&tasks.handle_worker_gone(50, "w1", WorkerGone::Lost));
    assert_eq!(tasks.info(&id).unwrap().state, TaskState::Queued);
}

#[test]
fn a_cancel_sent_while_detached_is_repeated_on_reattach() {
    let mut tasks = Tasks::default();
    let mut log = Log::default();
    let id = placed(&mut tasks, &mut log, keep_running_spec(Some(60_000)));
    assert!(tasks
        .handle_worker_gone(100, "w1", WorkerGone::Lost)
        .is_empty());
    log.take(&tasks.cancel(200, &id).unwrap().1);
    let a = tasks.handle_worker_attempts(300, "w1", &[(id.clone(), 1)], true);
    assert_eq!(cancels(&a), [("w1".to_owned(), id.clone(), 1)]);
    log.take(&a);
    accept(
        &mut tasks,
        &mut log,
        "w1",
        &id,
        1,
        ev(0, "exited", r#"{"class":"cancelled"}"#),
    );
    assert_eq!(tasks.info(&id).unwrap().state, TaskState::Cancelled);
    // Cancelled while detached and never back: cancelled at lost_after, not retried.
    let mut tasks = Tasks::default();
    let mut log = Log::default();
    let id = placed(&mut tasks, &mut log, keep_running_spec(Some(60_000)));
    assert!(tasks
        .handle_worker_gone(100, "w1", WorkerGone::Lost)
        .is_empty());
    log.take(&tasks.cancel(200, &id).unwrap().1);
    log.take(&tasks.tick(60_100));
    assert_eq!(tasks.info(&id).unwrap().state, TaskState::Cancelled);
    tasks.sanity_check();
}

#[test]
fn a_worker_back_without_its_attempt_ends_it_even_if_detached() {
    let mut tasks = Tasks::default();
    let mut log = Log::default();
    let id = placed(&mut tasks, &mut log, keep_running_spec(Some(60_000)));
    assert!(tasks
        .handle_worker_gone(100, "w1", WorkerGone::Lost)
        .is_empty());
    // Restarted (SIGKILL): its sandboxes died with it, so it reports nothing.
    log.take(&tasks.handle_worker_attempts(200, "w1", &[], true));
    assert_eq!(tasks.info(&id).unwrap().state, TaskState::Queued);
    assert!(log
        .events
        .iter()
        .any(|e| e.payload.contains("worker_restarted")));
    assert!(!tasks.has_detached());
    tasks.sanity_check();
    assert_replays_to_same(&tasks, &log);
}

#[test]
fn a_stalled_worker_that_heartbeats_again_gets_its_attempts_back() {
    let mut tasks = Tasks::default();
    let mut log = Log::default();
    let id = placed(&mut tasks, &mut log, keep_running_spec(Some(60_000)));
    let kill = placed(&mut tasks, &mut log, spec(3));
    assert_eq!(
        tasks.handle_worker_gone(100, "w1", WorkerGone::Lost).len(),
        1
    );
    let a = tasks.handle_worker_revived(900, "w1");
    log.take(&a);
    assert_eq!(log.kinds(&id).last().unwrap(), "attempt_reattached");
    assert!(!tasks.has_detached());
    assert_eq!(tasks.info(&id).unwrap().state, TaskState::Running);
    // The kill attempt ended when the worker was lost and stays ended.
    assert_eq!(tasks.info(&kill).unwrap().state, TaskState::Queued);
    assert!(tasks.handle_worker_revived(901, "w1").is_empty());
    tasks.sanity_check();
}

#[test]
fn a_later_report_ends_what_is_missing_without_reattaching() {
    let mut tasks = Tasks::default();
    let mut log = Log::default();
    let a = placed(&mut tasks, &mut log, keep_running_spec(None));
    let b = placed(&mut tasks, &mut log, spec(3));
    let before = log.events.len();
    // Mid-session: b lost its spool, a runs on.
    let actions = tasks.handle_worker_attempts(50, "w1", &[(a.clone(), 1)], false);
    log.take(&actions);
    assert_eq!(tasks.info(&a).unwrap().state, TaskState::Running);
    assert_eq!(tasks.info(&b).unwrap().state, TaskState::Queued);
    assert!(!log.kinds(&a)[..].contains(&"attempt_reattached".to_owned()));
    assert_eq!(
        log.events.len(),
        before + 2,
        "b's attempt_ended and retry_scheduled only"
    );
    tasks.sanity_check();
}

/// Assign ahead: a full worker holds one more task, which its `started` releases (and the next
/// one goes ahead); the hold survives a restart; held tasks are cancelled and lost like running
/// ones.
#[test]
fn a_full_worker_holds_one_task_ahead_until_it_starts() {
    let mut tasks = Tasks::default();
    tasks.set_assign_ahead(true);
    let mut log = Log::default();
    let ids = submit_many(&mut tasks, &mut log, 5, 3);
    let w1 = || {
        let mut w = worker("w1");
        w.reserved = Capacity::default();
        w
    };
    let schedule = |tasks: &mut Tasks, log: &mut Log| {
        let mut view = w1();
        view.reserved = tasks.reserved().get("w1").copied().unwrap_or_default();
        let a = tasks.schedule(2, &[view]);
        log.take(&a);
        tasks.sanity_check();
        a
    };
    let placed = schedule(&mut tasks, &mut log);
    let assigned: Vec<(String, bool)> = log
        .events
        .iter()
        .filter(|e| e.kind == "assigned")
        .map(|e| (e.task_id.clone(), e.payload.contains("\"ahead\":true")))
        .collect();
    assert_eq!(
        assigned,
        vec![
            (ids[0].clone(), false),
            (ids[1].clone(), false),
            (ids[2].clone(), true)
        ],
        "two fit the two cpus, one more goes ahead: {placed:?}"
    );
    let held = tasks.info(&ids[2]).unwrap();
    assert_eq!(held.state, TaskState::Running);
    assert!(held.reason.unwrap().contains("assigned ahead to w1"));
    assert!(
        schedule(&mut tasks, &mut log).is_empty(),
        "one held at a time"
    );
    assert_replays_to_same(&tasks, &log);
    let mut restored = Tasks::restore(log.stored());
    restored.set_assign_ahead(true);
    restored.sanity_check();
    let mut view = w1();
    view.reserved = restored.reserved()["w1"];
    assert!(
        restored.schedule(3, &[view]).is_empty(),
        "the hold is in the session"
    );

    // The held one starts (the worker had room): the next goes ahead.
    accept(
        &mut tasks,
        &mut log,
        "w1",
        &ids[2],
        1,
        ev(0, "started", "{}"),
    );
    assert_eq!(tasks.info(&ids[2]).unwrap().reason, None);
    schedule(&mut tasks, &mut log);
    assert!(log.kinds(&ids[3]).contains(&"assigned".to_owned()));
    assert!(!log.kinds(&ids[4]).contains(&"assigned".to_owned()));
    // Cancelled while held: the worker reports the end without a start; the hold is free.
    let (_, a) = tasks.cancel(4, &ids[3]).unwrap();
    assert!(a
        .iter()
        .any(|a| matches!(a, TaskAction::Cancel { worker, .. } if worker == "w1")));
    log.take(&a);
    accept(
        &mut tasks,
        &mut log,
        "w1",
        &ids[3],
        1,
        ev(0, "exited", r#"{"class":"cancelled"}"#),
    );
    assert_eq!(tasks.info(&ids[3]).unwrap().state, TaskState::Cancelled);
    schedule(&mut tasks, &mut log);
    assert!(log.kinds(&ids[4]).contains(&"assigned".to_owned()));
    // Lost: held and running alike end and are retried.
    let a = tasks.handle_worker_gone(5, "w1", WorkerGone::Lost);
    log.take(&a);
    tasks.sanity_check();
    for id in [&ids[0], &ids[1], &ids[2], &ids[4]] {
        assert_eq!(tasks.info(id).unwrap().state, TaskState::Queued, "{id}");
    }
    assert_replays_to_same(&tasks, &log);
}

/// Random inputs with assign ahead on, against a model worker that starts its assignments in
/// the order they came, each only when it fits what it already runs (as the real worker's
/// gate does): after every step the index and the one-hold invariant hold (sanity_check), a
/// task placed with room never has to wait at the worker, the worker never runs more than its
/// capacity, and the session replays to the same state.
#[test]
fn random_schedules_with_holds_keep_every_invariant() {
    use std::collections::{BTreeMap, VecDeque};
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut below = |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let names = ["w1", "w2"];
    let (mut holds, mut waited) = (0, 0);
    for _round in 0..60 {
        let mut tasks = Tasks::default();
        tasks.set_assign_ahead(true);
        let mut log = Log::default();
        let mut ids = Vec::new();
        // Per worker: assignments not started yet, in arrival order, and what runs.
        let mut waiting: BTreeMap<&str, VecDeque<(String, u64, bool)>> = BTreeMap::new();
        let mut running: BTreeMap<&str, Vec<(String, u64, u64)>> = BTreeMap::new();
        let cpus_of =
            |tasks: &Tasks, id: &str| u64::from(tasks.info(id).unwrap().spec.requirements.cpus);
        for step in 0..150u64 {
            let now = 10 + step;
            let w = names[below(2) as usize];
            match below(8) {
                0 | 1 => {
                    let mut s = spec(2);
                    s.requirements.cpus = below(3) as u32;
                    s.retry.backoff_ms = 0;
                    let (id, a) = tasks.submit(now, s);
                    log.take(&a);
                    ids.push(id);
                }
                2 | 3 => {
                    let views: Vec<WorkerView> = names
                        .iter()
                        .map(|n| {
                            let mut v = worker(n);
                            v.reserved = tasks.reserved().get(*n).copied().unwrap_or_default();
                            v
                        })
                        .collect();
                    let a = tasks.schedule(now, &views);
                    for action in &a {
                        if let TaskAction::Assign { worker, assignment } = action {
                            let n = names.iter().find(|n| *n == worker).unwrap();
                            let held = tasks.info(&assignment.task_id).unwrap().reason.is_some();
                            holds += usize::from(held);
                            waiting.entry(n).or_default().push_back((
                                assignment.task_id.clone(),
                                assignment.epoch,
                                held,
                            ));
                        }
                    }
                    log.take(&a);
                }
                4 => {
                    // The worker starts its oldest assignment if it has room.
                    let Some((id, epoch, held)) = waiting.entry(w).or_default().front().cloned()
                    else {
                        continue;
                    };
                    let need = cpus_of(&tasks, &id);
                    let used: u64 = running.entry(w).or_default().iter().map(|r| r.2).sum();
                    let fits = used + need <= 2 || used == 0;
                    assert!(
                        fits || held,
                        "{id} was placed with room but does not fit {w}"
                    );
                    waited += usize::from(!fits);
                    if fits {
                        waiting.get_mut(w).unwrap().pop_front();
                        accept(&mut tasks, &mut log, w, &id, epoch, ev(0, "started", "{}"));
                        running.get_mut(w).unwrap().push((id, epoch, need));
                    }
                }
                5 => {
                    let on = running.entry(w).or_default();
                    if !on.is_empty() {
                        let (id, epoch, _) = on.remove(below(on.len() as u64) as usize);
                        accept(
                            &mut tasks,
                            &mut log,
                            w,
                            &id,
                            epoch,
                            ev(1, "exited", r#"{"class":{"exited":0}}"#),
                        );
                    }
                }
                6 if !ids.is_empty() => {
                    let id = ids[below(ids.len() as u64) as usize].clone();
                    let (_, a) = tasks.cancel(now, &id).unwrap();
                    log.take(&a);
                    // The worker stops it at once and reports the end (no start if it waited).
                    for action in &a {
                        if let TaskAction::Cancel {
                            worker,
                            task_id,
                            epoch,
                        } = action
                        {
                            let n = names.iter().find(|n| *n == worker).unwrap();
                            let q = waiting.entry(n).or_default();
                            let was_waiting = q.iter().any(|x| &x.0 == task_id && x.1 == *epoch);
                            q.retain(|x| !(&x.0 == task_id && x.1 == *epoch));
                            running
                                .entry(n)
                                .or_default()
                                .retain(|x| !(&x.0 == task_id && x.1 == *epoch));
                            let seq = if was_waiting { 0 } else { 1 };
                            accept(
                                &mut tasks,
                                &mut log,
                                n,
                                task_id,
                                *epoch,
                                ev(seq, "exited", r#"{"class":"cancelled"}"#),
                            );
                        }
                    }
                }
                7 if below(4) == 0 => {
                    log.take(&tasks.handle_worker_gone(now, w, WorkerGone::Lost));
                    waiting.remove(w);
                    running.remove(w);
                }
                _ => {}
            }
            tasks.sanity_check();
            for n in names {
                let used: u64 = running.get(n).map_or(0, |r| r.iter().map(|x| x.2).sum());
                let one = running.get(n).is_some_and(|r| r.len() == 1);
                assert!(used <= 2 || one, "{n} runs {used} cpus");
            }
        }
        assert_replays_to_same(&tasks, &log);
    }
    assert!(
        holds > 50 && waited > 20,
        "held {holds}, waited {waited}: the walk exercises holds"
    );
}

/// The store keeps no index by (task, epoch, seq): this state machine is what keeps a worker
/// event from being stored twice. Workers resend, send stale epochs, skip ahead, retry and the
/// coordinator restarts (state rebuilt from the log), in a seeded random order; after every
/// step each (task, epoch, seq) is in the log at most once and positions run from 0 without
/// gaps.
#[test]
fn worker_events_reach_the_log_at_most_once_per_attempt_seq() {
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let mut tasks = Tasks::default();
    let mut log = Log::default();
    let ids = submit_many(&mut tasks, &mut log, 3, 50);
    let workers = [worker("w1"), worker("w2")];
    let mut now = 2;
    // Next seq per (task, epoch) as its worker knows it from acks: resends go back from there.
    let mut acked: HashMap<(String, u64), u64> = HashMap::new();
    let mut duplicates = 0;
    for step in 0..4_000 {
        now += 200;
        match next(20) {
            0 => log.take(&tasks.schedule(now, &workers)),
            1 => tasks = Tasks::restore(log.stored()),
            _ => {
                let id = &ids[next(ids.len() as u64) as usize];
                let info = tasks.info(id).unwrap();
                let Some(current) = info.worker.clone() else {
                    continue;
                };
                // Mostly the current attempt, sometimes an older epoch or the other worker.
                let epoch = info.epoch.saturating_sub(u64::from(next(8) == 0));
                let w = if next(10) == 0 {
                    "w2"
                } else {
                    current.as_str()
                };
                let expected = acked.entry((id.clone(), epoch)).or_insert(0);
                // From two back (resends) to one ahead (a gap).
                let seq = (*expected + 1).saturating_sub(next(5).min(3));
                let e = if next(25) == 0 {
                    ev(seq, "exited", r#"{"class":{"exited":1}}"#)
                } else {
                    ev(seq, "stdout", "{}")
                };
                match tasks.handle_event(now, w, id, epoch, e) {
                    EventVerdict::Accept { seq, actions } => {
                        *expected = seq + 1;
                        log.take(&actions);
                    }
                    EventVerdict::Duplicate { .. } => duplicates += 1,
                    EventVerdict::Fenced { .. } => {}
                }
            }
        }
        tasks.sanity_check();
        let mut seen = std::collections::HashSet::new();
        for e in &log.events {
            if let Some(seq) = e.seq {
                assert!(
                    seen.insert((e.task_id.clone(), e.epoch, seq)),
                    "step {step}: {}/{} seq {seq} stored twice",
                    e.task_id,
                    e.epoch
                );
            }
        }
        for id in &ids {
            let positions: Vec<u64> = log
                .events
                .iter()
                .filter(|e| &e.task_id == id)
                .map(|e| e.pos)
                .collect();
            assert!(positions.iter().copied().eq(0..positions.len() as u64));
        }
    }
    let worker_events = log.events.iter().filter(|e| e.seq.is_some()).count();
    let epochs: u64 = ids.iter().map(|id| tasks.info(id).unwrap().epoch).sum();
    assert!(
        worker_events > 400 && epochs > 10 && duplicates > 400,
        "the walk should store many events over several attempts and resend many \
         ({worker_events} events, {epochs} epochs, {duplicates} duplicates)"
    );
}
