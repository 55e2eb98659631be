//! Indexes over the task table, so that a submit or the end of an attempt costs
//! O(log tasks + what changes) instead of a walk over every task ever submitted.
//!
//! [`Tasks`](super::lifecycle::Tasks) files every task here by what its state makes it:
//! - **queued** work, grouped by requirements class (the same requirements, grown memory
//!   included) and ordered within a class as placement orders a queue (priority, then submit
//!   time, then submission order), each with its `not_before_ms`;
//! - **queued verdicts**, in submission order (placed one at a time, see `schedule_verdicts`);
//! - **running** attempts per worker, in submission order, with what each reserves and
//!   whether it was assigned ahead of the worker's free capacity and has not started yet;
//! - every queued task's `not_before_ms`, so "may anything be placed now?" is one look.
//!
//! Invariant (checked by `Tasks::sanity_check`, which rebuilds the index from the tasks and
//! compares): the index holds exactly what [`Filed::of`] says for each task. The lifecycle
//! keeps it so by calling `Tasks::refile` for every task an input touched; a task is filed
//! under at most one entry.

use super::placement::demand;
use drover_protocol::task::Requirements;
use drover_protocol::Capacity;
use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// Requirements as a map key: one class per distinct set of requirements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Class(pub(super) Requirements);

impl Class {
    fn key(&self) -> (&Option<String>, u32, u64, u32, &Vec<String>) {
        let r = &self.0;
        (&r.arch, r.cpus, r.memory_bytes, r.gpus, &r.labels)
    }
}

impl Ord for Class {
    fn cmp(&self, other: &Self) -> Ordering {
        self.key().cmp(&other.key())
    }
}

impl PartialOrd for Class {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Where a queued task stands in placement order: higher priority first, then earlier
/// submit time, then earlier submission.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct QueueKey {
    pub(super) priority: Reverse<i32>,
    pub(super) submitted_ms: u64,
    pub(super) submit_seq: u64,
    pub(super) id: String,
}

/// What one task is filed under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Filed {
    /// Queued work.
    Work {
        class: Class,
        key: QueueKey,
        not_before_ms: u64,
    },
    /// A queued verdict.
    Verdict { submit_seq: u64, not_before_ms: u64 },
    /// An attempt running on `worker`, reserving `demand`; `ahead` while the worker holds it
    /// unstarted (assigned beyond its free capacity).
    Running {
        worker: String,
        submit_seq: u64,
        demand: Capacity,
        ahead: bool,
    },
}

/// What the index needs to know of a task to file it.
#[derive(Debug)]
pub(super) struct Facts<'a> {
    pub(super) id: &'a str,
    pub(super) submit_seq: u64,
    pub(super) submitted_ms: u64,
    pub(super) priority: i32,
    pub(super) queued: bool,
    pub(super) running_on: Option<&'a str>,
    pub(super) in_verdict: bool,
    /// Running, assigned ahead and not started yet.
    pub(super) ahead: bool,
    pub(super) not_before_ms: u64,
    /// What an attempt reserves (grown memory included).
    pub(super) requirements: Requirements,
}

impl Filed {
    /// The entry a task in this state belongs under (`None`: a final task, or a running one
    /// without a worker, which `sanity_check` refuses anyway).
    pub(super) fn of(f: Facts<'_>) -> Option<Filed> {
        if f.queued {
            if f.in_verdict {
                return Some(Filed::Verdict {
                    submit_seq: f.submit_seq,
                    not_before_ms: f.not_before_ms,
                });
            }
            return Some(Filed::Work {
                key: QueueKey {
                    priority: Reverse(f.priority),
                    submitted_ms: f.submitted_ms,
                    submit_seq: f.submit_seq,
                    id: f.id.to_owned(),
                },
                class: Class(f.requirements),
                not_before_ms: f.not_before_ms,
            });
        }
        f.running_on.map(|w| Filed::Running {
            worker: w.to_owned(),
            submit_seq: f.submit_seq,
            demand: demand(&f.requirements),
            ahead: f.ahead,
        })
    }
}

/// The indexes; see the module docs.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Index {
    /// Queued work by class, each class in placement order, with `not_before_ms`.
    pub(super) work: BTreeMap<Class, BTreeMap<QueueKey, u64>>,
    /// Queued verdicts: submit_seq → id.
    pub(super) verdicts: BTreeMap<u64, String>,
    /// (not_before_ms, submit_seq) of every queued task, work and verdicts.
    due: BTreeSet<(u64, u64)>,
    /// Running attempts per worker: submit_seq → (id, reserved, ahead).
    running: HashMap<String, BTreeMap<u64, (String, Capacity, bool)>>,
}

impl Index {
    pub(super) fn insert(&mut self, id: &str, filed: &Filed) {
        match filed {
            Filed::Work {
                class,
                key,
                not_before_ms,
            } => {
                self.due.insert((*not_before_ms, key.submit_seq));
                self.work
                    .entry(class.clone())
                    .or_default()
                    .insert(key.clone(), *not_before_ms);
            }
            Filed::Verdict {
                submit_seq,
                not_before_ms,
            } => {
                self.due.insert((*not_before_ms, *submit_seq));
                self.verdicts.insert(*submit_seq, id.to_owned());
            }
            Filed::Running {
                worker,
                submit_seq,
                demand,
                ahead,
            } => {
                self.running
                    .entry(worker.clone())
                    .or_default()
                    .insert(*submit_seq, (id.to_owned(), *demand, *ahead));
            }
        }
    }

    pub(super) fn remove(&mut self, filed: &Filed) {
        match filed {
            Filed::Work {
                class,
                key,
                not_before_ms,
            } => {
                self.due.remove(&(*not_before_ms, key.submit_seq));
                if let Some(keys) = self.work.get_mut(class) {
                    keys.remove(key);
                    if keys.is_empty() {
                        self.work.remove(class);
                    }
                }
            }
            Filed::Verdict {
                submit_seq,
                not_before_ms,
            } => {
                self.due.remove(&(*not_before_ms, *submit_seq));
                self.verdicts.remove(submit_seq);
            }
            Filed::Running {
                worker, submit_seq, ..
            } => {
                if let Some(on) = self.running.get_mut(worker) {
                    on.remove(submit_seq);
                    if on.is_empty() {
                        self.running.remove(worker);
                    }
                }
            }
        }
    }

    /// Whether any queued task may be placed at `now`.
    pub(super) fn any_due(&self, now: u64) -> bool {
        self.due.first().is_some_and(|(at, _)| *at <= now)
    }

    /// Ids of the attempts running on `worker`, in submission order.
    pub(super) fn running_on(&self, worker: &str) -> Vec<String> {
        self.running
            .get(worker)
            .map(|on| on.values().map(|(id, _, _)| id.clone()).collect())
            .unwrap_or_default()
    }

    /// What running attempts reserve, per worker.
    pub(super) fn reserved(&self) -> HashMap<String, Capacity> {
        self.running
            .iter()
            .map(|(w, on)| {
                let total = on
                    .values()
                    .fold(Capacity::default(), |c, (_, d, _)| Capacity {
                        cpus: c.cpus + d.cpus,
                        memory_bytes: c.memory_bytes + d.memory_bytes,
                        gpus: c.gpus + d.gpus,
                    });
                (w.clone(), total)
            })
            .collect()
    }

    /// How many attempts `worker` holds unstarted, assigned ahead of its free capacity.
    pub(super) fn ahead_on(&self, worker: &str) -> usize {
        self.running
            .get(worker)
            .map_or(0, |on| on.values().filter(|(_, _, ahead)| *ahead).count())
    }

    /// Workers holding an attempt assigned ahead.
    pub(super) fn workers_holding(&self) -> impl Iterator<Item = &String> {
        self.running
            .iter()
            .filter(|(_, on)| on.values().any(|(_, _, ahead)| *ahead))
            .map(|(w, _)| w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(id: &str, seq: u64) -> Facts<'_> {
        Facts {
            id,
            submit_seq: seq,
            submitted_ms: 10,
            priority: 0,
            queued: true,
            running_on: None,
            in_verdict: false,
            ahead: false,
            not_before_ms: 0,
            requirements: Requirements {
                cpus: 1,
                ..Requirements::default()
            },
        }
    }

    #[test]
    fn entries_come_and_go_without_leftovers() {
        let mut index = Index::default();
        let queued = Filed::of(facts("t1", 1)).unwrap();
        index.insert("t1", &queued);
        assert!(index.any_due(0));
        let mut delayed = facts("t2", 2);
        delayed.not_before_ms = 500;
        let delayed = Filed::of(delayed).unwrap();
        index.insert("t2", &delayed);
        index.remove(&queued);
        assert!(!index.any_due(499) && index.any_due(500));
        let mut running = facts("t1", 1);
        running.queued = false;
        running.running_on = Some("w1");
        let running = Filed::of(running).unwrap();
        index.insert("t1", &running);
        assert_eq!(index.running_on("w1"), vec!["t1".to_owned()]);
        assert_eq!(index.reserved()["w1"].cpus, 1);
        index.remove(&running);
        index.remove(&delayed);
        assert_eq!(
            index,
            Index::default(),
            "empty again, no empty classes kept"
        );
    }

    #[test]
    fn final_tasks_are_not_filed() {
        let mut f = facts("t1", 1);
        f.queued = false;
        assert_eq!(Filed::of(f), None);
    }
}
