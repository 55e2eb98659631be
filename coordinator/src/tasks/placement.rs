//! Placement: which worker runs a task now, or why it waits. Pure functions, no I/O, no clock.
//!
//! A worker can take a task when it is `ready`, has the exact `arch` asked for, carries every
//! label asked for, and has free capacity — total minus what running attempts reserve — for
//! the task's cpus, memory and gpus. Among those, [`place`] picks the one that spreads load
//! best: the lowest *max* of reserved/total over cpus, memory and gpus once the task is added,
//! ties broken by name so the choice is deterministic.
//!
//! When nothing fits, [`place`] returns a [`WaitReason`] (module [`wait`](super::wait)): the
//! first check each worker fails, in the fixed order state, arch, labels, cpus, memory, gpus,
//! which `first_failure` defines for both modules.
//!
//! [`pick_next`] places a whole queue in one pass, reserving as it goes so it never
//! over-commits a worker. Priority orders the queue only; nothing is preempted.
//! [`pick_grouped`] gives the same answer for a queue kept grouped by requirements, without
//! looking at every queued task (the coordinator's queue, see `tasks::index`).

use super::wait::WaitReason;
use drover_protocol::task::Requirements;
use drover_protocol::{Capacity, WorkerInfo, WorkerState};
use std::cmp::{Ordering, Reverse};

/// What placement needs to know of a worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerView {
    pub name: String,
    pub state: WorkerState,
    /// As `uname -m` prints it.
    pub arch: String,
    /// Totals of the machine.
    pub cpus: u64,
    pub memory_bytes: u64,
    pub gpus: u64,
    pub labels: Vec<String>,
    /// What running attempts have reserved of the totals.
    pub reserved: Capacity,
}

impl WorkerView {
    /// The view of a registry record, with the reservations of its running attempts.
    pub fn new(info: &WorkerInfo, reserved: Capacity) -> Self {
        let r = &info.resources;
        Self {
            name: info.name.clone(),
            state: info.state,
            arch: r.arch.clone(),
            cpus: u64::from(r.cpu_count),
            memory_bytes: r.memory_total_bytes,
            gpus: r.gpus.len() as u64,
            labels: r.labels.clone(),
            reserved,
        }
    }

    pub fn total(&self) -> Capacity {
        Capacity {
            cpus: self.cpus,
            memory_bytes: self.memory_bytes,
            gpus: self.gpus,
        }
    }

    /// Total minus reserved (never below zero, even if reservations outgrew a shrunk worker).
    pub fn free(&self) -> Capacity {
        sub(self.total(), self.reserved)
    }
}

/// A worker with nothing reserved.
impl From<&WorkerInfo> for WorkerView {
    fn from(info: &WorkerInfo) -> Self {
        WorkerView::new(info, Capacity::default())
    }
}

/// What one attempt of a task reserves on its worker.
pub fn demand(req: &Requirements) -> Capacity {
    Capacity {
        cpus: u64::from(req.cpus),
        memory_bytes: req.memory_bytes,
        gpus: u64::from(req.gpus),
    }
}

/// The answer for one task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// Run it on this worker (reserve [`demand`] there).
    Place { worker: String },
    /// Keep it queued.
    Wait(WaitReason),
}

/// Where `req` runs now among `workers`, or why it waits.
///
/// Priority plays no part for a single task: it only orders the queue in [`pick_next`].
pub fn place(req: &Requirements, workers: &[WorkerView]) -> Placement {
    let reserved: Vec<Capacity> = workers.iter().map(|w| w.reserved).collect();
    match best_fit(req, workers, &reserved) {
        Some(i) => Placement::Place {
            worker: workers[i].name.clone(),
        },
        None => Placement::Wait(WaitReason::new(req, workers)),
    }
}

/// A queued task as [`pick_next`] sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedTask<Id> {
    pub id: Id,
    /// Higher first.
    pub priority: i32,
    /// Equal priorities go first come, first served (then by position in the queue slice).
    pub submitted_ms: u64,
    pub requirements: Requirements,
}

/// Assign as many queued tasks as fit, highest priority first, then FIFO by submit time.
///
/// Reservations are updated after every assignment, so one pass never over-commits a worker
/// and two equal workers take turns. A task that does not fit is skipped and smaller tasks
/// behind it may still run (backfill): a large task can wait while small ones keep the
/// capacity it needs busy — there is no reservation ahead for it.
///
/// Cost: O(t log t) to order the queue plus O(t × w) checks for t tasks and w workers (each
/// check compares the task's few labels with the worker's), and no allocation per check.
pub fn pick_next<Id: Clone>(queue: &[QueuedTask<Id>], workers: &[WorkerView]) -> Vec<(Id, String)> {
    let mut order: Vec<&QueuedTask<Id>> = queue.iter().collect();
    // Stable: equal (priority, submitted_ms) keep their queue order.
    order.sort_by_key(|t| (Reverse(t.priority), t.submitted_ms));
    let mut reserved: Vec<Capacity> = workers.iter().map(|w| w.reserved).collect();
    let mut out = Vec::new();
    for task in order {
        if let Some(i) = best_fit(&task.requirements, workers, &reserved) {
            reserved[i] = add(reserved[i], demand(&task.requirements));
            out.push((task.id.clone(), workers[i].name.clone()));
        }
    }
    out
}

/// [`pick_next`] over a queue already grouped by requirements, with the same answer at a
/// fraction of the cost: each class lists its tasks in queue order with their sort key (keys
/// unique across classes; lower goes first). The classes are merged by key, and once a class's
/// head fits no worker the rest of that class is skipped: reservations only grow during a
/// pass, so nothing with the same requirements behind it could fit either — which is exactly
/// what [`pick_next`] would find, task by task.
///
/// **Ahead.** `ahead[i]` says `workers[i]` may take one task beyond its free capacity, which
/// it holds and starts the moment its own capacity frees (the dispatch round trip is then off
/// the task's path). A head that fits no worker now goes ahead to the eligible ready worker
/// whose totals it fits with the lowest load once added (ties by name), which is then no
/// longer eligible; placements say whether they went ahead. With no worker eligible, the
/// answer is [`pick_next`]'s.
///
/// Cost: O((placed + classes) × w) checks plus O(placed × log classes), however long the
/// queue, where [`pick_next`] checks every queued task.
pub fn pick_grouped<K, Id, I>(
    classes: Vec<(&Requirements, I)>,
    workers: &[WorkerView],
    ahead: &mut [bool],
) -> Vec<Picked<Id>>
where
    K: Ord,
    I: Iterator<Item = (K, Id)>,
{
    let mut reserved: Vec<Capacity> = workers.iter().map(|w| w.reserved).collect();
    let mut classes = classes;
    let mut heads: Vec<Option<Id>> = Vec::with_capacity(classes.len());
    let mut heap = std::collections::BinaryHeap::new();
    for (c, (_, tasks)) in classes.iter_mut().enumerate() {
        let head = tasks.next().map(|(key, id)| {
            heap.push(Reverse((key, c)));
            id
        });
        heads.push(head);
    }
    let mut out = Vec::new();
    while let Some(Reverse((_, c))) = heap.pop() {
        let req = classes[c].0;
        let (i, early) = match best_fit(req, workers, &reserved) {
            Some(i) => (i, false),
            None => match best_ahead(req, workers, &reserved, ahead) {
                Some(i) => {
                    ahead[i] = false;
                    (i, true)
                }
                // Blocked: the class drops out of this pass.
                None => continue,
            },
        };
        reserved[i] = add(reserved[i], demand(req));
        if let Some(id) = heads[c].take() {
            out.push(Picked {
                id,
                worker: workers[i].name.clone(),
                ahead: early,
            });
        }
        if let Some((key, id)) = classes[c].1.next() {
            heap.push(Reverse((key, c)));
            heads[c] = Some(id);
        }
    }
    out
}

/// One placement of [`pick_grouped`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Picked<Id> {
    pub id: Id,
    pub worker: String,
    /// Beyond the worker's free capacity: it holds the task until it has room.
    pub ahead: bool,
}

/// Index of the eligible (`ahead[i]`), ready worker whose totals `req` fits, with the lowest
/// load once `req` is added to `reserved[i]` (ties by name).
fn best_ahead(
    req: &Requirements,
    workers: &[WorkerView],
    reserved: &[Capacity],
    ahead: &[bool],
) -> Option<usize> {
    least_loaded(req, workers, reserved, |i, w| {
        ahead[i] && w.state == WorkerState::Ready && first_failure(req, w, None).is_none()
    })
}

/// Index of the worker that takes `req` with the best spread, given `reserved[i]` for
/// `workers[i]`.
fn best_fit(req: &Requirements, workers: &[WorkerView], reserved: &[Capacity]) -> Option<usize> {
    least_loaded(req, workers, reserved, |i, w| {
        first_failure(req, w, Some(sub(w.total(), reserved[i]))).is_none()
    })
}

/// Among the workers `eligible` accepts, the one with the lowest load once `req` is added to
/// `reserved[i]` (ties by name).
fn least_loaded(
    req: &Requirements,
    workers: &[WorkerView],
    reserved: &[Capacity],
    eligible: impl Fn(usize, &WorkerView) -> bool,
) -> Option<usize> {
    let need = demand(req);
    let mut best: Option<(usize, Fraction)> = None;
    for (i, w) in workers.iter().enumerate() {
        if !eligible(i, w) {
            continue;
        }
        let load = load_after(w.total(), add(reserved[i], need));
        let better = match &best {
            None => true,
            Some((j, best_load)) => match load.cmp(best_load) {
                Ordering::Less => true,
                Ordering::Equal => w.name < workers[*j].name,
                Ordering::Greater => false,
            },
        };
        if better {
            best = Some((i, load));
        }
    }
    best.map(|(i, _)| i)
}

/// A non-negative fraction compared exactly (`num/den`, `den > 0`).
#[derive(Debug, Clone, Copy)]
struct Fraction {
    num: u128,
    den: u128,
}

impl PartialEq for Fraction {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Fraction {}
impl PartialOrd for Fraction {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Fraction {
    fn cmp(&self, other: &Self) -> Ordering {
        // Both sides are products of two u64s: no overflow in u128.
        (self.num * other.den).cmp(&(other.num * self.den))
    }
}

/// The highest of reserved/total over the resources the worker has.
fn load_after(total: Capacity, reserved: Capacity) -> Fraction {
    [
        (reserved.cpus, total.cpus),
        (reserved.memory_bytes, total.memory_bytes),
        (reserved.gpus, total.gpus),
    ]
    .into_iter()
    .filter(|&(_, t)| t > 0)
    .map(|(r, t)| Fraction {
        num: u128::from(r),
        den: u128::from(t),
    })
    .max()
    .unwrap_or(Fraction { num: 0, den: 1 })
}

pub(super) fn add(a: Capacity, b: Capacity) -> Capacity {
    Capacity {
        cpus: a.cpus.saturating_add(b.cpus),
        memory_bytes: a.memory_bytes.saturating_add(b.memory_bytes),
        gpus: a.gpus.saturating_add(b.gpus),
    }
}

pub(super) fn sub(a: Capacity, b: Capacity) -> Capacity {
    Capacity {
        cpus: a.cpus.saturating_sub(b.cpus),
        memory_bytes: a.memory_bytes.saturating_sub(b.memory_bytes),
        gpus: a.gpus.saturating_sub(b.gpus),
    }
}

/// A countable resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Resource {
    Cpus,
    Memory,
    Gpus,
}

impl Resource {
    pub(super) const ALL: [Resource; 3] = [Resource::Cpus, Resource::Memory, Resource::Gpus];

    pub(super) fn of(self, c: Capacity) -> u64 {
        match self {
            Resource::Cpus => c.cpus,
            Resource::Memory => c.memory_bytes,
            Resource::Gpus => c.gpus,
        }
    }
}

/// Which check failed, without the data (cheap, for the hot path).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Failure {
    State,
    Arch,
    /// Index into `Requirements::labels`.
    Label(usize),
    Capacity(Resource),
}

impl Failure {
    /// Position in the fixed check order, for counting and tie-breaks.
    pub(super) fn rank(self) -> usize {
        match self {
            Failure::State => 0,
            Failure::Arch => 1,
            Failure::Label(_) => 2,
            Failure::Capacity(Resource::Cpus) => 3,
            Failure::Capacity(Resource::Memory) => 4,
            Failure::Capacity(Resource::Gpus) => 5,
        }
    }
}

/// The first check `w` fails for `req`, in the fixed order. `free: Some(..)` checks now
/// (state first, then free capacity); `None` asks whether it could *ever* fit: state is
/// ignored and capacity is compared with the totals.
pub(super) fn first_failure(
    req: &Requirements,
    w: &WorkerView,
    free: Option<Capacity>,
) -> Option<Failure> {
    if free.is_some() && w.state != WorkerState::Ready {
        return Some(Failure::State);
    }
    if req.arch.as_ref().is_some_and(|a| *a != w.arch) {
        return Some(Failure::Arch);
    }
    if let Some(i) = req.labels.iter().position(|l| !w.labels.contains(l)) {
        return Some(Failure::Label(i));
    }
    let have = free.unwrap_or_else(|| w.total());
    let need = demand(req);
    Resource::ALL
        .into_iter()
        .find(|r| r.of(need) > r.of(have))
        .map(Failure::Capacity)
}

#[cfg(test)]
#[path = "placement_tests.rs"]
mod tests;
