//! The coordinator's core task: owns the [`Fleet`] and [`Tasks`] state machines, feeds them
//! connection events, operator requests and timer ticks, and carries out what they return
//! (durable writes, assignments, closing replaced connections). Connection tasks talk to it
//! only through [`CoreHandle`].
//!
//! Ordering rule: anything sent to a peer that depends on a write (a registration ack, an
//! assignment whose epoch must be durable first, an event ack, a submitted task's id) travels
//! with the write's [`Durable`] receiver, and the connection task sends it only once that
//! resolves. The core itself never waits for the disk.

use crate::clock::Clock;
use crate::fleet::{Action, ConnId, Fleet, Registration};
use crate::store::Store;
use crate::tasks::lifecycle::{EventVerdict, TaskAction, Tasks};
use crate::tasks::{validate_spec, WorkerView};
use drover_protocol::{
    close_code, AttemptEvent, CoordinatorMessage, ErrorKind, OperatorRequest, OperatorResponse,
    Usage, WorkerState,
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

/// The core's answer to an attempt event.
#[derive(Debug)]
pub enum AttemptReply {
    /// Acknowledge `seq` once `after` resolves (immediately when `None`: a duplicate).
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
        outbound: mpsc::Sender<Outbound>,
        reply: oneshot::Sender<Durable>,
    },
    Attempts {
        conn: ConnId,
        name: String,
        running: Vec<(String, u64)>,
    },
    Heartbeat {
        conn: ConnId,
        name: String,
        usage: Usage,
    },
    AttemptEvent {
        name: String,
        task_id: String,
        epoch: u64,
        event: AttemptEvent,
        reply: oneshot::Sender<AttemptReply>,
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
}

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
    outbound: mpsc::Sender<Outbound>,
}

#[derive(Debug)]
pub struct Core {
    fleet: Fleet,
    tasks: Tasks,
    store: Store,
    clock: Clock,
    links: HashMap<String, WorkerLink>,
    tick: Duration,
}

impl Core {
    pub fn new(fleet: Fleet, tasks: Tasks, store: Store, clock: Clock) -> Self {
        // Check leases several times per lease so `lost` shows within a quarter lease of expiry.
        let tick = Duration::from_millis((fleet.lease_ms() / 4).clamp(50, 1000));
        Self {
            fleet,
            tasks,
            store,
            clock,
            links: HashMap::new(),
            tick,
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
        loop {
            tokio::select! {
                msg = rx.recv() => match msg {
                    Some(msg) => self.handle(msg),
                    None => break,
                },
                _ = tick.tick() => {
                    let now = self.clock.now_ms();
                    let actions = self.fleet.tick(now);
                    self.apply(actions);
                    self.schedule(now);
                }
            }
        }
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
                if self.links.get(&name).is_some_and(|l| l.conn_id == conn) {
                    let actions = self
                        .tasks
                        .handle_worker_attempts(now, &name, Some(&running));
                    self.apply_tasks(actions);
                    self.schedule(now);
                }
            }
            CoreMsg::Heartbeat { conn, name, usage } => {
                let actions = self.fleet.handle_heartbeat(now, conn, &name, usage);
                self.apply(actions);
            }
            CoreMsg::AttemptEvent {
                name,
                task_id,
                epoch,
                event,
                reply,
            } => {
                let answer = match self.tasks.handle_event(now, &name, &task_id, epoch, event) {
                    EventVerdict::Accept { seq, actions } => {
                        let after = self.apply_tasks(actions);
                        self.schedule(now);
                        AttemptReply::Ack { seq, after }
                    }
                    EventVerdict::Duplicate { seq } => AttemptReply::Ack { seq, after: None },
                    EventVerdict::Fenced { reason } => {
                        tracing::warn!(worker = %name, task = %task_id, epoch, %reason, "refused a stale attempt event");
                        AttemptReply::Fenced(reason)
                    }
                };
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
        }
    }

    /// Carry out fleet actions; returns the durability receiver of the writes, if any.
    fn apply(&mut self, actions: Vec<Action>) -> Option<Durable> {
        let now = self.clock.now_ms();
        let mut records = Vec::new();
        let mut gone = Vec::new();
        for action in actions {
            match action {
                Action::Persist(r) => {
                    tracing::info!(worker = %r.name, state = %r.state, address = %r.address, "worker state");
                    if matches!(r.state, WorkerState::Lost | WorkerState::Down) {
                        gone.push(r.name.clone());
                    }
                    records.push(r);
                }
                Action::Close { conn, reason } => {
                    if let Some(link) = self.links.values().find(|l| l.conn_id == conn) {
                        link.conn
                            .close(close_code::REPLACED.into(), reason.as_bytes());
                    }
                }
            }
        }
        let durable = (!records.is_empty()).then(|| self.store.put_workers(records));
        for name in gone {
            let actions = self.tasks.handle_worker_attempts(now, &name, None);
            self.apply_tasks(actions);
        }
        durable
    }

    /// Carry out task actions; returns the durability receiver of the last write, which (the
    /// writer being FIFO) resolves only after every earlier one.
    fn apply_tasks(&mut self, actions: Vec<TaskAction>) -> Option<Durable> {
        let mut last = None;
        for action in actions {
            match action {
                TaskAction::PutTask(t) => last = Some(self.store.put_task(t)),
                TaskAction::Append(events) => last = Some(self.store.append_events(events)),
                TaskAction::Assign { worker, assignment } => {
                    tracing::info!(task = %assignment.task_id, epoch = assignment.epoch, %worker, "assigning attempt");
                    let after = last.take();
                    self.send_to(&worker, CoordinatorMessage::Assign(assignment), after);
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
                if !self.links.contains_key(&info.name) && view.state == WorkerState::Ready {
                    // Ready but not connected (after a coordinator restart): nothing can be sent.
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

    fn answer(&mut self, now: u64, req: OperatorRequest) -> (OperatorResponse, Option<Durable>) {
        let error = |kind, message: String| (OperatorResponse::Error { kind, message }, None);
        let no_task = |id: &str| format!("no task {id:?}; `drover tasks` lists them");
        match req {
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
            OperatorRequest::Submit { spec } => {
                if let Err(e) = validate_spec(&spec) {
                    return error(ErrorKind::InvalidRequest, format!("invalid task spec: {e}"));
                }
                let (id, actions) = self.tasks.submit(now, spec);
                tracing::info!(task = %id, "task submitted");
                let durable = self.apply_tasks(actions);
                self.schedule(now);
                (OperatorResponse::Submitted { id }, durable)
            }
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
            OperatorRequest::Events { id, .. } => {
                // Served by the connection task from a read-only database connection.
                error(
                    ErrorKind::Internal,
                    format!("events for {id} are read by the connection, not the core"),
                )
            }
        }
    }
}
