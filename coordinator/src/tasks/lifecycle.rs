//! Task lifecycle as a state machine over sessions: submissions, placements, worker events,
//! lost workers and cancels in; session events to append and messages to send out.
//!
//! Task state is *derived from the session*: every decision is recorded as a coordinator
//! event (`submitted`, `assigned`, `attempt_ended`, `retry_scheduled`, `cancel_requested`,
//! `completed`) and [`Tasks::restore`] rebuilds the same state by replaying them. No I/O and
//! no clock: every input carries `now`.
//!
//! Operations (issue 5), derived from the session like the rest: the last checkpoint's
//! position goes with every new attempt and a `resumed` event records which one it started
//! from; an OOM follows `retry.on_oom` ([`super::oom`]) and a grown memory figure is kept in
//! `retry_scheduled`; attempts rescheduled off a drained worker (`attempt_ended {drained}`)
//! do not count against `max_attempts` (`retry_scheduled {counted: false}`).
//!
//! Acceptance (issue 6, [`super::acceptance`]): the worker's `iteration_started` and
//! `criterion_checked` events feed the task's [`Progress`]; an `exited(0)` under criteria ends
//! the task `satisfied`, `failed` (`max_iterations_reached`) or, with a verdict asked for,
//! records `verdict_requested` and queues a verdict attempt (its own epoch, on another worker
//! when one fits) whose `exited` ends the task `verified` or `rejected`. Epochs count work
//! attempts and verdict attempts together.
//!
//! Invariants (checked by [`Tasks::sanity_check`]):
//! - positions of a session are assigned here, from 0, without gaps;
//! - a worker event is accepted only for the task's current epoch, from the worker that
//!   attempt was assigned to, at the next expected seq; a lower seq is a duplicate (acked
//!   again, not stored); anything else is fenced;
//! - `completed` is appended at most once per task, and only from `running` or `queued`;
//! - an attempt's epoch is in the session (durable) before its assignment is sent.
//!
//! Disconnects (`on_disconnect`): a `kill` attempt ends when its worker is lost (lease expired)
//! or comes back without it. A `keep_running` attempt is *detached* instead when its worker is
//! lost: it stays `running` until the worker reports it again after re-registering (it is
//! reattached, same epoch, and its spooled events are replayed idempotently) or until
//! `lost_after` passes ([`Tasks::tick`]), when it ends with `worker_lost` and is rescheduled
//! under a new epoch. A worker that reports an attempt that is no longer current is told to
//! kill it (fencing). The policy of an attempt comes from its spec, and is confirmed by the
//! worker in the attempt's `started` event (which carries the worker's defaults applied), so a
//! restarted coordinator knows it from the session. Detachment itself is not persisted: after
//! a restart the `lost_after` clock starts again when the worker is found lost.

use super::acceptance::{self, Progress, WorkOutcome};
use super::index::{Facts, Filed, Index};
use super::oom::{self, OomDecision, OomReport};
use super::placement::{pick_grouped, pick_next, QueuedTask, WorkerView};
use crate::store::session::{NewEvent, NewTask, StoredTask};
use drover_protocol::task::OnDisconnect;
use drover_protocol::task::{ExitClass, TaskInfo, TaskSpec, TaskState};
use drover_protocol::{Assignment, AttemptEvent, AttemptKind, Capacity};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// `lost_after` for a `keep_running` spec that does not set it, until the worker's `started`
/// event says which value it applied (the worker's default is the same unless configured).
pub const DEFAULT_LOST_AFTER_MS: u64 = 300_000;

/// How a worker went away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerGone {
    /// Its lease ran out (crash, partition, coordinator restart without a reconnect).
    Lost,
    /// It said goodbye: it stops its attempts itself.
    Down,
}

/// What the runtime must do after an input.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskAction {
    /// Record a new task (before its `submitted` event).
    PutTask(NewTask),
    /// Append these events, in order.
    Append(Vec<NewEvent>),
    /// Send this assignment to `worker` once the preceding appends are durable.
    Assign {
        worker: String,
        assignment: Box<Assignment>,
    },
    /// Tell `worker` to stop this attempt.
    Cancel {
        worker: String,
        task_id: String,
        epoch: u64,
    },
}

/// The answer to a worker event.
#[derive(Debug, Clone, PartialEq)]
pub enum EventVerdict {
    /// New: append these events (the worker's, maybe followed by coordinator decisions), then
    /// acknowledge `seq` once they are durable.
    Accept { seq: u64, actions: Vec<TaskAction> },
    /// Already stored: acknowledge again, write nothing.
    Duplicate { seq: u64 },
    /// Not the current attempt (or out of order): refuse, and the worker stops the attempt.
    Fenced { reason: String },
}

#[derive(Debug, Clone)]
struct Task {
    id: String,
    spec: TaskSpec,
    submit_seq: u64,
    submitted_ms: u64,
    state: TaskState,
    epoch: u64,
    attempts: u32,
    worker: Option<String>,
    next_pos: u64,
    /// Next expected worker seq in the current epoch.
    next_seq: u64,
    exit: Option<ExitClass>,
    reason: Option<String>,
    finished_ms: Option<u64>,
    /// A queued retry waits until then.
    not_before_ms: u64,
    /// (pos, epoch, seq) of the last checkpoint event.
    checkpoint_at: Option<(u64, u64, u64)>,
    /// Attempts that do not count against `max_attempts` (rescheduled off a drained worker).
    uncounted: u32,
    /// Memory limit and reservation grown after OOMs (`None`: as the spec says).
    memory_bytes: Option<u64>,
    /// Why a queued task waits for a worker (from placement), shown after any retry reason.
    wait: Option<String>,
    cancel_requested: bool,
    checkpoint: Option<String>,
    /// The current attempt is `keep_running` with this `lost_after`, ms.
    keep_running: Option<u64>,
    /// Since when the current attempt's worker is lost (in memory only).
    detached_since: Option<u64>,
    /// The acceptance loop and verdict, from the session.
    progress: Progress,
    /// What the [`Index`] holds for this task (see [`Tasks::refile`]).
    filed: Option<Filed>,
    /// The current attempt was assigned ahead of its worker's free capacity and the worker has
    /// not started it yet (no `started` event): the worker holds it until it has room.
    ahead: bool,
}

impl Task {
    /// What one attempt reserves: the spec's requirements with any grown memory.
    fn requirements(&self) -> drover_protocol::task::Requirements {
        let mut r = self.spec.requirements.clone();
        if let Some(m) = self.memory_bytes {
            r.memory_bytes = m;
        }
        r
    }

    /// Attempts that count against `max_attempts`.
    fn counted(&self) -> u32 {
        self.attempts.saturating_sub(self.uncounted)
    }

    fn new(id: String, spec: TaskSpec, submit_seq: u64, submitted_ms: u64) -> Self {
        Task {
            id,
            spec,
            submit_seq,
            submitted_ms,
            state: TaskState::Queued,
            epoch: 0,
            attempts: 0,
            worker: None,
            next_pos: 0,
            next_seq: 0,
            exit: None,
            reason: None,
            finished_ms: None,
            not_before_ms: 0,
            checkpoint_at: None,
            uncounted: 0,
            memory_bytes: None,
            wait: None,
            cancel_requested: false,
            checkpoint: None,
            keep_running: None,
            detached_since: None,
            progress: Progress::default(),
            filed: None,
            ahead: false,
        }
    }

    /// What the index files this task by.
    fn facts(&self) -> Facts<'_> {
        Facts {
            id: &self.id,
            submit_seq: self.submit_seq,
            submitted_ms: self.submitted_ms,
            priority: self.spec.priority,
            queued: self.state == TaskState::Queued,
            running_on: if self.state == TaskState::Running {
                self.worker.as_deref()
            } else {
                None
            },
            in_verdict: self.in_verdict(),
            ahead: self.ahead && self.state == TaskState::Running,
            not_before_ms: self.not_before_ms,
            requirements: self.requirements(),
        }
    }

    /// Whether the task waits for (or runs) its verdict rather than its work.
    fn in_verdict(&self) -> bool {
        self.progress.verdict.is_some()
    }
}

/// Every task the coordinator knows.
#[derive(Debug, Default)]
pub struct Tasks {
    tasks: HashMap<String, Task>,
    /// Ids in submission order.
    order: Vec<String>,
    next_submit_seq: u64,
    /// Running tasks whose `keep_running` attempt is detached from its lost worker.
    detached: BTreeSet<String>,
    /// Queued and running tasks, kept in step by [`Tasks::refile`].
    index: Index,
    /// Whether a worker may be given one task beyond its free capacity (see [`Tasks::schedule`]).
    assign_ahead: bool,
}

fn event(task: &mut Task, now: u64, seq: Option<u64>, kind: &str, payload: String) -> NewEvent {
    let e = NewEvent {
        task_id: task.id.clone(),
        pos: task.next_pos,
        epoch: task.epoch,
        seq,
        ts_ms: now,
        kind: kind.to_owned(),
        payload,
    };
    task.next_pos += 1;
    e
}

/// `{"exited":3}` → "exited with code 3", for reasons shown to operators.
pub fn describe_exit(class: ExitClass) -> String {
    match class {
        ExitClass::Exited(c) => format!("exited with code {c}"),
        ExitClass::Signaled(s) => format!("killed by signal {s}"),
        ExitClass::OomKilled => "killed for memory (OOM)".into(),
        ExitClass::TimedOut => "timed out (wall-time limit)".into(),
        ExitClass::Cancelled => "cancelled".into(),
    }
}

impl Tasks {
    /// Rebuild from stored sessions by replaying their coordinator events.
    pub fn restore(stored: Vec<StoredTask>) -> Self {
        let mut tasks = Tasks::default();
        for st in stored {
            let spec: TaskSpec = match serde_json::from_str(&st.task.spec_json) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(task = %st.task.id, error = %e, "stored spec does not parse; task skipped");
                    continue;
                }
            };
            let mut t = Task::new(
                st.task.id.clone(),
                spec,
                st.task.submit_seq,
                st.task.submitted_ms,
            );
            for e in &st.events {
                replay(&mut t, e);
            }
            tasks.next_submit_seq = tasks.next_submit_seq.max(t.submit_seq);
            tasks.order.push(t.id.clone());
            tasks.tasks.insert(t.id.clone(), t);
        }
        for id in tasks.order.clone() {
            tasks.refile(&id);
        }
        tasks
    }

    /// File `id` in the index as its state now says (the lifecycle calls this for every task
    /// an input may have moved between queued, running and final).
    fn refile(&mut self, id: &str) {
        let Some(t) = self.tasks.get_mut(id) else {
            return;
        };
        let new = Filed::of(t.facts());
        if new == t.filed {
            return;
        }
        if let Some(old) = t.filed.take() {
            self.index.remove(&old);
        }
        if let Some(new) = &new {
            self.index.insert(&t.id, new);
        }
        t.filed = new;
    }

    /// Accept a (validated) spec. Returns the new id and what to persist.
    pub fn submit(&mut self, now: u64, spec: TaskSpec) -> (String, Vec<TaskAction>) {
        self.next_submit_seq += 1;
        let id = format!("t{}", self.next_submit_seq);
        let spec_json = serde_json::to_string(&spec).unwrap_or_else(|_| "{}".into());
        let mut t = Task::new(id.clone(), spec, self.next_submit_seq, now);
        let put = NewTask {
            id: id.clone(),
            submit_seq: t.submit_seq,
            name: t.spec.name.clone(),
            spec_json,
            submitted_ms: now,
        };
        let payload = json!({ "name": t.spec.name }).to_string();
        let submitted = event(&mut t, now, None, "submitted", payload);
        self.order.push(id.clone());
        self.tasks.insert(id.clone(), t);
        self.refile(&id);
        (
            id,
            vec![
                TaskAction::PutTask(put),
                TaskAction::Append(vec![submitted]),
            ],
        )
    }

    /// Let each worker take one task beyond its free capacity, which it holds and starts the
    /// moment its own capacity frees (`assign_ahead` in the coordinator's config). Only for
    /// workers that hold assignments that do not fit (this release's do); off by default.
    pub fn set_assign_ahead(&mut self, on: bool) {
        self.assign_ahead = on;
    }

    /// Whether `id` runs on a worker that holds it unstarted (assigned ahead): its `started`
    /// lets that worker take another.
    pub fn is_held(&self, id: &str) -> bool {
        self.tasks
            .get(id)
            .is_some_and(|t| t.ahead && t.state == TaskState::Running)
    }

    /// What running attempts reserve on each worker.
    pub fn reserved(&self) -> HashMap<String, Capacity> {
        self.index.reserved()
    }

    /// Whether any queued task may be placed at `now` (so callers can skip building worker
    /// views, which costs O(fleet) and must not run on every heartbeat or disconnect).
    pub fn has_placeable(&self, now: u64) -> bool {
        self.index.any_due(now)
    }

    /// Place every queued task that fits; each placement is a new epoch. With
    /// [`Tasks::set_assign_ahead`], a ready worker that holds no unstarted task assigned ahead
    /// may take one more that does not fit its free capacity now (but its totals): its
    /// `assigned` event says `"ahead": true`, it reserves like any running attempt (so nothing
    /// more is placed there), and the worker starts it once it has room — its `started`
    /// event ends the hold. Epochs, fencing, cancel, drain and loss treat it as running.
    pub fn schedule(&mut self, now: u64, workers: &[WorkerView]) -> Vec<TaskAction> {
        let mut workers = workers.to_vec();
        let mut actions = self.schedule_verdicts(now, &mut workers);
        let workers = &workers[..];
        // The queue as the index keeps it: by class, each in placement order; tasks waiting
        // out a retry backoff are skipped without blocking their class.
        let classes = self
            .index
            .work
            .iter()
            .map(|(class, keys)| {
                let due = keys
                    .iter()
                    .filter(move |(_, not_before)| **not_before <= now)
                    .map(|(key, _)| (key, key.id.clone()));
                (&class.0, due)
            })
            .collect();
        let mut ahead: Vec<bool> = workers
            .iter()
            .map(|w| self.assign_ahead && self.index.ahead_on(&w.name) == 0)
            .collect();
        for picked in pick_grouped(classes, workers, &mut ahead) {
            let (id, worker) = (picked.id, picked.worker);
            let Some(t) = self.tasks.get_mut(&id) else {
                continue;
            };
            t.epoch += 1;
            t.attempts += 1;
            t.next_seq = 0;
            t.state = TaskState::Running;
            t.worker = Some(worker.clone());
            t.ahead = picked.ahead;
            t.reason = t.ahead.then(|| ahead_reason(&worker));
            t.keep_running = spec_keep_running(&t.spec);
            t.detached_since = None;
            let (iteration, feedback) = t.progress.resume_point(&t.spec);
            let mut payload = json!({ "epoch": t.epoch, "attempt": t.attempts, "worker": worker });
            if iteration > 1 {
                payload["iteration"] = json!(iteration);
            }
            if t.ahead {
                payload["ahead"] = json!(true);
            }
            let assigned = event(t, now, None, "assigned", payload.to_string());
            let assigned = oom::note_memory(assigned, t.memory_bytes);
            actions.push(TaskAction::Append(vec![assigned]));
            actions.push(TaskAction::Assign {
                worker,
                assignment: Box::new(Assignment {
                    task_id: t.id.clone(),
                    epoch: t.epoch,
                    attempt: t.attempts,
                    spec: oom::with_memory(&t.spec, t.memory_bytes),
                    checkpoint: t.checkpoint.clone(),
                    kind: AttemptKind::Work,
                    iteration,
                    feedback,
                    // Filled by the runtime when it sends the assignment (the values are
                    // not this state machine's to hold).
                    secrets: Vec::new(),
                }),
            });
            self.refile(&id);
        }
        actions
    }

    /// Place queued verdicts, one at a time, each on a worker other than the one whose work
    /// it checks when one fits (else on any that fits); `workers`' reservations are updated so
    /// the work placed after them does not over-commit.
    fn schedule_verdicts(&mut self, now: u64, workers: &mut [WorkerView]) -> Vec<TaskAction> {
        let mut actions = Vec::new();
        let queued: Vec<String> = self.index.verdicts.values().cloned().collect();
        for id in &queued {
            let Some(t) = self.tasks.get_mut(id) else {
                continue;
            };
            if t.state != TaskState::Queued || t.not_before_ms > now || !t.in_verdict() {
                continue;
            }
            let q = [QueuedTask {
                id: t.id.clone(),
                priority: t.spec.priority,
                submitted_ms: t.submitted_ms,
                requirements: t.requirements(),
            }];
            let work_worker = t
                .progress
                .verdict
                .as_ref()
                .and_then(|d| d.work_worker.clone());
            let others: Vec<WorkerView> = workers
                .iter()
                .filter(|w| Some(&w.name) != work_worker.as_ref())
                .cloned()
                .collect();
            let picked = pick_next(&q, &others)
                .into_iter()
                .next()
                .or_else(|| pick_next(&q, workers).into_iter().next());
            let Some((_, worker)) = picked else {
                continue;
            };
            if let Some(w) = workers.iter_mut().find(|w| w.name == worker) {
                let d = super::placement::demand(&q[0].requirements);
                w.reserved.cpus += d.cpus;
                w.reserved.memory_bytes += d.memory_bytes;
                w.reserved.gpus += d.gpus;
            }
            t.epoch += 1;
            t.next_seq = 0;
            t.state = TaskState::Running;
            t.worker = Some(worker.clone());
            t.ahead = false;
            t.reason = None;
            t.keep_running = spec_keep_running(&t.spec);
            t.detached_since = None;
            t.progress.verdict_assigned(t.epoch, Some(worker.clone()));
            let outputs_epoch = t.progress.verdict.as_ref().and_then(|d| d.outputs_epoch);
            let payload = json!({
                "epoch": t.epoch, "attempt": t.attempts, "worker": worker, "kind": "verdict",
                "outputs_epoch": outputs_epoch, "work_worker": work_worker,
            });
            let assigned = event(t, now, None, "assigned", payload.to_string());
            actions.push(TaskAction::Append(vec![assigned]));
            actions.push(TaskAction::Assign {
                worker,
                assignment: Box::new(Assignment {
                    task_id: t.id.clone(),
                    epoch: t.epoch,
                    attempt: t.attempts,
                    spec: oom::with_memory(&t.spec, t.memory_bytes),
                    checkpoint: None,
                    kind: AttemptKind::Verdict { outputs_epoch },
                    iteration: 0,
                    feedback: None,
                    secrets: Vec::new(),
                }),
            });
            self.refile(id);
        }
        actions
    }

    /// An event from `worker` for (task, epoch).
    pub fn handle_event(
        &mut self,
        now: u64,
        worker: &str,
        task_id: &str,
        epoch: u64,
        ev: AttemptEvent,
    ) -> EventVerdict {
        let Some(t) = self.tasks.get_mut(task_id) else {
            return EventVerdict::Fenced {
                reason: format!("no task {task_id}"),
            };
        };
        let same_attempt = epoch == t.epoch && t.worker.as_deref() == Some(worker);
        if same_attempt && ev.seq < t.next_seq {
            // Stored already, maybe just before the task ended (a resend after a reconnect
            // whose ack was lost): acknowledge again.
            return EventVerdict::Duplicate { seq: ev.seq };
        }
        if !same_attempt || t.state != TaskState::Running {
            return EventVerdict::Fenced {
                reason: format!(
                    "attempt {task_id}/{epoch} on {worker} is not current (current epoch {} on {}, {})",
                    t.epoch,
                    t.worker.as_deref().unwrap_or("-"),
                    t.state
                ),
            };
        }
        if ev.seq < t.next_seq {
            return EventVerdict::Duplicate { seq: ev.seq };
        }
        if ev.seq > t.next_seq {
            return EventVerdict::Fenced {
                reason: format!(
                    "event seq {} skips ahead of {} for {task_id}/{epoch}",
                    ev.seq, t.next_seq
                ),
            };
        }
        t.next_seq += 1;
        let seq = ev.seq;
        let pos = t.next_pos;
        t.next_pos += 1;
        t.progress.apply_worker_event(epoch, &ev.kind, &ev.payload);
        let (exited, started) = (ev.kind == "exited", ev.kind == "started");
        if ev.kind == "checkpoint" {
            t.checkpoint_at = Some((pos, epoch, seq));
            t.checkpoint = Some(ev.payload.clone());
        }
        let held = started && t.ahead;
        if started {
            if let Some(policy) = started_policy(&ev.payload) {
                t.keep_running = policy;
            }
            if t.ahead {
                // The worker had room and started it: no longer held.
                t.ahead = false;
                t.reason = None;
            }
        }
        let mut after = Vec::new();
        if exited {
            let class = serde_json::from_str::<serde_json::Value>(&ev.payload)
                .ok()
                .and_then(|v| serde_json::from_value::<ExitClass>(v.get("class")?.clone()).ok())
                .unwrap_or(ExitClass::Exited(-1));
            t.exit = Some(class);
            after = attempt_over(t, now, exit_outcome(t, class, &ev.payload));
        }
        if started {
            after.extend(resumed(t, now, &ev.payload));
        }
        // The worker's event first (its position was taken above), moved rather than copied:
        // this is the hot path of event ingestion.
        let mut events = Vec::with_capacity(1 + after.len());
        events.push(NewEvent {
            task_id: t.id.clone(),
            pos,
            epoch,
            seq: Some(seq),
            ts_ms: ev.ts_ms,
            kind: ev.kind,
            payload: ev.payload,
        });
        events.extend(after);
        // Only the end of an attempt moves a task out of `running`, and only `started` ends a
        // hold.
        if exited || held {
            self.refile(task_id);
        }
        EventVerdict::Accept {
            seq,
            actions: vec![TaskAction::Append(events)],
        }
    }

    /// `worker` went away. Its `kill` attempts are over (retried under their policy); with
    /// [`WorkerGone::Lost`] its `keep_running` attempts are detached until it comes back or
    /// their `lost_after` passes.
    pub fn handle_worker_gone(
        &mut self,
        now: u64,
        worker: &str,
        how: WorkerGone,
    ) -> Vec<TaskAction> {
        let mut actions = Vec::new();
        let running = self.index.running_on(worker);
        for id in &running {
            let Some(t) = self.tasks.get_mut(id) else {
                continue;
            };
            if t.state != TaskState::Running || t.worker.as_deref() != Some(worker) {
                continue;
            }
            if let (WorkerGone::Lost, Some(lost_after)) = (how, t.keep_running) {
                if t.detached_since.is_none() {
                    t.detached_since = Some(now);
                    t.reason = Some(format!(
                        "worker {worker} is lost; its keep_running attempt is kept for up to \
                         {lost_after} ms for the worker to come back"
                    ));
                    self.detached.insert(t.id.clone());
                }
                continue;
            }
            actions.push(TaskAction::Append(end_attempt(
                t,
                now,
                worker,
                "worker_lost",
            )));
            self.detached.remove(id);
            self.refile(id);
        }
        actions
    }

    /// `worker` runs `running`: attempts it had that it does not list are over, and listed
    /// attempts that are no longer current are to be killed. On the first report of a
    /// connection (`registration`) the current ones are reattached (same epoch; their spooled
    /// events follow on their streams); a later report (an attempt lost its spool) only ends
    /// what is missing.
    pub fn handle_worker_attempts(
        &mut self,
        now: u64,
        worker: &str,
        running: &[(String, u64)],
        registration: bool,
    ) -> Vec<TaskAction> {
        let mut actions = Vec::new();
        let on_worker = self.index.running_on(worker);
        for id in &on_worker {
            let Some(t) = self.tasks.get_mut(id) else {
                continue;
            };
            if t.state != TaskState::Running || t.worker.as_deref() != Some(worker) {
                continue;
            }
            if running.iter().any(|(tid, e)| tid == &t.id && *e == t.epoch) {
                continue;
            }
            // At registration: it restarted or dropped the attempt with the old connection.
            // Later: the attempt ended on the worker without delivering its events.
            let why = if registration {
                "worker_restarted"
            } else {
                "attempt_lost_on_worker"
            };
            actions.push(TaskAction::Append(end_attempt(t, now, worker, why)));
            self.detached.remove(id);
            self.refile(id);
        }
        for (task_id, epoch) in running {
            let current = self.tasks.get_mut(task_id).filter(|t| {
                t.state == TaskState::Running
                    && t.epoch == *epoch
                    && t.worker.as_deref() == Some(worker)
            });
            let Some(t) = current else {
                // Fencing: superseded (or finished) while the worker was away.
                tracing::warn!(%worker, task = %task_id, epoch, "worker reported a stale attempt; telling it to kill it");
                actions.push(TaskAction::Cancel {
                    worker: worker.to_owned(),
                    task_id: task_id.clone(),
                    epoch: *epoch,
                });
                continue;
            };
            if !registration && t.detached_since.is_none() {
                continue;
            }
            let detached_ms = t
                .detached_since
                .take()
                .map(|since| now.saturating_sub(since));
            self.detached.remove(task_id);
            t.reason = None;
            let payload = json!({ "epoch": t.epoch, "worker": worker, "detached_ms": detached_ms });
            actions.push(TaskAction::Append(vec![event(
                t,
                now,
                None,
                "attempt_reattached",
                payload.to_string(),
            )]));
            if t.cancel_requested {
                // The cancel may have been sent while the worker was away.
                actions.push(TaskAction::Cancel {
                    worker: worker.to_owned(),
                    task_id: task_id.clone(),
                    epoch: *epoch,
                });
            }
        }
        actions
    }

    /// `worker` was lost but its connection survived (a stall: SIGSTOP, a long GC-like pause)
    /// and it heartbeats again: its detached attempts never lost their streams, so they are
    /// reattached as they are.
    pub fn handle_worker_revived(&mut self, now: u64, worker: &str) -> Vec<TaskAction> {
        let ids: Vec<String> = self.detached.iter().cloned().collect();
        let mut actions = Vec::new();
        for id in ids {
            let Some(t) = self.tasks.get_mut(&id) else {
                continue;
            };
            if t.worker.as_deref() != Some(worker) || t.state != TaskState::Running {
                continue;
            }
            let detached_ms = t
                .detached_since
                .take()
                .map(|since| now.saturating_sub(since));
            self.detached.remove(&id);
            t.reason = None;
            let payload = json!({ "epoch": t.epoch, "worker": worker, "detached_ms": detached_ms });
            actions.push(TaskAction::Append(vec![event(
                t,
                now,
                None,
                "attempt_reattached",
                payload.to_string(),
            )]));
        }
        actions
    }

    /// Time passes: detached `keep_running` attempts past their `lost_after` are over (the
    /// worker has stopped them itself by then) and are retried under a new epoch.
    pub fn tick(&mut self, now: u64) -> Vec<TaskAction> {
        let mut actions = Vec::new();
        let detached: Vec<String> = self.detached.iter().cloned().collect();
        for id in detached {
            let Some(t) = self.tasks.get_mut(&id) else {
                self.detached.remove(&id);
                continue;
            };
            let (Some(since), Some(lost_after), TaskState::Running) =
                (t.detached_since, t.keep_running, t.state)
            else {
                // Ended meanwhile (its last events arrived before the worker's report).
                t.detached_since = None;
                self.detached.remove(&id);
                continue;
            };
            if now < since.saturating_add(lost_after) {
                continue;
            }
            let worker = t.worker.clone().unwrap_or_default();
            t.detached_since = None;
            self.detached.remove(&id);
            actions.push(TaskAction::Append(end_attempt(
                t,
                now,
                &worker,
                "worker_lost",
            )));
            self.refile(&id);
        }
        actions
    }

    /// Whether any attempt is detached (so a caller can skip [`Self::tick`]).
    pub fn has_detached(&self) -> bool {
        !self.detached.is_empty()
    }

    /// Cancel a task: at once if queued; a running one is told to stop and ends `cancelled`
    /// when its worker reports the exit (or is lost).
    pub fn cancel(&mut self, now: u64, id: &str) -> Option<(bool, Vec<TaskAction>)> {
        let t = self.tasks.get_mut(id)?;
        if t.state.is_final() {
            return Some((true, Vec::new()));
        }
        if t.cancel_requested {
            return Some((false, Vec::new()));
        }
        t.cancel_requested = true;
        let mut events = vec![event(t, now, None, "cancel_requested", "{}".into())];
        let mut actions = Vec::new();
        match t.state {
            TaskState::Queued => events.extend(attempt_over(t, now, Outcome::Cancelled)),
            _ => {
                if let Some(w) = &t.worker {
                    actions.push(TaskAction::Cancel {
                        worker: w.clone(),
                        task_id: t.id.clone(),
                        epoch: t.epoch,
                    });
                }
            }
        }
        actions.insert(0, TaskAction::Append(events));
        self.refile(id);
        Some((false, actions))
    }

    /// The operator's view; `events` is the session length.
    pub fn info(&self, id: &str) -> Option<TaskInfo> {
        self.tasks.get(id).map(to_info)
    }

    /// Tasks in submission order, optionally in one state.
    pub fn list(&self, state: Option<TaskState>) -> Vec<TaskInfo> {
        self.order
            .iter()
            .filter_map(|id| self.tasks.get(id))
            .filter(|t| state.is_none_or(|s| t.state == s))
            .map(to_info)
            .collect()
    }

    /// Set the operator-facing wait reason of queued tasks (from placement).
    pub fn set_wait_reasons(&mut self, workers: &[WorkerView]) {
        for t in self
            .tasks
            .values_mut()
            .filter(|t| t.state == TaskState::Queued)
        {
            t.wait = Some(super::wait::WaitReason::new(&t.requirements(), workers).to_string());
        }
    }

    /// Counts by state.
    pub fn counts(&self) -> BTreeMap<TaskState, u32> {
        let mut m = BTreeMap::new();
        for t in self.tasks.values() {
            *m.entry(t.state).or_insert(0) += 1;
        }
        m
    }

    /// The drain deadline of `worker` passed: end each attempt still running there
    /// (`attempt_ended {drained}`), tell the worker to stop it, and queue the task again at once
    /// without counting the attempt against `max_attempts`.
    pub fn handle_drain_deadline(&mut self, now: u64, worker: &str) -> Vec<TaskAction> {
        let mut actions = Vec::new();
        let running = self.index.running_on(worker);
        for id in &running {
            let Some(t) = self.tasks.get_mut(id) else {
                continue;
            };
            if t.state != TaskState::Running || t.worker.as_deref() != Some(worker) {
                continue;
            }
            let epoch = t.epoch;
            let mut events = vec![event(
                t,
                now,
                None,
                "attempt_ended",
                json!({ "epoch": epoch, "worker": worker, "reason": "drained" }).to_string(),
            )];
            let outcome = if t.cancel_requested {
                Outcome::Cancelled
            } else {
                Outcome::Drained(format!("was stopped: its worker {worker} was drained"))
            };
            events.extend(attempt_over(t, now, outcome));
            actions.push(TaskAction::Append(events));
            actions.push(TaskAction::Cancel {
                worker: worker.to_owned(),
                task_id: t.id.clone(),
                epoch,
            });
            self.refile(id);
        }
        actions
    }

    /// Ids of tasks with an attempt running on `worker`, in submission order.
    pub fn running_on(&self, worker: &str) -> Vec<String> {
        self.index.running_on(worker)
    }

    /// Queued tasks whose last attempt ended without success, in submission order.
    pub fn retrying(&self) -> Vec<drover_protocol::RetryingTask> {
        self.order
            .iter()
            .filter_map(|id| self.tasks.get(id))
            .filter(|t| t.state == TaskState::Queued && t.attempts > 0)
            // A verdict waiting for its first worker is not a retry.
            .filter(|t| t.progress.verdict.as_ref().is_none_or(|d| d.tries > 0))
            .map(|t| drover_protocol::RetryingTask {
                id: t.id.clone(),
                name: t.spec.name.clone(),
                attempts: t.attempts,
                max_attempts: t.spec.retry.max_attempts.saturating_add(t.uncounted),
                reason: t.reason.clone().unwrap_or_default(),
                not_before_ms: t.not_before_ms,
            })
            .collect()
    }

    /// Check the invariants in the module doc; panics with the broken one.
    pub fn sanity_check(&self) {
        for t in self.tasks.values() {
            if t.state == TaskState::Running {
                assert!(
                    t.worker.is_some() && t.epoch > 0,
                    "{}: running without an attempt",
                    t.id
                );
            }
            let verdicts = t.progress.verdict.as_ref().map_or(0, |d| d.tries);
            assert!(
                u64::from(t.attempts) + u64::from(verdicts) == t.epoch,
                "{}: work and verdict attempts do not add up to the epochs",
                t.id
            );
            if t.detached_since.is_some() && t.state == TaskState::Running {
                assert!(
                    t.keep_running.is_some() && self.detached.contains(&t.id),
                    "{}: detached but not keep_running or not tracked",
                    t.id
                );
            }
        }
        for id in &self.detached {
            assert!(self.tasks.contains_key(id), "{id}: detached but unknown");
        }
        let mut rebuilt = Index::default();
        for t in self.tasks.values() {
            let filed = Filed::of(t.facts());
            assert_eq!(
                filed, t.filed,
                "{}: filed as its state was, not as it is",
                t.id
            );
            if let Some(f) = &filed {
                rebuilt.insert(&t.id, f);
            }
        }
        assert!(
            rebuilt == self.index,
            "the task index is out of step with the tasks"
        );
        for worker in self.index.workers_holding() {
            assert!(
                self.index.ahead_on(worker) <= 1,
                "{worker} holds more than one task assigned ahead"
            );
        }
    }
}

/// The `attempt_ended` event of the current attempt and what follows under the task's policy.
fn end_attempt(t: &mut Task, now: u64, worker: &str, why: &str) -> Vec<NewEvent> {
    t.detached_since = None;
    let mut events = vec![event(
        t,
        now,
        None,
        "attempt_ended",
        json!({ "epoch": t.epoch, "worker": worker, "reason": why }).to_string(),
    )];
    let outcome = if t.cancel_requested {
        Outcome::Cancelled
    } else {
        Outcome::Retry(why.to_owned())
    };
    events.extend(attempt_over(t, now, outcome));
    events
}

/// What a running task held by its worker shows as its reason.
fn ahead_reason(worker: &str) -> String {
    format!("assigned ahead to {worker}; it starts there as soon as {worker} has room")
}

/// The `keep_running` bound a spec asks for, if it does.
fn spec_keep_running(spec: &TaskSpec) -> Option<u64> {
    (spec.on_disconnect == Some(OnDisconnect::KeepRunning))
        .then(|| spec.lost_after_ms.unwrap_or(DEFAULT_LOST_AFTER_MS))
}

/// The policy a worker applied, from its `started` payload: `Some(None)` for `kill`,
/// `Some(Some(lost_after_ms))` for `keep_running`, `None` if the payload does not say (an
/// older worker).
fn started_policy(payload: &str) -> Option<Option<u64>> {
    let v: serde_json::Value = serde_json::from_str(payload).ok()?;
    let on: OnDisconnect = serde_json::from_value(v.get("on_disconnect")?.clone()).ok()?;
    Some(match on {
        OnDisconnect::Kill => None,
        OnDisconnect::KeepRunning => Some(
            v.get("lost_after_ms")
                .and_then(|n| n.as_u64())
                .unwrap_or(DEFAULT_LOST_AFTER_MS),
        ),
    })
}

/// How an attempt's end affects its task.
enum Outcome {
    Succeeded,
    Cancelled,
    Retry(String),
    /// Retry (if attempts are left) with the memory grown to this, bytes.
    RetryWithMemory(String, u64),
    /// Fail now, whatever attempts are left (`retry.on_oom = "fail"`, the memory ceiling).
    Fail(String),
    /// Retry at once, not counted against `max_attempts`.
    Drained(String),
    /// End the task in this final state, with this reason (acceptance and verdict results).
    Final(TaskState, Option<String>),
    /// The criteria passed on the worker: queue the verdict.
    Verdict,
}

fn class_outcome(class: ExitClass, cancel_requested: bool) -> Outcome {
    match class {
        _ if cancel_requested => Outcome::Cancelled,
        ExitClass::Exited(0) => Outcome::Succeeded,
        ExitClass::Cancelled => Outcome::Cancelled,
        other => Outcome::Retry(describe_exit(other)),
    }
}

/// How an `exited` event ends the attempt: as [`class_outcome`] says, except that an OOM kill
/// follows `retry.on_oom`.
fn exit_outcome(t: &Task, class: ExitClass, payload: &str) -> Outcome {
    if t.cancel_requested {
        return Outcome::Cancelled;
    }
    if t.progress.is_verdict_epoch(t.epoch) {
        return match acceptance::verdict_outcome(&t.spec, &t.progress, class) {
            Ok((state, reason)) => Outcome::Final(state, reason),
            Err(why) => Outcome::Retry(why),
        };
    }
    if class.is_success() {
        return match acceptance::work_outcome(&t.spec, &t.progress) {
            WorkOutcome::Succeeded => Outcome::Succeeded,
            WorkOutcome::Satisfied => Outcome::Final(TaskState::Satisfied, None),
            WorkOutcome::Verdict => Outcome::Verdict,
            WorkOutcome::MaxIterations(why) => Outcome::Final(TaskState::Failed, Some(why)),
            WorkOutcome::Incomplete(why) => Outcome::Retry(why),
        };
    }
    match class_outcome(class, t.cancel_requested) {
        Outcome::Retry(_) if class == ExitClass::OomKilled => {
            let payload = serde_json::from_str(payload).unwrap_or_default();
            let report = OomReport::from_exited(&payload);
            match oom::decide(&t.spec.retry, &t.spec, t.memory_bytes, report) {
                OomDecision::Fail(why) => Outcome::Fail(why),
                OomDecision::Retry {
                    memory_bytes: Some(m),
                    why,
                } => Outcome::RetryWithMemory(why, m),
                OomDecision::Retry {
                    memory_bytes: None,
                    why,
                } => Outcome::Retry(why),
            }
        }
        other => other,
    }
}

/// After a new attempt's `started`: a `resumed` event naming the checkpoint it was given, if
/// the worker says it got one.
fn resumed(t: &mut Task, now: u64, started: &str) -> Option<NewEvent> {
    let (pos, epoch, seq) = t.checkpoint_at?;
    let payload: serde_json::Value = serde_json::from_str(started).ok()?;
    if epoch >= t.epoch || payload.get("resumed_from_checkpoint")?.as_bool() != Some(true) {
        return None;
    }
    let body = json!({
        "attempt": t.attempts,
        "checkpoint": { "pos": pos, "epoch": epoch, "seq": seq },
    });
    Some(event(t, now, None, "resumed", body.to_string()))
}

/// Record the end of the current attempt: completion, or a retry under the task's policy.
fn attempt_over(t: &mut Task, now: u64, outcome: Outcome) -> Vec<NewEvent> {
    if t.in_verdict() {
        if let Some(events) = verdict_over(t, now, &outcome) {
            return events;
        }
    }
    let (state, reason) = match outcome {
        Outcome::Succeeded => (TaskState::Succeeded, None),
        Outcome::Final(state, reason) => (state, reason),
        Outcome::Verdict => return request_verdict(t, now),
        Outcome::Cancelled => (
            TaskState::Cancelled,
            Some("cancelled by an operator".to_owned()),
        ),
        Outcome::Drained(why) => {
            t.uncounted += 1;
            return schedule_retry(t, now, why, 0, false);
        }
        Outcome::RetryWithMemory(why, memory) if t.counted() < t.spec.retry.max_attempts => {
            t.memory_bytes = Some(memory);
            return schedule_retry(t, now, why, backoff(t), true);
        }
        Outcome::Retry(why) if t.counted() < t.spec.retry.max_attempts => {
            return schedule_retry(t, now, why, backoff(t), true);
        }
        Outcome::Retry(why) | Outcome::RetryWithMemory(why, _) => (
            TaskState::Failed,
            Some(format!(
                "attempt {} of {} {why}",
                t.counted(),
                t.spec.retry.max_attempts
            )),
        ),
        Outcome::Fail(why) => (
            TaskState::Failed,
            Some(format!("attempt {} {why}", t.attempts)),
        ),
    };
    t.state = state;
    t.reason = reason.clone();
    t.finished_ms = Some(now);
    vec![event(
        t,
        now,
        None,
        "completed",
        json!({ "state": state, "reason": reason }).to_string(),
    )]
}

/// The criteria passed on the worker: record `verdict_requested` and queue the verdict at once.
fn request_verdict(t: &mut Task, now: u64) -> Vec<NewEvent> {
    let work_worker = t.worker.clone();
    // Only what the satisfying attempt stored: an earlier attempt's outputs are not its work.
    let outputs_epoch = t.progress.outputs_epoch.filter(|e| *e == t.epoch);
    t.progress
        .request_verdict(work_worker.clone(), outputs_epoch);
    t.state = TaskState::Queued;
    t.not_before_ms = now;
    t.reason = Some(verdict_wait_reason(work_worker.as_deref()));
    let payload = json!({
        "after_attempt": t.attempts, "iteration": t.progress.iteration,
        "work_worker": work_worker, "outputs_epoch": outputs_epoch,
    });
    vec![event(
        t,
        now,
        None,
        "verdict_requested",
        payload.to_string(),
    )]
}

fn verdict_wait_reason(work_worker: Option<&str>) -> String {
    format!(
        "the criteria passed on {}; waiting for a worker to run the verdict",
        work_worker.unwrap_or("its worker")
    )
}

/// A verdict attempt that ended without a result (its worker lost, the outputs not fetched):
/// run it again while `retry.max_attempts` verdict attempts are not used up, else fail.
/// `None` for outcomes that are not a retry (a result, a cancel).
fn verdict_over(t: &mut Task, now: u64, outcome: &Outcome) -> Option<Vec<NewEvent>> {
    let why = match outcome {
        Outcome::Retry(why)
        | Outcome::RetryWithMemory(why, _)
        | Outcome::Fail(why)
        | Outcome::Drained(why) => why.clone(),
        _ => return None,
    };
    let tries = t.progress.verdict.as_ref().map_or(0, |d| d.tries);
    if tries >= t.spec.retry.max_attempts {
        let reason = format!(
            "the verdict could not run: {tries} verdict attempts ended without a result (last: {why})"
        );
        t.state = TaskState::Failed;
        t.reason = Some(reason.clone());
        t.finished_ms = Some(now);
        let payload = json!({ "state": TaskState::Failed, "reason": reason });
        return Some(vec![event(t, now, None, "completed", payload.to_string())]);
    }
    t.state = TaskState::Queued;
    t.not_before_ms = now + t.spec.retry.backoff_ms;
    t.reason = Some(format!("retrying the verdict after {why}"));
    let payload = json!({
        "after_attempt": t.attempts, "reason": why, "not_before_ms": t.not_before_ms,
        "verdict": true,
    });
    Some(vec![event(
        t,
        now,
        None,
        "retry_scheduled",
        payload.to_string(),
    )])
}

/// The delay before the next counted attempt: the backoff, doubled for each earlier one.
fn backoff(t: &Task) -> u64 {
    t.spec
        .retry
        .backoff_ms
        .saturating_mul(1 << (t.counted().saturating_sub(1)).min(16))
}

/// Queue the task again after `backoff_ms`, recording why (and the memory it will get).
fn schedule_retry(
    t: &mut Task,
    now: u64,
    why: String,
    backoff_ms: u64,
    counted: bool,
) -> Vec<NewEvent> {
    t.state = TaskState::Queued;
    t.not_before_ms = now + backoff_ms;
    t.reason = Some(format!("retrying after attempt {} {why}", t.attempts));
    let mut payload = json!({
        "after_attempt": t.attempts, "reason": why, "not_before_ms": t.not_before_ms
    });
    if let Some(m) = t.memory_bytes {
        payload["memory_bytes"] = json!(m);
    }
    if !counted {
        payload["counted"] = json!(false);
    }
    vec![event(t, now, None, "retry_scheduled", payload.to_string())]
}

/// Apply one stored event to a task being rebuilt.
fn replay(t: &mut Task, e: &NewEvent) {
    t.next_pos = e.pos + 1;
    let payload: serde_json::Value = serde_json::from_str(&e.payload).unwrap_or_default();
    if e.seq.is_some() {
        if e.epoch == t.epoch {
            t.next_seq = e.seq.unwrap_or(0) + 1;
        }
        t.progress.apply_worker_event(e.epoch, &e.kind, &e.payload);
        if e.kind == "checkpoint" {
            t.checkpoint_at = Some((e.pos, e.epoch, e.seq.unwrap_or(0)));
        }
        match e.kind.as_str() {
            "checkpoint" => t.checkpoint = Some(e.payload.clone()),
            "started" if e.epoch == t.epoch => {
                if let Some(policy) = started_policy(&e.payload) {
                    t.keep_running = policy;
                }
                if std::mem::take(&mut t.ahead) {
                    t.reason = None;
                }
            }
            "exited" => {
                t.exit = payload
                    .get("class")
                    .and_then(|c| serde_json::from_value(c.clone()).ok())
            }
            _ => {}
        }
        return;
    }
    match e.kind.as_str() {
        "assigned" => {
            t.epoch = e.epoch;
            t.attempts = payload
                .get("attempt")
                .and_then(|a| a.as_u64())
                .unwrap_or(e.epoch) as u32;
            t.worker = payload
                .get("worker")
                .and_then(|w| w.as_str())
                .map(str::to_owned);
            t.state = TaskState::Running;
            t.next_seq = 0;
            t.ahead = payload.get("ahead").and_then(|a| a.as_bool()) == Some(true);
            t.reason = match (&t.worker, t.ahead) {
                (Some(w), true) => Some(ahead_reason(w)),
                _ => None,
            };
            t.keep_running = spec_keep_running(&t.spec);
            if payload.get("kind").and_then(|k| k.as_str()) == Some("verdict") {
                t.progress.verdict_assigned(e.epoch, t.worker.clone());
            }
        }
        "verdict_requested" => {
            let work_worker = payload
                .get("work_worker")
                .and_then(|w| w.as_str())
                .map(str::to_owned);
            let outputs_epoch = payload.get("outputs_epoch").and_then(|o| o.as_u64());
            t.progress
                .request_verdict(work_worker.clone(), outputs_epoch);
            t.state = TaskState::Queued;
            t.not_before_ms = e.ts_ms;
            t.reason = Some(verdict_wait_reason(work_worker.as_deref()));
        }
        "retry_scheduled" if payload.get("verdict").and_then(|v| v.as_bool()) == Some(true) => {
            t.state = TaskState::Queued;
            t.not_before_ms = payload
                .get("not_before_ms")
                .and_then(|n| n.as_u64())
                .unwrap_or(0);
            let why = payload.get("reason").and_then(|r| r.as_str()).unwrap_or("");
            t.reason = Some(format!("retrying the verdict after {why}"));
        }
        "retry_scheduled" => {
            t.memory_bytes = payload.get("memory_bytes").and_then(|m| m.as_u64());
            if payload.get("counted").and_then(|c| c.as_bool()) == Some(false) {
                t.uncounted += 1;
            }
            t.state = TaskState::Queued;
            t.not_before_ms = payload
                .get("not_before_ms")
                .and_then(|n| n.as_u64())
                .unwrap_or(0);
            // The same words as `attempt_over`, so a restart shows what was shown before.
            let after = payload.get("after_attempt").and_then(|a| a.as_u64());
            t.reason = payload
                .get("reason")
                .and_then(|r| r.as_str())
                .map(|r| match after {
                    Some(n) => format!("retrying after attempt {n} {r}"),
                    None => format!("retrying after {r}"),
                });
        }
        "cancel_requested" => t.cancel_requested = true,
        "completed" => {
            t.state = payload
                .get("state")
                .and_then(|s| serde_json::from_value(s.clone()).ok())
                .unwrap_or(TaskState::Failed);
            t.reason = payload
                .get("reason")
                .and_then(|r| r.as_str())
                .map(str::to_owned);
            t.finished_ms = Some(e.ts_ms);
        }
        _ => {}
    }
}

fn to_info(t: &Task) -> TaskInfo {
    // A queued task shows why it waits for a worker, after why its last attempt ended.
    let reason = match (t.state, &t.reason, &t.wait) {
        (TaskState::Queued, Some(retry), Some(wait)) => Some(format!("{retry}; {wait}")),
        (TaskState::Queued, None, Some(wait)) => Some(wait.clone()),
        _ => t.reason.clone(),
    };
    TaskInfo {
        id: t.id.clone(),
        name: t.spec.name.clone(),
        state: t.state,
        attempts: t.attempts,
        epoch: t.epoch,
        worker: t.worker.clone(),
        submitted_ms: t.submitted_ms,
        finished_ms: t.finished_ms,
        exit: t.exit,
        reason,
        events: t.next_pos,
        spec: t.spec.clone(),
        iteration: t.progress.iteration,
        criteria: t.progress.shown_criteria(),
        verdict: t.progress.verdict_info(t.state),
    }
}

#[cfg(test)]
#[path = "lifecycle_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "lifecycle_ops_tests.rs"]
mod ops_tests;

#[cfg(test)]
#[path = "lifecycle_acceptance_tests.rs"]
mod acceptance_tests;
