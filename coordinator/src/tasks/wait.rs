//! Why a task waits: one line an operator can act on, for `drover task show`.
//!
//! For every worker, the *first* check it fails in the fixed order state, arch, labels, cpus,
//! memory, gpus; a headline naming the most common blocking reason; and the difference
//! between "busy now, will fit later" and "no known worker could ever run this"
//! ([`WaitReason::is_unsatisfiable`]), which the CLI warns about at submit. Pure, like
//! [`placement`](super::placement), whose checks it reuses.

use super::placement::{demand, first_failure, Failure, Resource, WorkerView};
use super::units::format_size;
use drover_protocol::task::Requirements;
use drover_protocol::WorkerState;
use std::fmt;

/// Most workers a [`WaitReason`] lists by name in its one-line form; the rest are counted.
pub const MAX_LISTED: usize = 8;

/// Why one worker cannot take a task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Blocker {
    /// Not `ready`.
    State(WorkerState),
    /// The worker's arch is `has`; the task wants `wants`.
    Arch { has: String, wants: String },
    /// The worker lacks this label.
    Label(String),
    /// Not enough of `resource`. `free` is total minus reserved, or the total itself when
    /// the question was whether it could ever fit.
    Capacity {
        resource: Resource,
        need: u64,
        free: u64,
        total: u64,
    },
}

impl fmt::Display for Blocker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Blocker::State(s) => write!(f, "{s}"),
            Blocker::Arch { has, wants } => write!(f, "arch {has} ≠ {wants}"),
            Blocker::Label(l) => write!(f, "no label {l}"),
            Blocker::Capacity {
                resource,
                need,
                free,
                total,
            } => {
                let needs = resource.amount(*need);
                if need > total {
                    if *total == 0 {
                        write!(f, "needs {needs}, has none")
                    } else {
                        write!(f, "needs {needs}, has {}", resource.number(*total))
                    }
                } else {
                    write!(f, "needs {needs}, {} free", resource.number(*free))
                }
            }
        }
    }
}

/// One worker and the first reason it cannot take the task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    pub worker: String,
    pub blocker: Blocker,
}

/// Why a task waits, renderable as one line:
/// `no ready worker has label browser (3 checked: a: arch x86_64 ≠ aarch64, b: lost, c: no label browser)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaitReason {
    headline: String,
    unsatisfiable: bool,
    checked: Vec<Checked>,
}

impl WaitReason {
    /// Explain why no worker in `workers` takes `req` now. (If one does, the explanation
    /// still lists the others; callers ask only after [`place`](super::place) said wait.)
    pub fn new(req: &Requirements, workers: &[WorkerView]) -> Self {
        if workers.is_empty() {
            return Self {
                headline: "no worker has registered yet".into(),
                unsatisfiable: true,
                checked: Vec::new(),
            };
        }
        let ever: Vec<Option<Failure>> = workers
            .iter()
            .map(|w| first_failure(req, w, None))
            .collect();
        let unsatisfiable = ever.iter().all(Option::is_some);
        let mut failures: Vec<(&WorkerView, Failure)> = if unsatisfiable {
            workers.iter().zip(ever.into_iter().flatten()).collect()
        } else {
            workers
                .iter()
                .filter_map(|w| first_failure(req, w, Some(w.free())).map(|f| (w, f)))
                .collect()
        };
        failures.sort_by(|a, b| a.0.name.cmp(&b.0.name));
        let headline = headline(req, workers, &failures, unsatisfiable);
        let checked = failures
            .iter()
            .map(|&(w, f)| Checked {
                worker: w.name.clone(),
                blocker: blocker(req, w, f, unsatisfiable),
            })
            .collect();
        Self {
            headline,
            unsatisfiable,
            checked,
        }
    }

    /// True when no known worker — in any state, idle — has the arch, labels and total
    /// capacity the task needs: it runs only if the fleet changes. False when it waits for
    /// capacity to free up or a worker to come back.
    pub fn is_unsatisfiable(&self) -> bool {
        self.unsatisfiable
    }

    /// The summary before the parenthesis, naming the most common blocking reason.
    pub fn headline(&self) -> &str {
        &self.headline
    }

    /// Every worker that was checked and why it cannot take the task, by name.
    pub fn checked(&self) -> &[Checked] {
        &self.checked
    }
}

impl fmt::Display for WaitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.headline)?;
        if self.checked.is_empty() {
            return Ok(());
        }
        write!(f, " ({} checked: ", self.checked.len())?;
        for (i, c) in self.checked.iter().take(MAX_LISTED).enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{}: {}", c.worker, c.blocker)?;
        }
        if self.checked.len() > MAX_LISTED {
            write!(f, ", and {} more", self.checked.len() - MAX_LISTED)?;
        }
        f.write_str(")")
    }
}

fn blocker(req: &Requirements, w: &WorkerView, failure: Failure, ever: bool) -> Blocker {
    match failure {
        Failure::State => Blocker::State(w.state),
        Failure::Arch => Blocker::Arch {
            has: w.arch.clone(),
            wants: req.arch.clone().unwrap_or_default(),
        },
        Failure::Label(i) => Blocker::Label(req.labels[i].clone()),
        Failure::Capacity(resource) => Blocker::Capacity {
            resource,
            need: resource.of(demand(req)),
            free: resource.of(if ever { w.total() } else { w.free() }),
            total: resource.of(w.total()),
        },
    }
}

/// The headline: the most common first failure (ties go to the later check, the one closer
/// to fitting), stated as strongly as is true — "no ready worker has label browser" when
/// none does, else "2 of 5 workers lack label browser". When the task can never run and no
/// single requirement explains it, it says the requirements never meet on one worker.
fn headline(
    req: &Requirements,
    workers: &[WorkerView],
    failures: &[(&WorkerView, Failure)],
    ever: bool,
) -> String {
    let mut counts = [0usize; 6];
    for (_, f) in failures {
        counts[f.rank()] += 1;
    }
    // `max_by_key` keeps the last maximum: ties go to the later check.
    let Some(rank) = (0..counts.len())
        .filter(|&r| counts[r] > 0)
        .max_by_key(|&r| counts[r])
    else {
        return "a worker can take it now".into();
    };
    let total = workers.len();
    let pool: Vec<&WorkerView> = if ever {
        workers.iter().collect()
    } else {
        workers
            .iter()
            .filter(|w| w.state == WorkerState::Ready)
            .collect()
    };
    let who = if ever { "known worker" } else { "ready worker" };
    let of = |n: usize, one: &str, many: &str| {
        format!("{n} of {total} workers {}", if n == 1 { one } else { many })
    };
    // (the strong claim if it is true, the counted one otherwise)
    let (strong, counted) = match rank {
        0 => (
            pool.is_empty().then(|| "no worker is ready".to_owned()),
            of(counts[0], "is not ready", "are not ready"),
        ),
        1 => {
            let wants = req.arch.as_deref().unwrap_or_default();
            (
                pool.iter()
                    .all(|w| w.arch != wants)
                    .then(|| format!("no {who} has arch {wants}")),
                of(
                    counts[1],
                    &format!("is not {wants}"),
                    &format!("are not {wants}"),
                ),
            )
        }
        2 => {
            // The label most often missing first; ties go to the one listed first.
            let mut per_label = vec![0usize; req.labels.len()];
            for (_, f) in failures {
                if let Failure::Label(i) = f {
                    per_label[*i] += 1;
                }
            }
            let (i, n) = per_label
                .iter()
                .enumerate()
                .rev()
                .max_by_key(|(_, n)| **n)
                .map_or((0, 0), |(i, n)| (i, *n));
            let label = &req.labels[i];
            (
                pool.iter()
                    .all(|w| !w.labels.contains(label))
                    .then(|| format!("no {who} has label {label}")),
                of(
                    n,
                    &format!("lacks label {label}"),
                    &format!("lack label {label}"),
                ),
            )
        }
        _ => {
            let resource = Resource::ALL[rank - 3];
            let n = resource.of(demand(req));
            let needs = resource.amount(n);
            let strong = if ever {
                let largest = pool
                    .iter()
                    .map(|w| resource.of(w.total()))
                    .max()
                    .unwrap_or(0);
                (largest < n).then(|| match resource {
                    Resource::Gpus if largest == 0 => {
                        format!("needs {needs}, no known worker has any")
                    }
                    Resource::Gpus => {
                        format!("needs {needs}, no known worker has more than {largest}")
                    }
                    _ => format!(
                        "needs {needs}, the largest known worker has {}",
                        resource.number(largest)
                    ),
                })
            } else {
                pool.iter()
                    .all(|w| resource.of(w.free()) < n)
                    .then(|| format!("no ready worker has {needs} free"))
            };
            let phrase = match resource {
                Resource::Cpus if n == 1 => "no cpu free".to_owned(),
                Resource::Gpus if n == 1 => "no gpu free".to_owned(),
                _ => format!("{} {needs} free", resource.fewer()),
            };
            (
                strong,
                of(
                    counts[rank],
                    &format!("has {phrase}"),
                    &format!("have {phrase}"),
                ),
            )
        }
    };
    match strong {
        Some(s) => s,
        // Every requirement is met somewhere, just never all on one worker.
        None if ever => "no known worker meets all its requirements at once".into(),
        None => counted,
    }
}

impl Resource {
    /// `4 cpus`, `1 gpu`, `2 GiB memory`.
    fn amount(self, n: u64) -> String {
        match self {
            Resource::Cpus => plural(n, "cpu"),
            Resource::Memory => format!("{} memory", format_size(n)),
            Resource::Gpus => plural(n, "gpu"),
        }
    }

    /// `4`, `1`, `2 GiB`: the number alone, for "has 8".
    fn number(self, n: u64) -> String {
        match self {
            Resource::Memory => format_size(n),
            _ => n.to_string(),
        }
    }

    /// "fewer than" or "less than", before [`Resource::amount`].
    fn fewer(self) -> &'static str {
        match self {
            Resource::Memory => "less than",
            _ => "fewer than",
        }
    }
}

fn plural(n: u64, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}
