//! The fleet registry as a state machine: worker connections, heartbeats and leases in,
//! [`Action`]s out.
//!
//! No I/O and no clock: every input carries `now` (milliseconds, from the runtime's monotonic
//! clock anchored to wall time), so lease expiry is tested by feeding times, not by sleeping.
//! Invariants (checked by [`Fleet::sanity_check`] in tests):
//! - a worker with an open connection is `ready` or `draining` (or `lost` until its next
//!   heartbeat revives it);
//! - a worker in `down` has no connection;
//! - every state change produces exactly one [`Action::Persist`] of the new record;
//! - a worker with a drain on record is never `ready`: it is `draining` while connected (the
//!   drain survives reconnects, lost leases and coordinator restarts) until undrained;
//! - the name and connection indexes point at the worker with that name and connection.
//!
//! Drain: [`Fleet::handle_drain`] records the drain (and its deadline) with the worker;
//! placement skips `draining` workers; [`Fleet::tick`] returns [`Action::DrainDeadline`] once
//! when the deadline passes, and the runtime reschedules what still runs there.
//!
//! Memory: the registry holds every worker for the coordinator's life, so an entry is kept
//! small (see [`Worker`]): the resource report is stored encoded in one allocation and decoded
//! only for the operator's view and placement, the software version is shared between
//! workers, and a heartbeat finds its worker by connection id in a hash map rather than by
//! name in an ordered map.

use drover_protocol::{
    Capacity, DrainInfo, FleetSummary, ResourceReport, StateCounts, Usage, WorkerInfo, WorkerState,
};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

/// Identifies one QUIC connection for the lifetime of the process.
pub type ConnId = u64;

/// What the registry persists of a worker: everything but the live connection and usage.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerRecord {
    pub name: String,
    pub state: WorkerState,
    pub address: String,
    pub version: String,
    pub protocol_version: u16,
    pub first_seen_ms: u64,
    pub registered_ms: u64,
    pub state_changed_ms: u64,
    pub last_heartbeat_ms: u64,
    pub resources: ResourceReport,
    /// A drain asked for by an operator, until undrained.
    pub drain: Option<DrainInfo>,
}

/// What the runtime must do after an input.
#[allow(clippy::large_enum_variant)] // Short-lived, moved once.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Write this record durably.
    Persist(WorkerRecord),
    /// Close this connection (a newer one replaced it).
    Close { conn: ConnId, reason: &'static str },
    /// The drain deadline of this worker passed: reschedule what still runs there.
    DrainDeadline { name: String },
}

/// The registry has no worker by this name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no worker named {0:?}; `drover workers` lists them")]
pub struct UnknownWorker(pub String);

/// What a drain or undrain did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainChange {
    pub previous: WorkerState,
    pub state: WorkerState,
    pub drain: Option<DrainInfo>,
    pub changed: bool,
}

/// One worker in the registry: a [`WorkerRecord`]'s fields in a compact form, plus its live
/// connection, usage and lease. About 0.6 KB with its allocations, against 1.3 KB for a
/// `WorkerRecord` with its report's dozen strings (docs/benchmarks.md).
#[derive(Debug)]
struct Worker {
    name: Arc<str>,
    state: WorkerState,
    address: Box<str>,
    /// Shared with every worker running the same software (see [`Fleet::versions`]).
    version: Arc<str>,
    protocol_version: u16,
    first_seen_ms: u64,
    registered_ms: u64,
    state_changed_ms: u64,
    last_heartbeat_ms: u64,
    report: Report,
    drain: Option<DrainInfo>,
    usage: Usage,
    conn: Option<ConnId>,
    lease_deadline_ms: u64,
    /// The drain deadline was acted on (in memory: after a restart it fires again, which is
    /// harmless because nothing can have been placed on a draining worker since).
    drain_fired: bool,
    /// When a liveness probe was last started for this worker (see [`Fleet::late`]).
    probed_ms: u64,
}

/// A resource report as the registry keeps it: postcard-encoded in one allocation, with the
/// totals the fleet summary adds up on every status request kept decoded beside it.
#[derive(Debug)]
struct Report {
    encoded: Box<[u8]>,
    cpus: u32,
    gpus: u32,
    memory_total_bytes: u64,
}

impl Report {
    fn new(r: &ResourceReport) -> Self {
        Self {
            // Encoding a plain struct into a growable buffer cannot fail.
            encoded: postcard::to_allocvec(r)
                .unwrap_or_default()
                .into_boxed_slice(),
            cpus: r.cpu_count,
            gpus: u32::try_from(r.gpus.len()).unwrap_or(u32::MAX),
            memory_total_bytes: r.memory_total_bytes,
        }
    }

    fn decode(&self) -> ResourceReport {
        postcard::from_bytes(&self.encoded)
            .expect("the registry decodes the resource report it encoded itself")
    }
}

impl Worker {
    fn record(&self) -> WorkerRecord {
        WorkerRecord {
            name: self.name.to_string(),
            state: self.state,
            address: self.address.to_string(),
            version: self.version.to_string(),
            protocol_version: self.protocol_version,
            first_seen_ms: self.first_seen_ms,
            registered_ms: self.registered_ms,
            state_changed_ms: self.state_changed_ms,
            last_heartbeat_ms: self.last_heartbeat_ms,
            resources: self.report.decode(),
            drain: self.drain,
        }
    }

    fn persist(&self) -> Action {
        Action::Persist(self.record())
    }

    fn live(&self) -> bool {
        matches!(self.state, WorkerState::Ready | WorkerState::Draining)
    }

    /// The state of a worker that is connected and heartbeating: `draining` if drained.
    fn live_state(&self) -> WorkerState {
        if self.drain.is_some() {
            WorkerState::Draining
        } else {
            WorkerState::Ready
        }
    }
}

/// A registration from a connection that passed the handshake.
#[derive(Debug, Clone)]
pub struct Registration {
    pub conn: ConnId,
    pub name: String,
    pub address: String,
    pub version: String,
    pub protocol_version: u16,
    pub resources: ResourceReport,
}

/// The registry.
#[derive(Debug)]
pub struct Fleet {
    /// Every worker ever registered (there is no removal), each boxed so that the vector's
    /// spare capacity costs a pointer per slot, not a whole entry.
    #[allow(clippy::vec_box)] // On purpose, as said above.
    workers: Vec<Box<Worker>>,
    /// Slot in `workers` by name, in name order (listings are sorted by name).
    by_name: BTreeMap<Arc<str>, usize>,
    /// Slot in `workers` by live connection: the heartbeat path.
    by_conn: HashMap<ConnId, usize>,
    /// Software version strings, one copy each.
    versions: HashSet<Arc<str>>,
    lease_ms: u64,
}

impl Fleet {
    /// A registry rebuilt from stored records at `now`. Workers that were connected when the
    /// previous coordinator stopped get a fresh lease: they are `lost` only if they do not
    /// reconnect within it.
    pub fn restore(records: Vec<WorkerRecord>, lease_ms: u64, now: u64) -> Self {
        let mut fleet = Self {
            workers: Vec::with_capacity(records.len()),
            by_name: BTreeMap::new(),
            by_conn: HashMap::new(),
            versions: HashSet::new(),
            lease_ms,
        };
        for r in records {
            let usage = usage_from(&r.resources);
            let version = fleet.intern(r.version);
            let name: Arc<str> = r.name.into();
            let slot = fleet.workers.len();
            fleet.workers.push(Box::new(Worker {
                name: name.clone(),
                state: r.state,
                address: r.address.into(),
                version,
                protocol_version: r.protocol_version,
                first_seen_ms: r.first_seen_ms,
                registered_ms: r.registered_ms,
                state_changed_ms: r.state_changed_ms,
                last_heartbeat_ms: r.last_heartbeat_ms,
                report: Report::new(&r.resources),
                drain: r.drain,
                usage,
                conn: None,
                lease_deadline_ms: now + lease_ms,
                drain_fired: false,
                probed_ms: 0,
            }));
            fleet.by_name.insert(name, slot);
        }
        fleet
    }

    pub fn lease_ms(&self) -> u64 {
        self.lease_ms
    }

    fn intern(&mut self, version: String) -> Arc<str> {
        if let Some(v) = self.versions.get(version.as_str()) {
            return v.clone();
        }
        let v: Arc<str> = version.into();
        self.versions.insert(v.clone());
        v
    }

    fn get(&self, name: &str) -> Option<&Worker> {
        self.by_name.get(name).map(|&slot| &*self.workers[slot])
    }

    fn get_mut(&mut self, name: &str) -> Option<&mut Worker> {
        self.by_name.get(name).map(|&slot| &mut *self.workers[slot])
    }

    /// Workers in name order.
    fn sorted(&self) -> impl Iterator<Item = &Worker> {
        self.by_name.values().map(|&slot| &*self.workers[slot])
    }

    /// A worker completed its handshake and registered.
    pub fn handle_register(&mut self, now: u64, reg: Registration) -> Vec<Action> {
        let mut actions = Vec::new();
        let usage = usage_from(&reg.resources);
        let version = self.intern(reg.version);
        let slot = match self.by_name.get(reg.name.as_str()) {
            Some(&slot) => slot,
            None => {
                let name: Arc<str> = reg.name.into();
                let slot = self.workers.len();
                self.workers.push(Box::new(Worker {
                    name: name.clone(),
                    state: WorkerState::Down,
                    address: Box::default(),
                    version: version.clone(),
                    protocol_version: reg.protocol_version,
                    first_seen_ms: now,
                    registered_ms: now,
                    state_changed_ms: now,
                    last_heartbeat_ms: now,
                    report: Report::new(&reg.resources),
                    drain: None,
                    usage,
                    conn: None,
                    lease_deadline_ms: now,
                    drain_fired: false,
                    probed_ms: 0,
                }));
                self.by_name.insert(name, slot);
                slot
            }
        };
        let w = &mut self.workers[slot];
        if let Some(old) = w.conn.replace(reg.conn) {
            self.by_conn.remove(&old);
            if old != reg.conn {
                actions.push(Action::Close {
                    conn: old,
                    reason: "replaced by a newer connection",
                });
            }
        }
        self.by_conn.insert(reg.conn, slot);
        let state = w.live_state();
        if w.state != state {
            w.state_changed_ms = now;
        }
        w.state = state;
        w.address = reg.address.into();
        w.version = version;
        w.protocol_version = reg.protocol_version;
        w.registered_ms = now;
        w.last_heartbeat_ms = now;
        w.report = Report::new(&reg.resources);
        w.usage = usage;
        w.lease_deadline_ms = now + self.lease_ms;
        actions.push(w.persist());
        actions
    }

    /// A heartbeat arrived on `conn`. Heartbeats from a replaced connection are ignored.
    pub fn handle_heartbeat(&mut self, now: u64, conn: ConnId, usage: Usage) -> Vec<Action> {
        let Some(&slot) = self.by_conn.get(&conn) else {
            return Vec::new();
        };
        let w = &mut self.workers[slot];
        w.usage = usage;
        w.last_heartbeat_ms = now;
        w.lease_deadline_ms = now + self.lease_ms;
        if w.state == WorkerState::Lost {
            // Stalled past its lease (SIGSTOP, a long partition) but the connection survived.
            w.state = w.live_state();
            w.state_changed_ms = now;
            return vec![w.persist()];
        }
        Vec::new()
    }

    /// The connection `conn` ended. A clean goodbye makes the worker `down` at once; anything
    /// else leaves its lease running, so it turns `lost` unless it reconnects in time.
    pub fn handle_disconnect(
        &mut self,
        now: u64,
        conn: ConnId,
        name: &str,
        clean: bool,
    ) -> Vec<Action> {
        let Some(w) = self.get_mut(name) else {
            return Vec::new();
        };
        if w.conn != Some(conn) {
            return Vec::new();
        }
        w.conn = None;
        let persist = clean && w.state != WorkerState::Down;
        if persist {
            w.state = WorkerState::Down;
            w.state_changed_ms = now;
        }
        let actions = if persist {
            vec![w.persist()]
        } else {
            Vec::new()
        };
        self.by_conn.remove(&conn);
        actions
    }

    /// Live workers whose last heartbeat is more than `late_ms` old and that were not probed
    /// in the last `every_ms`: (name, connection, address) to probe, at most `limit` of them.
    /// Marks them probed; the others are found again at a later call.
    ///
    /// A late heartbeat alone proves nothing (a busy or stalled worker is late too); the
    /// probe only looks for a positive sign of death — see [`Fleet::handle_probe_refused`].
    pub fn late(
        &mut self,
        now: u64,
        late_ms: u64,
        every_ms: u64,
        limit: usize,
    ) -> Vec<(String, Option<ConnId>, String)> {
        let mut out = Vec::new();
        for w in &mut self.workers {
            if out.len() >= limit {
                break;
            }
            // Only over a live connection: after a coordinator restart or a dropped connection
            // the stored address may be stale until the worker registers again.
            if w.live()
                && w.conn.is_some()
                && now.saturating_sub(w.last_heartbeat_ms) > late_ms
                && now.saturating_sub(w.probed_ms) >= every_ms
            {
                w.probed_ms = now;
                out.push((w.name.to_string(), w.conn, w.address.to_string()));
            }
        }
        out
    }

    /// A probe sent to `address` while `conn` was `name`'s connection was answered with "port
    /// unreachable": no process holds the worker's socket any more (it was killed or crashed
    /// while its host stays up). The worker is lost now instead of at its lease's end. Ignored
    /// unless `conn` is still the worker's connection at the same address.
    pub fn handle_probe_refused(
        &mut self,
        now: u64,
        conn: Option<ConnId>,
        name: &str,
        address: &str,
    ) -> Vec<Action> {
        let Some(w) = self.get_mut(name) else {
            return Vec::new();
        };
        let same = &*w.address == address && w.conn.is_some() && w.conn == conn;
        if !w.live() || !same {
            return Vec::new();
        }
        w.state = WorkerState::Lost;
        w.state_changed_ms = now;
        vec![w.persist()]
    }

    /// Expire leases and drain deadlines. Call at least a few times per lease.
    pub fn tick(&mut self, now: u64) -> Vec<Action> {
        let mut actions = Vec::new();
        for &slot in self.by_name.values() {
            let w = &mut self.workers[slot];
            if w.live() && now >= w.lease_deadline_ms {
                w.state = WorkerState::Lost;
                w.state_changed_ms = now;
                actions.push(w.persist());
            }
            let due = w
                .drain
                .and_then(|d| d.deadline_ms)
                .is_some_and(|d| now >= d);
            if due && !w.drain_fired {
                w.drain_fired = true;
                actions.push(Action::DrainDeadline {
                    name: w.name.to_string(),
                });
            }
        }
        actions
    }

    /// Stop placing work on `name`; attempts still running `deadline_in_ms` from now are to be
    /// rescheduled (`None`: no deadline). Draining a lost or down worker records the drain for
    /// when it comes back. Draining again replaces the deadline.
    pub fn handle_drain(
        &mut self,
        now: u64,
        name: &str,
        deadline_in_ms: Option<u64>,
    ) -> Result<(DrainChange, Vec<Action>), UnknownWorker> {
        let w = self
            .get_mut(name)
            .ok_or_else(|| UnknownWorker(name.to_owned()))?;
        let previous = w.state;
        let deadline_ms = deadline_in_ms.map(|d| now.saturating_add(d));
        let drain = match w.drain {
            // Already draining: keep when it started, take the new deadline.
            Some(d) => DrainInfo {
                since_ms: d.since_ms,
                deadline_ms,
            },
            None => DrainInfo {
                since_ms: now,
                deadline_ms,
            },
        };
        let changed = w.drain != Some(drain);
        w.drain = Some(drain);
        w.drain_fired = false;
        if w.state == WorkerState::Ready {
            w.state = WorkerState::Draining;
            w.state_changed_ms = now;
        }
        let change = DrainChange {
            previous,
            state: w.state,
            drain: w.drain,
            changed,
        };
        let actions = if changed {
            vec![w.persist()]
        } else {
            Vec::new()
        };
        Ok((change, actions))
    }

    /// Lift the drain of `name`: a draining worker is `ready` again; a lost or down one
    /// registers as `ready` when it comes back.
    pub fn handle_undrain(
        &mut self,
        now: u64,
        name: &str,
    ) -> Result<(DrainChange, Vec<Action>), UnknownWorker> {
        let w = self
            .get_mut(name)
            .ok_or_else(|| UnknownWorker(name.to_owned()))?;
        let previous = w.state;
        let changed = w.drain.take().is_some() || previous == WorkerState::Draining;
        w.drain_fired = false;
        if w.state == WorkerState::Draining {
            w.state = WorkerState::Ready;
            w.state_changed_ms = now;
        }
        let change = DrainChange {
            previous,
            state: w.state,
            drain: None,
            changed,
        };
        let actions = if changed {
            vec![w.persist()]
        } else {
            Vec::new()
        };
        Ok((change, actions))
    }

    /// The drain on record for `name`, if any.
    pub fn drain(&self, name: &str) -> Option<DrainInfo> {
        self.get(name).and_then(|w| w.drain)
    }

    /// The operator's view of one worker.
    pub fn info(&self, now: u64, name: &str) -> Option<WorkerInfo> {
        self.get(name).map(|w| to_info(w, w.report.decode(), now))
    }

    /// Workers matching the filters, sorted by name.
    pub fn list(
        &self,
        now: u64,
        state: Option<WorkerState>,
        label: Option<&str>,
    ) -> Vec<WorkerInfo> {
        self.sorted()
            .filter(|w| state.is_none_or(|s| w.state == s))
            .filter_map(|w| {
                let resources = w.report.decode();
                let labelled = label.is_none_or(|l| resources.labels.iter().any(|x| x == l));
                labelled.then(|| to_info(w, resources, now))
            })
            .collect()
    }

    /// Counts by state and capacity totals.
    pub fn summary(&self, now: u64, coordinator_version: &str) -> FleetSummary {
        let mut counts = StateCounts::default();
        let mut total = Capacity::default();
        let mut free = Capacity::default();
        for w in &self.workers {
            let r = &w.report;
            match w.state {
                WorkerState::Ready => counts.ready += 1,
                WorkerState::Draining => counts.draining += 1,
                WorkerState::Lost => counts.lost += 1,
                WorkerState::Down => counts.down += 1,
            }
            if w.live() {
                total.cpus += u64::from(r.cpus);
                total.memory_bytes += r.memory_total_bytes;
                total.gpus += u64::from(r.gpus);
            }
            if w.state == WorkerState::Ready {
                // Nothing reserves capacity yet; task placement subtracts its reservations here.
                free.cpus += u64::from(r.cpus);
                free.memory_bytes += w.usage.memory_available_bytes;
                free.gpus += u64::from(r.gpus);
            }
        }
        FleetSummary {
            coordinator_version: coordinator_version.to_owned(),
            now_ms: now,
            workers: counts,
            total,
            free,
        }
    }

    /// Check the invariants in the module doc; panics with the broken one.
    pub fn sanity_check(&self) {
        assert_eq!(self.by_name.len(), self.workers.len());
        for (name, &slot) in &self.by_name {
            let w = &self.workers[slot];
            assert_eq!(name, &w.name);
            if w.state == WorkerState::Down {
                assert!(w.conn.is_none(), "{name}: down with an open connection");
            }
            if w.drain.is_some() {
                assert_ne!(w.state, WorkerState::Ready, "{name}: ready while drained");
            }
            if let Some(conn) = w.conn {
                assert_eq!(self.by_conn.get(&conn), Some(&slot), "{name}: conn index");
            }
        }
        let connected = self.workers.iter().filter(|w| w.conn.is_some()).count();
        assert_eq!(
            self.by_conn.len(),
            connected,
            "stale connection index entries"
        );
    }
}

fn usage_from(r: &ResourceReport) -> Usage {
    Usage {
        load: r.load,
        cpu_percent: 0.0,
        memory_available_bytes: r.memory_available_bytes,
        disk_free_bytes: r.disk_free_bytes,
    }
}

fn to_info(w: &Worker, resources: ResourceReport, now: u64) -> WorkerInfo {
    WorkerInfo {
        name: w.name.to_string(),
        state: w.state,
        connected: w.conn.is_some(),
        address: w.address.to_string(),
        version: w.version.to_string(),
        protocol_version: w.protocol_version,
        first_seen_ms: w.first_seen_ms,
        registered_ms: w.registered_ms,
        state_changed_ms: w.state_changed_ms,
        last_heartbeat_ms: w.last_heartbeat_ms,
        last_heartbeat_age_ms: now.saturating_sub(w.last_heartbeat_ms),
        resources,
        usage: w.usage,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use drover_protocol::{CgroupVersion, LoadAvg};

    pub(crate) fn report(cpus: u32, labels: &[&str]) -> ResourceReport {
        ResourceReport {
            arch: "aarch64".into(),
            os: "Debian".into(),
            kernel: "6.1".into(),
            hostname: "h".into(),
            cpu_count: cpus,
            cpu_model: "Cortex-A76".into(),
            load: LoadAvg::default(),
            memory_total_bytes: 8 << 30,
            memory_available_bytes: 6 << 30,
            work_dir: "/var/lib/drover-worker".into(),
            disk_total_bytes: 100 << 30,
            disk_free_bytes: 50 << 30,
            gpus: vec![],
            cgroup: CgroupVersion::V2,
            namespaces: true,
            labels: labels.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn reg(conn: ConnId, name: &str) -> Registration {
        Registration {
            conn,
            name: name.into(),
            address: "127.0.0.1:5000".into(),
            version: "drover-worker 0.1.0".into(),
            protocol_version: 1,
            resources: report(4, &["browser"]),
        }
    }

    fn state(f: &Fleet, name: &str) -> WorkerState {
        f.info(0, name).unwrap().state
    }

    #[test]
    fn register_heartbeat_expire_revive() {
        let mut f = Fleet::restore(vec![], 3000, 0);
        let a = f.handle_register(1000, reg(1, "w1"));
        assert!(matches!(&a[..], [Action::Persist(r)] if r.state == WorkerState::Ready));
        assert!(f.handle_heartbeat(2000, 1, Usage::default()).is_empty());
        assert!(
            f.tick(4999).is_empty(),
            "lease runs from the last heartbeat"
        );
        let a = f.tick(5000);
        assert!(matches!(&a[..], [Action::Persist(r)] if r.state == WorkerState::Lost));
        f.sanity_check();
        assert!(f.tick(6000).is_empty(), "lost is reported once");
        let a = f.handle_heartbeat(7000, 1, Usage::default());
        assert!(matches!(&a[..], [Action::Persist(r)] if r.state == WorkerState::Ready));
    }

    #[test]
    fn late_heartbeat_is_probed_once_per_interval_and_a_refusal_loses_the_worker() {
        let mut f = Fleet::restore(vec![], 3000, 0);
        f.handle_register(0, reg(1, "w1"));
        assert!(f.late(700, 750, 500, 64).is_empty(), "not late yet");
        let late = f.late(800, 750, 500, 64);
        assert_eq!(
            late,
            vec![("w1".to_owned(), Some(1), "127.0.0.1:5000".to_owned())]
        );
        assert!(
            f.late(900, 750, 500, 64).is_empty(),
            "probed once per interval"
        );
        assert_eq!(f.late(1300, 750, 500, 64).len(), 1);
        // A refusal for an address or connection the worker no longer has is ignored.
        assert!(f
            .handle_probe_refused(1400, Some(1), "w1", "127.0.0.1:6000")
            .is_empty());
        assert!(f
            .handle_probe_refused(1400, Some(2), "w1", "127.0.0.1:5000")
            .is_empty());
        assert_eq!(state(&f, "w1"), WorkerState::Ready);
        let a = f.handle_probe_refused(1400, Some(1), "w1", "127.0.0.1:5000");
        assert!(matches!(&a[..], [Action::Persist(r)] if r.state == WorkerState::Lost));
        assert!(f.tick(5000).is_empty(), "lost once");
        assert!(
            f.late(5000, 750, 500, 64).is_empty(),
            "a lost worker is not probed"
        );
        // Without a live connection (after a restart, or once it dropped) nothing is probed.
        f.handle_register(6000, reg(3, "w2"));
        f.handle_disconnect(6100, 3, "w2", false);
        assert!(f.late(7000, 750, 500, 64).is_empty());
        assert!(f
            .handle_probe_refused(7000, None, "w2", "127.0.0.1:5000")
            .is_empty());
        f.sanity_check();
    }

    #[test]
    fn late_returns_at_most_the_limit_and_the_rest_later() {
        let mut f = Fleet::restore(vec![], 3000, 0);
        for i in 0..5 {
            f.handle_register(0, reg(i, &format!("w{i}")));
        }
        assert_eq!(f.late(800, 750, 500, 2).len(), 2);
        assert_eq!(
            f.late(800, 750, 500, 2).len(),
            2,
            "the next two, not the same"
        );
        assert_eq!(f.late(800, 750, 500, 2).len(), 1);
        assert!(
            f.late(800, 750, 500, 2).is_empty(),
            "each probed once per interval"
        );
        assert!(f.late(800, 750, 500, 0).is_empty());
    }

    #[test]
    fn the_compact_entry_gives_back_what_was_registered() {
        let mut f = Fleet::restore(vec![], 3000, 0);
        let mut r = reg(1, "w");
        r.resources.gpus = vec![drover_protocol::Gpu {
            vendor: drover_protocol::GpuVendor::Nvidia,
            model: "L4".into(),
            memory_bytes: Some(24 << 30),
        }];
        let sent = r.resources.clone();
        let Some(Action::Persist(rec)) = f.handle_register(5, r).pop() else {
            panic!("registration persists")
        };
        assert_eq!(rec.resources, sent);
        assert_eq!(rec.address, "127.0.0.1:5000");
        assert_eq!(rec.version, "drover-worker 0.1.0");
        let info = f.info(5, "w").expect("registered");
        assert_eq!(info.resources, sent);
        assert_eq!(f.summary(5, "v").total.gpus, 1);
        // Every worker on the same software shares one copy of its version string.
        f.handle_register(6, reg(2, "x"));
        assert_eq!(f.versions.len(), 1);
        // A restored registry holds the same.
        let g = Fleet::restore(vec![rec.clone()], 3000, 10);
        assert_eq!(g.info(10, "w").map(|i| i.resources), Some(sent));
        g.sanity_check();
        f.sanity_check();
    }

    #[test]
    fn unclean_disconnect_waits_for_lease_clean_goes_down() {
        let mut f = Fleet::restore(vec![], 3000, 0);
        f.handle_register(0, reg(1, "a"));
        f.handle_register(0, reg(2, "b"));
        assert!(f.handle_disconnect(100, 1, "a", false).is_empty());
        assert_eq!(state(&f, "a"), WorkerState::Ready);
        let a = f.handle_disconnect(100, 2, "b", true);
        assert_eq!(a.len(), 1);
        assert_eq!(state(&f, "b"), WorkerState::Down);
        f.tick(3000);
        assert_eq!(state(&f, "a"), WorkerState::Lost);
        assert_eq!(
            state(&f, "b"),
            WorkerState::Down,
            "down workers do not expire"
        );
        f.sanity_check();
    }

    #[test]
    fn reconnect_keeps_identity_and_replaces_old_connection() {
        let mut f = Fleet::restore(vec![], 3000, 0);
        f.handle_register(0, reg(1, "w"));
        f.tick(5000);
        let a = f.handle_register(6000, reg(2, "w"));
        assert!(a.contains(&Action::Close {
            conn: 1,
            reason: "replaced by a newer connection"
        }));
        let info = f.info(6000, "w").unwrap();
        assert_eq!(info.state, WorkerState::Ready);
        assert_eq!(info.first_seen_ms, 0);
        // The old connection's late heartbeat and disconnect are ignored.
        assert!(f.handle_heartbeat(6100, 1, Usage::default()).is_empty());
        assert!(f.handle_disconnect(6100, 1, "w", true).is_empty());
        assert_eq!(state(&f, "w"), WorkerState::Ready);
        f.sanity_check();
    }

    #[test]
    fn restore_gives_connected_workers_a_fresh_lease() {
        let mut f = Fleet::restore(vec![], 3000, 0);
        f.handle_register(0, reg(1, "w"));
        let Action::Persist(rec) = f.handle_register(0, reg(1, "w")).pop().unwrap() else {
            panic!()
        };
        let mut g = Fleet::restore(vec![rec], 3000, 10_000);
        assert_eq!(state(&g, "w"), WorkerState::Ready);
        assert!(g.tick(12_999).is_empty());
        g.handle_register(12_000, reg(7, "w"));
        assert!(g.tick(13_000).is_empty(), "reconnected in time");
        assert_eq!(state(&g, "w"), WorkerState::Ready);
    }

    #[test]
    fn summary_and_filters() {
        let mut f = Fleet::restore(vec![], 3000, 0);
        f.handle_register(0, reg(1, "a"));
        let mut r = reg(2, "b");
        r.resources.labels = vec![];
        f.handle_register(0, r);
        f.handle_register(0, reg(3, "c"));
        f.handle_disconnect(0, 3, "c", true);
        let s = f.summary(0, "v");
        assert_eq!((s.workers.ready, s.workers.down), (2, 1));
        assert_eq!(s.total.cpus, 8);
        assert_eq!(s.free.memory_bytes, 12 << 30);
        assert_eq!(
            f.list(0, Some(WorkerState::Ready), Some("browser")).len(),
            1
        );
        assert_eq!(f.list(0, None, None).len(), 3);
    }

    fn persisted(actions: &[Action]) -> WorkerRecord {
        match actions {
            [Action::Persist(r)] => r.clone(),
            other => panic!("expected one Persist, got {other:?}"),
        }
    }

    #[test]
    fn drain_stops_ready_fires_deadline_once_and_undrain_reverses() {
        let mut f = Fleet::restore(vec![], 3000, 0);
        f.handle_register(0, reg(1, "w"));
        let (change, a) = f.handle_drain(1000, "w", Some(5000)).expect("known worker");
        assert_eq!(
            (change.previous, change.state, change.changed),
            (WorkerState::Ready, WorkerState::Draining, true)
        );
        let rec = persisted(&a);
        assert_eq!(
            rec.drain,
            Some(DrainInfo {
                since_ms: 1000,
                deadline_ms: Some(6000)
            })
        );
        f.sanity_check();
        f.handle_heartbeat(2500, 1, Usage::default());
        f.handle_heartbeat(5000, 1, Usage::default());
        assert!(f.tick(5999).is_empty(), "deadline not reached");
        assert_eq!(
            f.tick(6000),
            vec![Action::DrainDeadline { name: "w".into() }]
        );
        f.handle_heartbeat(7000, 1, Usage::default());
        assert!(f.tick(7000).is_empty(), "the deadline fires once");
        assert_eq!(
            state(&f, "w"),
            WorkerState::Draining,
            "still draining after it"
        );

        let (change, a) = f.handle_undrain(8000, "w").expect("known worker");
        assert_eq!(
            (change.previous, change.state, change.changed),
            (WorkerState::Draining, WorkerState::Ready, true)
        );
        assert_eq!(persisted(&a).drain, None);
        let (change, a) = f.handle_undrain(8000, "w").expect("known worker");
        assert!(
            !change.changed && a.is_empty(),
            "undrain twice changes nothing"
        );
        assert_eq!(
            f.handle_drain(0, "nope", None).unwrap_err(),
            UnknownWorker("nope".into())
        );
        assert!(f.handle_undrain(0, "nope").is_err());
        f.sanity_check();
    }

    #[test]
    fn drain_survives_lost_lease_reconnect_and_restart() {
        let mut f = Fleet::restore(vec![], 3000, 0);
        f.handle_register(0, reg(1, "w"));
        f.handle_drain(100, "w", None).expect("known worker");
        // Lost, then revived by a heartbeat on the same connection: draining, not ready.
        f.tick(3000);
        assert_eq!(state(&f, "w"), WorkerState::Lost);
        let rec = persisted(&f.handle_heartbeat(3500, 1, Usage::default()));
        assert_eq!(rec.state, WorkerState::Draining);
        // Reconnects on a new connection: still draining.
        let a = f.handle_register(4000, reg(2, "w"));
        let Some(Action::Persist(rec)) = a.last() else {
            panic!("{a:?}")
        };
        assert_eq!(rec.state, WorkerState::Draining);
        // A restarted coordinator restores the drain from the record.
        let mut g = Fleet::restore(vec![rec.clone()], 3000, 10_000);
        assert_eq!(state(&g, "w"), WorkerState::Draining);
        g.handle_register(10_500, reg(9, "w"));
        assert_eq!(state(&g, "w"), WorkerState::Draining);
        assert!(g.drain("w").is_some());
        assert!(
            g.tick(1_000_000)
                .iter()
                .all(|a| !matches!(a, Action::DrainDeadline { .. })),
            "no deadline, nothing fires"
        );
        g.sanity_check();
    }

    #[test]
    fn draining_a_down_worker_applies_when_it_returns() {
        let mut f = Fleet::restore(vec![], 3000, 0);
        f.handle_register(0, reg(1, "w"));
        f.handle_disconnect(10, 1, "w", true);
        let (change, _) = f.handle_drain(20, "w", Some(1000)).expect("known worker");
        assert_eq!(
            (change.previous, change.state, change.changed),
            (WorkerState::Down, WorkerState::Down, true)
        );
        f.handle_register(30, reg(2, "w"));
        assert_eq!(state(&f, "w"), WorkerState::Draining);
        let s = f.summary(30, "v");
        assert_eq!((s.workers.ready, s.workers.draining), (0, 1));
        assert_eq!(s.free.cpus, 0, "a draining worker offers nothing");
        f.sanity_check();
    }
}
