//! The coordinator's core task: owns the [`Fleet`] and [`Tasks`] state machines, feeds them
//! connection events, operator requests and timer ticks, and carries out what they return
//! (durable writes, assignments, closing replaced connections). Connection tasks talk to it
//! only through [`CoreHandle`].
//!
//! Ordering rule: anything sent to a peer that depends on a write (a registration ack, the
//! confirm of an attempt whose epoch must be durable before it runs, an event ack, a submitted
//! task's id) travels with the write's [`Durable`] receiver, and the connection task sends it
//! only once that resolves. The core itself never waits for the disk. (An attempt's `Prepare`
//! goes at once: the worker gets it ready meanwhile but runs nothing of it before the confirm.)

use crate::clock::Clock;
use crate::fleet::{Action, ConnId, Fleet, Registration};
use crate::store::blobs::{BlobRef, InputsRow, OutputsRow};
use crate::store::Store;
use crate::tasks::lifecycle::{EventVerdict, TaskAction, Tasks, WorkerGone};
use crate::tasks::{validate_spec, WorkerView};
use drover_protocol::task::{TaskInfo, TaskSpec, TaskState};
use drover_protocol::{
    close_code, AttemptEvent, AttemptKind, CoordinatorMessage, ErrorKind, OperatorRequest,
    OperatorResponse, Usage, WorkerState,
};
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

pub use crate::store::Durable;

/// A message for a worker, to be sent once `after` (if any) is durable. Boxed: every worker's
/// queue keeps a block of 32 slots for its life, and these messages are rare.
#[derive(Debug)]
pub struct Outbound {
    pub msg: Box<CoordinatorMessage>,
    pub after: Option<Durable>,
}

/// The core's answer to a batch of attempt events: an `Ack` of the last accepted or
/// duplicate seq (acks are cumulative), then `Fenced` if an event of the batch was refused
/// (the events after it were not looked at).
#[derive(Debug)]
pub enum AttemptReply {
    /// Acknowledge `seq` once `after` resolves (immediately when `None`).
    Ack {
        seq: u64,
        after: Option<Durable>,
    },
    Fenced(String),
}

#[derive(Debug)]
pub enum CoreMsg {
    Register {
        reg: Registration,
        conn: quinn::Connection,
        outbound: super::outbound::OutboundTx,
        reply: oneshot::Sender<Durable>,
    },
    Attempts {
        conn: ConnId,
        name: String,
        running: Vec<(String, u64)>,
    },
    Heartbeat {
        conn: ConnId,
        usage: Usage,
    },
    /// Events of one attempt stream, in seq order: whatever the stream had read when the
    /// first arrived, so the core takes one step and the store one write per batch.
    AttemptEvents {
        name: String,
        task_id: String,
        epoch: u64,
        events: Vec<AttemptEvent>,
        reply: oneshot::Sender<Vec<AttemptReply>>,
    },
    Disconnect {
        conn: ConnId,
        name: String,
        clean: bool,
    },
    Operator {
        req: OperatorRequest,
        reply: oneshot::Sender<(OperatorResponse, Option<Durable>)>,
    },
    /// A submit whose inputs archive is already durable in the blob store.
    SubmitWithInputs {
        spec: drover_protocol::task::TaskSpec,
        blob: BlobRef,
        reply: oneshot::Sender<(OperatorResponse, Option<Durable>)>,
    },
    /// Is (task, epoch) the current attempt, on this worker? `Ok(attempt number)` or why not.
    CheckAttempt {
        name: String,
        task_id: String,
        epoch: u64,
        reply: oneshot::Sender<Result<u32, String>>,
    },
    /// Record an attempt's (already durable) outputs archive, if it is still current: the
    /// check and the queued write happen in one step, so a newer epoch cannot slip between.
    PutOutputs {
        name: String,
        row: OutputsRow,
        reply: oneshot::Sender<Result<Durable, String>>,
    },
    /// Is there a worker with this name in the registry (enrollment keeps names unique)?
    NameKnown {
        name: String,
        reply: oneshot::Sender<bool>,
    },
    /// Close the worker's live connection, if any (revocation); answers whether there was one.
    CloseWorker {
        name: String,
        code: u32,
        reason: &'static [u8],
        reply: oneshot::Sender<bool>,
    },
}

/// The fencing rule for archive transfers, the same as for events: `Ok(attempt number)` only
/// when (task, epoch) is the task's running attempt and `worker` runs it.
pub fn attempt_is_current(
    task: Option<&TaskInfo>,
    task_id: &str,
    worker: &str,
    epoch: u64,
) -> Result<u32, String> {
    match task {
        None => Err(format!("no task {task_id}")),
        Some(t)
            if t.epoch == epoch
                && t.worker.as_deref() == Some(worker)
                && t.state == TaskState::Running =>
        {
            Ok(t.attempts)
        }
        Some(t) => Err(format!(
            "attempt {task_id}/{epoch} on {worker} is not current (current epoch {} on {}, {})",
            t.epoch,
            t.worker.as_deref().unwrap_or("-"),
            t.state
        )),
    }
}

/// Liveness probes in flight at once. Each holds a blocking-pool thread for up to a heartbeat
/// interval; when more heartbeats than this are late at once, the coordinator itself (or the
/// network) is slow rather than that many workers dead, and the rest wait for the next tick
/// or their lease. Without a bound, a stall at 10,000 workers started 500 threads.
const MAX_PROBES: usize = 64;

/// Cheap, cloneable sender to the core task.
#[derive(Debug, Clone)]
pub struct CoreHandle(mpsc::Sender<CoreMsg>);

impl CoreHandle {
    pub async fn send(&self, msg: CoreMsg) -> bool {
        self.0.send(msg).await.is_ok()
    }
}

/// The software string the coordinator reports.
pub fn software() -> String {
    format!("drover {}", env!("CARGO_PKG_VERSION"))
}

#[derive(Debug)]
struct WorkerLink {
    conn_id: ConnId,
    conn: quinn::Connection,
    outbound: super::outbound::OutboundTx,
    /// Whether this connection has reported its attempts yet (the first report reattaches).
    reported: bool,
}

#[derive(Debug)]
pub struct Core {
    fleet: Fleet,
    tasks: Tasks,
    /// This step's writes, handed to the store as one command at its end (see `store::batch`).
    writes: crate::store::batch::Batch,
    clock: Clock,
    links: HashMap<String, WorkerLink>,
    tick: Duration,
    heartbeat_ms: u64,
    probe: bool,
    /// Checked at submit; their values go into assignments that grant them.
    secrets: crate::secrets::Secrets,
}

impl Core {
    /// `heartbeat_ms` is the interval workers are told to heartbeat at; `probe` whether late
    /// ones get a liveness probe (`CoordinatorConfig::liveness_probe`).
    pub fn new(
        fleet: Fleet,
        tasks: Tasks,
        store: Store,
        clock: Clock,
        heartbeat_ms: u64,
        probe: bool,
        secrets: crate::secrets::Secrets,
    ) -> Self {
        // Check leases several times per lease so `lost` shows within a quarter lease of expiry,
        // and late heartbeats within a quarter interval (see `probe::probe`).
        let tick =
            Duration::from_millis((fleet.lease_ms() / 4).min(heartbeat_ms / 4).clamp(50, 1000));
        Self {
            fleet,
            tasks,
            writes: crate::store::batch::Batch::new(store),
            clock,
            links: HashMap::new(),
            tick,
            heartbeat_ms,
            probe,
            secrets,
        }
    }

    pub fn channel() -> (CoreHandle, mpsc::Receiver<CoreMsg>) {
        let (tx, rx) = mpsc::channel(4096);
        (CoreHandle(tx), rx)
    }

    /// Run until every [`CoreHandle`] is dropped.
    pub async fn run(mut self, mut rx: mpsc::Receiver<CoreMsg>) {
        let mut tick = tokio::time::interval(self.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.recover(self.clock.now_ms());
        self.writes.flush();
        // Liveness probes of workers whose heartbeat is late (owned here, dropped on exit).
        let mut probes: tokio::task::JoinSet<Option<(String, Option<ConnId>, String)>> =
            tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                msg = rx.recv() => match msg {
                    Some(msg) => self.handle(msg),
                    None => break,
                },
                Some(Ok(refused)) = probes.join_next(), if !probes.is_empty() => {
                    if let Some((name, conn, address)) = refused {
                        let now = self.clock.now_ms();
                        tracing::info!(worker = %name, %address, "liveness probe: the worker's port is closed (its process is gone); declaring it lost before its lease ends");
                        let actions = self.fleet.handle_probe_refused(now, conn, &name, &address);
                        self.apply(actions);
                        self.schedule(now);
                    }
                }
                _ = tick.tick() => {
                    let now = self.clock.now_ms();
                    let late_ms = self.heartbeat_ms + self.heartbeat_ms / 2;
                    let late = if self.probe {
                        let room = MAX_PROBES.saturating_sub(probes.len());
                        self.fleet.late(now, late_ms, self.heartbeat_ms, room)
                    } else {
                        Vec::new()
                    };
                    for (name, conn, address) in late {
                        if let Ok(addr) = address.parse::<std::net::SocketAddr>() {
                            let wait = Duration::from_millis(self.heartbeat_ms.clamp(50, 1000));
                            probes.spawn_blocking(move || {
                                super::probe::port_closed(addr, wait)
                                    .then_some((name, conn, address))
                            });
                        }
                    }
                    let actions = self.fleet.tick(now);
                    self.apply(actions);
                    if self.tasks.has_detached() {
                        let actions = self.tasks.tick(now);
                        self.apply_tasks(actions);
                    }
                    self.schedule(now);
                }
            }
            // Whatever this step wrote goes to the store now, as one command.
            self.writes.flush();
        }
        self.writes.flush();
    }

    fn handle(&mut self, msg: CoreMsg) {
        let now = self.clock.now_ms();
        match msg {
            CoreMsg::Register {
                reg,
                conn,
                outbound,
                reply,
            } => {
                let link = WorkerLink {
                    conn_id: reg.conn,
                    conn,
                    outbound,
                    reported: false,
                };
                let old = self.links.insert(reg.name.clone(), link);
                let actions = self.fleet.handle_register(now, reg);
                if let Some(old) = old {
                    let replaced = actions
                        .iter()
                        .any(|a| matches!(a, Action::Close { conn, .. } if *conn == old.conn_id));
                    if replaced {
                        old.conn.close(
                            close_code::REPLACED.into(),
                            b"replaced by a newer connection",
                        );
                    }
                }
                if let Some(durable) = self.apply(actions) {
                    let _ = reply.send(durable);
                }
            }
            CoreMsg::Attempts {
                conn,
                name,
                running,
            } => {
                if let Some(link) = self.links.get_mut(&name).filter(|l| l.conn_id == conn) {
                    let first = !std::mem::replace(&mut link.reported, true);
                    let actions = self
                        .tasks
                        .handle_worker_attempts(now, &name, &running, first);
                    self.apply_tasks(actions);
                    self.schedule(now);
                }
            }
            CoreMsg::Heartbeat { conn, usage } => {
                let actions = self.fleet.handle_heartbeat(now, conn, usage);
                // A persisted change on a heartbeat is a lost worker coming back on the same
                // connection: its kept attempts are still streaming on it.
                let revived = match actions.first() {
                    Some(Action::Persist(r)) => Some(r.name.clone()),
                    _ => None,
                };
                self.apply(actions);
                if let Some(name) = revived.filter(|_| self.tasks.has_detached()) {
                    let actions = self.tasks.handle_worker_revived(now, &name);
                    self.apply_tasks(actions);
                }
            }
            CoreMsg::AttemptEvents {
                name,
                task_id,
                epoch,
                events,
                reply,
            } => {
                let answer = self.attempt_events(now, &name, &task_id, epoch, events);
                let _ = reply.send(answer);
            }
            CoreMsg::Disconnect { conn, name, clean } => {
                if self.links.get(&name).is_some_and(|l| l.conn_id == conn) {
                    self.links.remove(&name);
                }
                let actions = self.fleet.handle_disconnect(now, conn, &name, clean);
                self.apply(actions);
                self.schedule(now);
            }
            CoreMsg::Operator { req, reply } => {
                let answer = self.answer(now, req);
                let _ = reply.send(answer);
            }
            CoreMsg::SubmitWithInputs { spec, blob, reply } => {
                let answer = self.submit(now, spec, Some(blob));
                let _ = reply.send(answer);
            }
            CoreMsg::CheckAttempt {
                name,
                task_id,
                epoch,
                reply,
            } => {
                let _ = reply.send(self.current_attempt(&name, &task_id, epoch));
            }
            CoreMsg::PutOutputs { name, row, reply } => {
                let answer = self
                    .current_attempt(&name, &row.task_id, row.epoch)
                    .map(|_| self.writes.put_outputs(row));
                let _ = reply.send(answer);
            }
            CoreMsg::NameKnown { name, reply } => {
                let _ = reply.send(self.fleet.info(now, &name).is_some());
            }
            CoreMsg::CloseWorker {
                name,
                code,
                reason,
                reply,
            } => {
                let link = self.links.get(&name);
                if let Some(link) = link {
                    tracing::warn!(worker = %name, close_code = code, reason = %String::from_utf8_lossy(reason), "closing the worker's connection");
                    link.conn.close(code.into(), reason);
                }
                let _ = reply.send(link.is_some());
            }
        }
    }

    /// Feed a batch of one attempt's events to the state machine, in order, and queue what
    /// they append as one write.
    fn attempt_events(
        &mut self,
        now: u64,
        name: &str,
        task_id: &str,
        epoch: u64,
        events: Vec<AttemptEvent>,
    ) -> Vec<AttemptReply> {
        let mut actions: Vec<TaskAction> = Vec::new();
        let (mut acked, mut fenced, mut reschedule) = (None, None, false);
        for event in events {
            // The end of an attempt frees capacity (or queues a retry); the start of one its
            // worker held lets that worker hold another.
            let frees =
                event.kind == "exited" || (event.kind == "started" && self.tasks.is_held(task_id));
            match self.tasks.handle_event(now, name, task_id, epoch, event) {
                EventVerdict::Accept { seq, actions: more } => {
                    for action in more {
                        match (actions.last_mut(), action) {
                            (Some(TaskAction::Append(all)), TaskAction::Append(events)) => {
                                all.extend(events)
                            }
                            (_, action) => actions.push(action),
                        }
                    }
                    acked = Some(seq);
                    reschedule |= frees;
                }
                // Already accepted, but maybe not yet durable (the first copy's batch may still
                // be in flight): acked with the batch's write, which is durable only once
                // everything queued before it is.
                EventVerdict::Duplicate { seq } => acked = Some(seq),
                EventVerdict::Fenced { reason } => {
                    tracing::warn!(worker = %name, task = %task_id, epoch, %reason, "refused a stale attempt event");
                    fenced = Some(reason);
                    break;
                }
            }
        }
        let mut answer = Vec::with_capacity(2);
        if let Some(seq) = acked {
            let after = match self.apply_tasks(actions) {
                Some(after) => after,
                None => self.writes.append_events(Vec::new()),
            };
            answer.push(AttemptReply::Ack {
                seq,
                after: Some(after),
            });
        }
        // Other events change nothing placement sees, so they skip the scheduling pass.
        if reschedule {
            self.schedule(now);
        }
        answer.extend(fenced.map(AttemptReply::Fenced));
        answer
    }

    /// `Ok(attempt number)` when (task, epoch) is the running attempt on `worker`; otherwise
    /// the reason, as for a fenced event.
    fn current_attempt(&self, worker: &str, task_id: &str, epoch: u64) -> Result<u32, String> {
        attempt_is_current(self.tasks.info(task_id).as_ref(), task_id, worker, epoch)
    }

    /// Accept a spec; with `inputs`, its archive's row is written in the task's transaction.
    fn submit(
        &mut self,
        now: u64,
        spec: TaskSpec,
        inputs: Option<BlobRef>,
    ) -> (OperatorResponse, Option<Durable>) {
        let error = |message: String| {
            (
                OperatorResponse::Error {
                    kind: ErrorKind::InvalidRequest,
                    message,
                },
                None,
            )
        };
        if let Err(e) = validate_spec(&spec) {
            return error(format!("invalid task spec: {e}"));
        }
        if let Some(name) = self.secrets.missing(&spec) {
            return error(format!(
                "the spec grants secret {name:?}, which is not stored; store it first: \
                 printf %s \"$VALUE\" | drover secret set {name}"
            ));
        }
        match (&inputs, spec.inputs.is_empty()) {
            (None, false) => return error(
                "the spec lists inputs but no inputs archive came with it; `drover submit` packs \
                 and sends them (clients send SubmitWithInputs)"
                    .into(),
            ),
            (Some(_), true) => {
                return error(
                    "an inputs archive came with a spec that lists no inputs; send a plain Submit"
                        .into(),
                )
            }
            _ => {}
        }
        let (id, mut actions) = self.tasks.submit(now, spec);
        if let Some(blob) = inputs {
            // The task row and its inputs row go in one transaction; later writes are FIFO
            // behind it, so the durable answer below covers both.
            if let Some(i) = actions
                .iter()
                .position(|a| matches!(a, TaskAction::PutTask(_)))
            {
                if let TaskAction::PutTask(t) = actions.remove(i) {
                    let row = InputsRow {
                        task_id: id.clone(),
                        sha256: blob.sha256,
                        archive_bytes: blob.bytes,
                    };
                    // Its own answer is not needed: the `submitted` event queued next cannot be
                    // stored without the task row (foreign key), so its answer covers both.
                    drop(self.writes.put_task_with_inputs(t, row));
                }
            }
        }
        // Per task: debug (the session records it; info would flood the journal at hundreds a
        // second).
        tracing::debug!(task = %id, "task submitted");
        let durable = self.apply_tasks(actions);
        self.schedule(now);
        (OperatorResponse::Submitted { id }, durable)
    }

    /// Carry out fleet actions; returns the durability receiver of the writes, if any.
    fn apply(&mut self, actions: Vec<Action>) -> Option<Durable> {
        let now = self.clock.now_ms();
        let mut records = Vec::new();
        let mut gone = Vec::new();
        let mut drained = Vec::new();
        for action in actions {
            match action {
                Action::Persist(r) => {
                    tracing::info!(worker = %r.name, state = %r.state, address = %r.address, "worker state");
                    match r.state {
                        WorkerState::Lost => gone.push((r.name.clone(), WorkerGone::Lost)),
                        WorkerState::Down => gone.push((r.name.clone(), WorkerGone::Down)),
                        _ => {}
                    }
                    records.push(r);
                }
                Action::Close { conn, reason } => {
                    if let Some(link) = self.links.values().find(|l| l.conn_id == conn) {
                        link.conn
                            .close(close_code::REPLACED.into(), reason.as_bytes());
                    }
                }
                Action::DrainDeadline { name } => drained.push(name),
            }
        }
        let durable = (!records.is_empty()).then(|| self.writes.put_workers(records));
        for (name, how) in gone {
            let actions = self.tasks.handle_worker_gone(now, &name, how);
            self.apply_tasks(actions);
        }
        for name in drained {
            let actions = self.tasks.handle_drain_deadline(now, &name);
            tracing::info!(worker = %name, rescheduled = actions.len() / 2, "drain deadline passed");
            self.apply_tasks(actions);
        }
        durable
    }

    /// After a restart: attempts on workers that were already lost or down when the
    /// coordinator stopped end now (or, `keep_running`, are detached from now); attempts on
    /// the others wait for their worker to reconnect within its lease.
    fn recover(&mut self, now: u64) {
        for (state, how) in [
            (WorkerState::Lost, WorkerGone::Lost),
            (WorkerState::Down, WorkerGone::Down),
        ] {
            for info in self.fleet.list(now, Some(state), None) {
                let actions = self.tasks.handle_worker_gone(now, &info.name, how);
                self.apply_tasks(actions);
            }
        }
    }

    /// Carry out task actions; returns the durability receiver of the last write, which (the
    /// writer being FIFO) resolves only after every earlier one.
    fn apply_tasks(&mut self, actions: Vec<TaskAction>) -> Option<Durable> {
        let mut last = None;
        for action in actions {
            match action {
                TaskAction::PutTask(t) => last = Some(self.writes.put_task(t)),
                TaskAction::Append(events) => last = Some(self.writes.append_events(events)),
                TaskAction::Assign {
                    worker,
                    mut assignment,
                } => {
                    tracing::debug!(task = %assignment.task_id, epoch = assignment.epoch, %worker, "assigning attempt");
                    // Values only for the task's own work: a verdict checks, it does not act.
                    if assignment.kind == AttemptKind::Work {
                        assignment.secrets = self.secrets.values_for(&assignment.spec);
                    }
                    for (msg, after) in assignment_messages(assignment, last.take()) {
                        self.send_to(&worker, msg, after);
                    }
                }
                TaskAction::Cancel {
                    worker,
                    task_id,
                    epoch,
                } => {
                    let after = last.take();
                    self.send_to(
                        &worker,
                        CoordinatorMessage::Cancel { task_id, epoch },
                        after,
                    );
                }
            }
        }
        last
    }

    fn send_to(&self, worker: &str, msg: CoordinatorMessage, after: Option<Durable>) {
        match self.links.get(worker) {
            Some(link) => {
                let msg = Box::new(msg);
                if link.outbound.try_send(Outbound { msg, after }).is_err() {
                    // The connection is going away or badly behind; its lease will decide.
                    tracing::warn!(%worker, "worker's outbound queue is full or closed; message dropped");
                }
            }
            None => {
                tracing::warn!(%worker, "no connection to the worker; its lease will decide its attempts")
            }
        }
    }

    fn worker_views(&self, now: u64) -> Vec<WorkerView> {
        let reserved = self.tasks.reserved();
        self.fleet
            .list(now, None, None)
            .iter()
            .map(|info| {
                let mut view =
                    WorkerView::new(info, reserved.get(&info.name).copied().unwrap_or_default());
                let reported = self.links.get(&info.name).is_some_and(|l| l.reported);
                if !reported && view.state == WorkerState::Ready {
                    // Ready but not connected (after a coordinator restart): nothing can be sent.
                    // Connected but its first attempts report not yet in: an attempt placed now
                    // would be missing from that report (built before the assignment arrived)
                    // and ended as `worker_restarted` — found by the chaos suite (scenario d).
                    // The report's handler schedules again.
                    view.state = WorkerState::Lost;
                }
                view
            })
            .collect()
    }

    fn schedule(&mut self, now: u64) {
        if !self.tasks.has_placeable(now) {
            return;
        }
        let views = self.worker_views(now);
        let actions = self.tasks.schedule(now, &views);
        self.apply_tasks(actions);
    }

    fn drain_report(
        &self,
        now: u64,
        name: String,
        change: crate::fleet::DrainChange,
        running: Vec<String>,
    ) -> OperatorResponse {
        OperatorResponse::Drain(drover_protocol::DrainReport {
            running,
            name,
            previous: change.previous,
            state: change.state,
            drain: change.drain,
            changed: change.changed,
            now_ms: now,
        })
    }

    /// Drain, undrain and the attention list (issue 5).
    fn answer_ops(
        &mut self,
        now: u64,
        req: OperatorRequest,
    ) -> (OperatorResponse, Option<Durable>) {
        let error = |kind, message: String| (OperatorResponse::Error { kind, message }, None);
        match req {
            OperatorRequest::Drain {
                name,
                deadline_in_ms,
            } => match self.fleet.handle_drain(now, &name, deadline_in_ms) {
                Ok((change, actions)) => {
                    tracing::info!(worker = %name, ?deadline_in_ms, "drain requested");
                    let durable = self.apply(actions);
                    let running = self.tasks.running_on(&name);
                    // A deadline of 0 acts now, not at the next tick.
                    let due = self.fleet.tick(now);
                    self.apply(due);
                    self.schedule(now);
                    (self.drain_report(now, name, change, running), durable)
                }
                Err(e) => error(ErrorKind::NotFound, e.to_string()),
            },
            OperatorRequest::Undrain { name } => match self.fleet.handle_undrain(now, &name) {
                Ok((change, actions)) => {
                    tracing::info!(worker = %name, "undrain requested");
                    let durable = self.apply(actions);
                    self.schedule(now);
                    let running = self.tasks.running_on(&name);
                    (self.drain_report(now, name, change, running), durable)
                }
                Err(e) => error(ErrorKind::NotFound, e.to_string()),
            },
            OperatorRequest::Attention => {
                let workers = self
                    .fleet
                    .list(now, None, None)
                    .into_iter()
                    .filter(|w| {
                        matches!(w.state, WorkerState::Lost | WorkerState::Draining)
                            || self.fleet.drain(&w.name).is_some()
                    })
                    .map(|w| drover_protocol::WorkerNote {
                        drain: self.fleet.drain(&w.name),
                        running: self.tasks.running_on(&w.name),
                        name: w.name,
                        state: w.state,
                        state_changed_ms: w.state_changed_ms,
                        last_heartbeat_ms: w.last_heartbeat_ms,
                        connected: w.connected,
                    })
                    .collect();
                let attention = drover_protocol::Attention {
                    now_ms: now,
                    workers,
                    retrying: self.tasks.retrying(),
                };
                (OperatorResponse::Attention(attention), None)
            }
            other => error(
                ErrorKind::Internal,
                format!("not a fleet operation: {other:?}"),
            ),
        }
    }

    fn answer(&mut self, now: u64, req: OperatorRequest) -> (OperatorResponse, Option<Durable>) {
        let error = |kind, message: String| (OperatorResponse::Error { kind, message }, None);
        let no_task = |id: &str| format!("no task {id:?}; `drover tasks` lists them");
        match req {
            OperatorRequest::Drain { .. }
            | OperatorRequest::Undrain { .. }
            | OperatorRequest::Attention => self.answer_ops(now, req),
            OperatorRequest::FleetStatus => {
                let mut summary = self.fleet.summary(now, &crate::server::core::software());
                for (w, c) in self.tasks.reserved() {
                    if self
                        .fleet
                        .info(now, &w)
                        .is_some_and(|i| i.state == WorkerState::Ready)
                    {
                        summary.free.cpus = summary.free.cpus.saturating_sub(c.cpus);
                        summary.free.gpus = summary.free.gpus.saturating_sub(c.gpus);
                    }
                }
                (OperatorResponse::FleetStatus(summary), None)
            }
            OperatorRequest::ListWorkers { state, label } => (
                OperatorResponse::Workers(self.fleet.list(now, state, label.as_deref())),
                None,
            ),
            OperatorRequest::ShowWorker { name } => match self.fleet.info(now, &name) {
                Some(info) => (OperatorResponse::Worker(Box::new(info)), None),
                None => error(
                    ErrorKind::NotFound,
                    format!("no worker named {name:?}; `drover workers` lists them"),
                ),
            },
            OperatorRequest::Submit { spec } => self.submit(now, spec, None),
            OperatorRequest::ListTasks { state } => {
                self.tasks.set_wait_reasons(&self.worker_views(now));
                (OperatorResponse::Tasks(self.tasks.list(state)), None)
            }
            OperatorRequest::ShowTask { id } => {
                self.tasks.set_wait_reasons(&self.worker_views(now));
                match self.tasks.info(&id) {
                    Some(t) => (OperatorResponse::Task(Box::new(t)), None),
                    None => error(ErrorKind::NotFound, no_task(&id)),
                }
            }
            OperatorRequest::Cancel { id } => match self.tasks.cancel(now, &id) {
                Some((already_final, actions)) => {
                    let durable = self.apply_tasks(actions);
                    (
                        OperatorResponse::CancelRequested { id, already_final },
                        durable,
                    )
                }
                None => error(ErrorKind::NotFound, no_task(&id)),
            },
            OperatorRequest::Events { id, .. }
            | OperatorRequest::ListOutputs { id }
            | OperatorRequest::FetchOutputs { id, .. } => {
                // Served by the connection task from a read-only database connection.
                error(
                    ErrorKind::Internal,
                    format!("events and outputs of {id} are read by the connection, not the core"),
                )
            }
            OperatorRequest::SubmitWithInputs { .. } | OperatorRequest::Chunk { .. } => error(
                ErrorKind::Internal,
                "archive transfers are handled by the connection, not the core".into(),
            ),
            OperatorRequest::CreateToken { .. }
            | OperatorRequest::ListTokens
            | OperatorRequest::RevokeToken { .. }
            | OperatorRequest::RevokeWorker { .. }
            | OperatorRequest::ReinstateWorker { .. } => error(
                ErrorKind::Internal,
                "tokens and revocations are handled by the trust service, not the core".into(),
            ),
            OperatorRequest::SetSecret { .. }
            | OperatorRequest::ListSecrets
            | OperatorRequest::RemoveSecret { .. } => error(
                ErrorKind::Internal,
                "secrets are handled by the connection, not the core".into(),
            ),
        }
    }
}

/// What tells a worker to run an attempt whose epoch is durable once `after` resolves: a
/// `Prepare` at once, so the worker gets it ready while the write goes to disk, and its
/// `Confirm` once the write is durable (see `CoordinatorMessage::Prepare`). With nothing to
/// wait for, a plain `Assign`.
fn assignment_messages(
    assignment: Box<drover_protocol::Assignment>,
    after: Option<Durable>,
) -> Vec<(CoordinatorMessage, Option<Durable>)> {
    match after {
        Some(after) => {
            let confirm = CoordinatorMessage::Confirm {
                task_id: assignment.task_id.clone(),
                epoch: assignment.epoch,
            };
            vec![
                (CoordinatorMessage::Prepare(assignment), None),
                (confirm, Some(after)),
            ]
        }
        None => vec![(CoordinatorMessage::Assign(assignment), None)],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_attempt_is_confirmed_only_behind_its_write() {
        let spec: TaskSpec =
            serde_json::from_value(serde_json::json!({ "name": "t", "command": ["true"] }))
                .unwrap_or_else(|e| panic!("{e}"));
        let assignment = drover_protocol::Assignment {
            task_id: "t1".into(),
            epoch: 3,
            attempt: 2,
            spec,
            checkpoint: None,
            kind: AttemptKind::Work,
            iteration: 0,
            feedback: None,
            secrets: vec![],
        };
        let (_tx, rx) = oneshot::channel();
        let msgs = assignment_messages(Box::new(assignment.clone()), Some(rx));
        assert_eq!(msgs.len(), 2);
        assert!(
            matches!(&msgs[0], (CoordinatorMessage::Prepare(a), None) if **a == assignment),
            "prepared at once: {:?}",
            msgs[0]
        );
        assert!(
            matches!(&msgs[1], (CoordinatorMessage::Confirm { task_id, epoch: 3 }, Some(_)) if task_id == "t1"),
            "confirmed behind the write: {:?}",
            msgs[1]
        );
        let msgs = assignment_messages(Box::new(assignment.clone()), None);
        assert!(
            matches!(&msgs[..], [(CoordinatorMessage::Assign(a), None)] if **a == assignment),
            "nothing to wait for: {msgs:?}"
        );
    }

    fn task(state: TaskState, epoch: u64, worker: &str) -> TaskInfo {
        let spec: TaskSpec =
            serde_json::from_value(serde_json::json!({ "name": "t", "command": ["true"] }))
                .unwrap_or_else(|e| panic!("{e}"));
        TaskInfo {
            id: "t1".into(),
            name: "t".into(),
            state,
            attempts: epoch as u32,
            epoch,
            worker: Some(worker.into()),
            submitted_ms: 0,
            finished_ms: None,
            exit: None,
            reason: None,
            events: 3,
            spec,
            iteration: 0,
            criteria: vec![],
            verdict: None,
        }
    }

    #[test]
    fn transfers_are_fenced_like_events() {
        let running = task(TaskState::Running, 2, "w1");
        assert_eq!(attempt_is_current(Some(&running), "t1", "w1", 2), Ok(2));
        let stale = attempt_is_current(Some(&running), "t1", "w1", 1).unwrap_err();
        assert!(
            stale.contains("not current (current epoch 2 on w1"),
            "{stale}"
        );
        assert!(attempt_is_current(Some(&running), "t1", "w2", 2).is_err());
        let done = task(TaskState::Succeeded, 2, "w1");
        assert!(attempt_is_current(Some(&done), "t1", "w1", 2).is_err());
        assert!(attempt_is_current(None, "t9", "w1", 1)
            .unwrap_err()
            .contains("no task t9"));
    }
}
