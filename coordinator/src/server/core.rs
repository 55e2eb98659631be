//! The coordinator's core task: owns the [`Fleet`] state machine, feeds it connection events
//! and timer ticks, and carries out the [`Action`]s it returns (durable writes, closing
//! replaced connections). Connection tasks talk to it only through [`CoreHandle`].

use crate::clock::Clock;
use crate::fleet::{Action, ConnId, Fleet, Registration};
use crate::store::Store;
use drover_protocol::{close_code, ErrorKind, OperatorRequest, OperatorResponse, Usage};
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

pub use crate::store::Durable;

#[derive(Debug)]
pub enum CoreMsg {
    Register {
        reg: Registration,
        conn: quinn::Connection,
        reply: oneshot::Sender<Durable>,
    },
    Heartbeat {
        conn: ConnId,
        name: String,
        usage: Usage,
    },
    Disconnect {
        conn: ConnId,
        name: String,
        clean: bool,
    },
    Operator {
        req: OperatorRequest,
        reply: oneshot::Sender<OperatorResponse>,
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
pub struct Core {
    fleet: Fleet,
    store: Store,
    clock: Clock,
    conns: HashMap<ConnId, quinn::Connection>,
    tick: Duration,
}

impl Core {
    pub fn new(fleet: Fleet, store: Store, clock: Clock) -> Self {
        // Check leases several times per lease so `lost` shows within a quarter lease of expiry.
        let tick = Duration::from_millis((fleet.lease_ms() / 4).clamp(50, 1000));
        Self {
            fleet,
            store,
            clock,
            conns: HashMap::new(),
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
                    let actions = self.fleet.tick(self.clock.now_ms());
                    self.apply(actions);
                }
            }
        }
    }

    fn handle(&mut self, msg: CoreMsg) {
        let now = self.clock.now_ms();
        match msg {
            CoreMsg::Register { reg, conn, reply } => {
                let id = reg.conn;
                self.conns.insert(id, conn);
                let actions = self.fleet.handle_register(now, reg);
                if let Some(durable) = self.apply(actions) {
                    let _ = reply.send(durable);
                }
            }
            CoreMsg::Heartbeat { conn, name, usage } => {
                let actions = self.fleet.handle_heartbeat(now, conn, &name, usage);
                self.apply(actions);
            }
            CoreMsg::Disconnect { conn, name, clean } => {
                self.conns.remove(&conn);
                let actions = self.fleet.handle_disconnect(now, conn, &name, clean);
                self.apply(actions);
            }
            CoreMsg::Operator { req, reply } => {
                let _ = reply.send(self.answer(now, req));
            }
        }
    }

    /// Carry out actions; returns the durability receiver of the writes, if any.
    fn apply(&mut self, actions: Vec<Action>) -> Option<Durable> {
        let mut records = Vec::new();
        for action in actions {
            match action {
                Action::Persist(r) => {
                    tracing::info!(worker = %r.name, state = %r.state, address = %r.address, "worker state");
                    records.push(r);
                }
                Action::Close { conn, reason } => {
                    if let Some(c) = self.conns.remove(&conn) {
                        c.close(close_code::REPLACED.into(), reason.as_bytes());
                    }
                }
            }
        }
        (!records.is_empty()).then(|| self.store.put_workers(records))
    }

    fn answer(&self, now: u64, req: OperatorRequest) -> OperatorResponse {
        match req {
            OperatorRequest::FleetStatus => {
                OperatorResponse::FleetStatus(self.fleet.summary(now, &software()))
            }
            OperatorRequest::ListWorkers { state, label } => {
                OperatorResponse::Workers(self.fleet.list(now, state, label.as_deref()))
            }
            OperatorRequest::ShowWorker { name } => match self.fleet.info(now, &name) {
                Some(info) => OperatorResponse::Worker(Box::new(info)),
                None => OperatorResponse::Error {
                    kind: ErrorKind::NotFound,
                    message: format!("no worker named {name:?}; `drover workers` lists them"),
                },
            },
        }
    }
}
