#![allow(clippy::unwrap_used)]

use super::*;
use crate::tasks::wait::{Blocker, Checked};
use drover_protocol::{CgroupVersion, Gpu, GpuVendor, LoadAvg, ResourceReport, Usage};

const GIB: u64 = 1 << 30;

/// A ready, idle x86_64 worker without labels or gpus.
fn w(name: &str, cpus: u64, memory_gib: u64) -> WorkerView {
    WorkerView {
        name: name.into(),
        state: WorkerState::Ready,
        arch: "x86_64".into(),
        cpus,
        memory_bytes: memory_gib * GIB,
        gpus: 0,
        labels: Vec::new(),
        reserved: Capacity::default(),
    }
}

impl WorkerView {
    fn arch(mut self, arch: &str) -> Self {
        self.arch = arch.into();
        self
    }
    fn labels(mut self, labels: &[&str]) -> Self {
        self.labels = labels.iter().map(|s| s.to_string()).collect();
        self
    }
    fn gpus(mut self, gpus: u64) -> Self {
        self.gpus = gpus;
        self
    }
    fn state(mut self, state: WorkerState) -> Self {
        self.state = state;
        self
    }
    fn busy(mut self, cpus: u64, memory_gib: u64, gpus: u64) -> Self {
        self.reserved = Capacity {
            cpus,
            memory_bytes: memory_gib * GIB,
            gpus,
        };
        self
    }
}

fn cpus(n: u32) -> Requirements {
    Requirements {
        cpus: n,
        ..Requirements::default()
    }
}

fn placed(req: &Requirements, workers: &[WorkerView]) -> String {
    match place(req, workers) {
        Placement::Place { worker } => worker,
        Placement::Wait(why) => panic!("expected a placement, got: {why}"),
    }
}

fn waits(req: &Requirements, workers: &[WorkerView]) -> WaitReason {
    match place(req, workers) {
        Placement::Wait(why) => why,
        Placement::Place { worker } => panic!("expected to wait, placed on {worker}"),
    }
}

fn task(id: u32, priority: i32, submitted_ms: u64, req: Requirements) -> QueuedTask<u32> {
    QueuedTask {
        id,
        priority,
        submitted_ms,
        requirements: req,
    }
}

#[test]
fn each_requirement_is_matched() {
    let arch = Requirements {
        arch: Some("aarch64".into()),
        ..cpus(1)
    };
    assert_eq!(
        placed(&arch, &[w("a", 8, 8), w("b", 2, 2).arch("aarch64")]),
        "b"
    );

    let labels = Requirements {
        labels: vec!["browser".into(), "gpu".into()],
        ..cpus(1)
    };
    let ws = [
        w("a", 8, 8).labels(&["browser"]),
        w("b", 2, 2).labels(&["browser", "gpu", "ssd"]),
    ];
    assert_eq!(placed(&labels, &ws), "b");

    assert_eq!(placed(&cpus(4), &[w("a", 2, 64), w("b", 8, 1)]), "b");

    let memory = Requirements {
        memory_bytes: 8 * GIB,
        ..cpus(1)
    };
    assert_eq!(placed(&memory, &[w("a", 64, 4), w("b", 2, 16)]), "b");

    let gpus = Requirements { gpus: 1, ..cpus(1) };
    assert_eq!(placed(&gpus, &[w("a", 64, 64), w("b", 2, 2).gpus(1)]), "b");

    // Free, not total, capacity counts; an exact fit fits.
    let ws = [w("a", 8, 8).busy(6, 0, 0), w("b", 4, 8).busy(0, 0, 0)];
    assert_eq!(placed(&cpus(4), &ws), "b");
    assert_eq!(placed(&cpus(2), &[w("a", 8, 8).busy(6, 0, 0)]), "a");
    let ws = [
        w("a", 8, 8).busy(0, 7, 0),
        w("b", 8, 8).gpus(1).busy(0, 0, 1),
    ];
    assert!(matches!(
        place(
            &Requirements {
                memory_bytes: 2 * GIB,
                gpus: 1,
                ..cpus(1)
            },
            &ws
        ),
        Placement::Wait(_)
    ));
}

#[test]
fn only_ready_workers_are_chosen() {
    let ws = [
        w("a", 8, 8).busy(7, 0, 0),
        w("b", 64, 64).state(WorkerState::Draining),
        w("c", 64, 64).state(WorkerState::Lost),
        w("d", 64, 64).state(WorkerState::Down),
    ];
    assert_eq!(
        placed(&cpus(1), &ws),
        "a",
        "the busy ready worker, not the idle others"
    );
    let why = waits(&cpus(2), &ws);
    assert!(
        !why.is_unsatisfiable(),
        "b, c and d could take it once back"
    );
    assert_eq!(
        why.to_string(),
        "3 of 4 workers are not ready (4 checked: a: needs 2 cpus, 1 free, b: draining, c: lost, d: down)"
    );
    let ws = &ws[1..];
    assert_eq!(
        waits(&cpus(1), ws).to_string(),
        "no worker is ready (3 checked: b: draining, c: lost, d: down)"
    );
    assert!(pick_next(&[task(1, 0, 0, cpus(1))], ws).is_empty());
}

#[test]
fn equal_workers_take_turns() {
    let ws = [w("a", 4, 8), w("b", 4, 8)];
    let queue: Vec<_> = (0..4).map(|i| task(i, 0, u64::from(i), cpus(1))).collect();
    let got = pick_next(&queue, &ws);
    assert_eq!(
        got,
        [
            (0, "a".into()),
            (1, "b".into()),
            (2, "a".into()),
            (3, "b".into())
        ]
    );
    // The same through `place`, with the caller applying reservations.
    let mut ws = ws.to_vec();
    let mut order = Vec::new();
    for _ in 0..4 {
        let name = placed(&cpus(1), &ws);
        let i = ws.iter().position(|w| w.name == name).unwrap();
        ws[i].reserved = add(ws[i].reserved, demand(&cpus(1)));
        order.push(name);
    }
    assert_eq!(order, ["a", "b", "a", "b"]);
}

#[test]
fn spread_minimises_the_most_loaded_resource() {
    // a: cpus idle but memory nearly full; b: half its cpus busy, memory free.
    let ws = [w("a", 8, 16).busy(0, 14, 0), w("b", 8, 16).busy(4, 0, 0)];
    let req = Requirements {
        memory_bytes: GIB,
        ..cpus(1)
    };
    assert_eq!(placed(&req, &ws), "b", "max(5/8, 1/16) < max(1/8, 15/16)");
    // A bigger worker is less loaded by the same task.
    assert_eq!(
        placed(&cpus(2), &[w("small", 4, 8), w("big", 16, 8)]),
        "big"
    );
    // Ties go by name, whatever the input order.
    assert_eq!(placed(&cpus(1), &[w("b", 4, 8), w("a", 4, 8)]), "a");
    // A worker without gpus is not "fully loaded" on gpus.
    assert_eq!(
        placed(
            &cpus(1),
            &[w("a", 4, 8).gpus(1), w("b", 4, 8).busy(1, 0, 0)]
        ),
        "a"
    );
}

#[test]
fn queue_goes_by_priority_then_submit_time_then_position() {
    let one = [w("solo", 4, 8)];
    let queue = [task(1, 0, 1, cpus(4)), task(2, 5, 2, cpus(4))];
    assert_eq!(
        pick_next(&queue, &one),
        [(2, "solo".into())],
        "priority first"
    );
    let queue = [task(1, -1, 10, cpus(4)), task(2, -1, 5, cpus(4))];
    assert_eq!(
        pick_next(&queue, &one),
        [(2, "solo".into())],
        "then the older one"
    );
    let queue = [task(7, 0, 5, cpus(4)), task(3, 0, 5, cpus(4))];
    assert_eq!(
        pick_next(&queue, &one),
        [(7, "solo".into())],
        "then queue order"
    );
}

#[test]
fn a_task_that_does_not_fit_does_not_block_smaller_ones() {
    let queue = [task(1, 9, 0, cpus(8)), task(2, 0, 1, cpus(2))];
    assert_eq!(pick_next(&queue, &[w("a", 4, 8)]), [(2, "a".into())]);
}

#[test]
fn one_pass_never_over_commits() {
    let ws = [w("a", 4, 8), w("b", 4, 8)];
    let queue: Vec<_> = (0..10).map(|i| task(i, 0, 0, cpus(2))).collect();
    let got = pick_next(&queue, &ws);
    assert_eq!(got.len(), 4);
    assert_eq!(got.iter().filter(|(_, w)| w == "a").count(), 2);

    let mem = Requirements {
        memory_bytes: 3 * GIB,
        ..cpus(0)
    };
    let queue: Vec<_> = (0..10).map(|i| task(i, 0, 0, mem.clone())).collect();
    assert_eq!(
        pick_next(&queue, &ws).len(),
        4,
        "two 3 GiB tasks per 8 GiB worker"
    );
}

/// A tiny deterministic generator, so the property test needs no extra dependency.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

/// `pick_grouped` on the queue grouped by requirements gives `pick_next`'s answer.
#[test]
fn grouped_picking_is_the_same_as_picking_task_by_task() {
    let mut rng = Lcg(11);
    for _ in 0..500 {
        let workers: Vec<WorkerView> = (0..1 + rng.below(4))
            .map(|i| {
                let cpus = 1 + rng.below(6);
                let mut v = w(&format!("w{i}"), cpus, 1 + rng.below(8)).gpus(rng.below(2));
                v.labels = ["browser", "ssd"]
                    .iter()
                    .filter(|_| rng.below(2) == 0)
                    .map(|s| s.to_string())
                    .collect();
                v.reserved = Capacity {
                    cpus: rng.below(cpus + 1),
                    ..Capacity::default()
                };
                v
            })
            .collect();
        let queue: Vec<QueuedTask<u64>> = (0..rng.below(40))
            .map(|id| QueuedTask {
                id,
                priority: rng.below(3) as i32,
                submitted_ms: rng.below(4),
                requirements: Requirements {
                    cpus: rng.below(3) as u32,
                    memory_bytes: rng.below(3) * GIB,
                    gpus: rng.below(2) as u32,
                    labels: if rng.below(3) == 0 {
                        vec!["browser".to_owned()]
                    } else {
                        Vec::new()
                    },
                    ..Requirements::default()
                },
            })
            .collect();
        let mut classes: Vec<(Requirements, Vec<(_, u64)>)> = Vec::new();
        let mut sorted: Vec<&QueuedTask<u64>> = queue.iter().collect();
        sorted.sort_by_key(|t| (std::cmp::Reverse(t.priority), t.submitted_ms, t.id));
        for t in sorted {
            let key = (std::cmp::Reverse(t.priority), t.submitted_ms, t.id);
            match classes.iter_mut().find(|(r, _)| *r == t.requirements) {
                Some((_, tasks)) => tasks.push((key, t.id)),
                None => classes.push((t.requirements.clone(), vec![(key, t.id)])),
            }
        }
        let mut none_ahead = vec![false; workers.len()];
        let grouped: Vec<(u64, String)> = pick_grouped(
            classes
                .iter()
                .map(|(r, tasks)| (r, tasks.iter().cloned()))
                .collect(),
            &workers,
            &mut none_ahead,
        )
        .into_iter()
        .map(|p| (p.id, p.worker))
        .collect();
        assert_eq!(grouped, pick_next(&queue, &workers));
    }
}

/// Ahead: a full worker takes one task beyond its capacity, only one, only when nothing has
/// room now, only if the task fits its totals, and the least loaded eligible one first.
#[test]
fn one_task_goes_ahead_per_eligible_worker_when_nothing_has_room() {
    let full = |name: &str, busy: u64| w(name, 2, 8).busy(busy, 0, 0);
    let workers = [full("a", 2), full("b", 2), w("small", 1, 8).busy(1, 0, 0)];
    let two = cpus(2);
    let tasks: Vec<_> = (0..5u64)
        .map(|i| ((std::cmp::Reverse(0), 0, i), i))
        .collect();
    let mut eligible = vec![true, false, true];
    let picked = pick_grouped(vec![(&two, tasks.into_iter())], &workers, &mut eligible);
    assert_eq!(
        picked,
        vec![Picked {
            id: 0,
            worker: "a".into(),
            ahead: true
        }],
        "b is not eligible and two cpus never fit small"
    );
    assert_eq!(eligible, vec![false, false, true]);
    // Room now beats going ahead, and the less loaded worker is held first.
    let workers = [full("a", 2), full("b", 1), w("c", 2, 8).busy(2, 0, 0)];
    let one = cpus(1);
    let tasks: Vec<_> = (0..4u64)
        .map(|i| ((std::cmp::Reverse(0), 0, i), i))
        .collect();
    let mut eligible = vec![true, true, true];
    let picked = pick_grouped(vec![(&one, tasks.into_iter())], &workers, &mut eligible);
    let got: Vec<(u64, &str, bool)> = picked
        .iter()
        .map(|p| (p.id, p.worker.as_str(), p.ahead))
        .collect();
    assert_eq!(
        got,
        vec![
            (0, "b", false),
            (1, "a", true),
            (2, "b", true),
            (3, "c", true)
        ]
    );
}

#[test]
fn random_queues_are_placed_exactly_within_capacity() {
    let mut rng = Lcg(7);
    let states = WorkerState::ALL;
    let archs = ["x86_64", "aarch64"];
    let labels = ["browser", "gpu", "ssd"];
    for _ in 0..300 {
        let workers: Vec<WorkerView> = (0..rng.below(6))
            .map(|i| {
                let cpus = 1 + rng.below(8);
                let mut v = w(&format!("w{i}"), cpus, 1 + rng.below(16))
                    .arch(archs[rng.below(2) as usize])
                    .gpus(rng.below(3))
                    .state(states[rng.below(4) as usize]);
                v.labels = labels
                    .iter()
                    .filter(|_| rng.below(2) == 0)
                    .map(|s| s.to_string())
                    .collect();
                v.reserved = Capacity {
                    cpus: rng.below(cpus + 1),
                    memory_bytes: rng.below(v.memory_bytes + 1),
                    gpus: rng.below(v.gpus + 1),
                };
                v
            })
            .collect();
        let queue: Vec<QueuedTask<u64>> = (0..rng.below(20))
            .map(|id| QueuedTask {
                id,
                priority: rng.below(3) as i32,
                submitted_ms: rng.below(5),
                requirements: Requirements {
                    arch: (rng.below(3) == 0).then(|| archs[rng.below(2) as usize].to_owned()),
                    cpus: rng.below(4) as u32,
                    memory_bytes: rng.below(4) * GIB,
                    gpus: rng.below(2) as u32,
                    labels: labels
                        .iter()
                        .filter(|_| rng.below(4) == 0)
                        .map(|s| s.to_string())
                        .collect(),
                },
            })
            .collect();
        let got = pick_next(&queue, &workers);

        let mut reserved: Vec<Capacity> = workers.iter().map(|w| w.reserved).collect();
        let mut seen = std::collections::BTreeSet::new();
        for (id, name) in &got {
            assert!(seen.insert(*id), "task {id} assigned twice");
            let t = &queue[*id as usize];
            let i = workers.iter().position(|w| &w.name == name).unwrap();
            let free = sub(workers[i].total(), reserved[i]);
            assert_eq!(
                first_failure(&t.requirements, &workers[i], Some(free)),
                None,
                "task {id} does not fit {name}"
            );
            reserved[i] = add(reserved[i], demand(&t.requirements));
        }
        for (i, w) in workers.iter().enumerate() {
            let (r, t) = (reserved[i], w.total());
            let initial = w.reserved;
            for res in Resource::ALL {
                assert!(
                    res.of(r) <= res.of(t).max(res.of(initial)),
                    "{} over-committed on {res:?}",
                    w.name
                );
            }
        }
        // Maximal: whatever is left could not fit anywhere after the pass.
        for t in queue.iter().filter(|t| !seen.contains(&t.id)) {
            for (i, w) in workers.iter().enumerate() {
                let free = sub(w.total(), reserved[i]);
                assert!(
                    first_failure(&t.requirements, w, Some(free)).is_some(),
                    "task {} was left though {} fits",
                    t.id,
                    w.name
                );
            }
        }
        // Higher priority never waits while a lower one with the same needs got placed.
        for t in queue.iter().filter(|t| !seen.contains(&t.id)) {
            for (id, _) in &got {
                let p = &queue[*id as usize];
                if p.requirements == t.requirements {
                    assert!(
                        p.priority >= t.priority,
                        "task {} (priority {}) placed before {} ({})",
                        p.id,
                        p.priority,
                        t.id,
                        t.priority
                    );
                }
            }
        }
    }
}

#[test]
fn explanations_name_the_first_failure_of_each_worker() {
    let req = Requirements {
        arch: Some("aarch64".into()),
        labels: vec!["browser".into()],
        ..cpus(4)
    };
    let ws = [
        w("a", 8, 8).labels(&["browser"]).busy(6, 0, 0),
        w("b", 8, 8)
            .arch("aarch64")
            .labels(&["browser"])
            .state(WorkerState::Lost),
        w("c", 8, 8)
            .arch("aarch64")
            .labels(&["browser"])
            .busy(6, 0, 0),
    ];
    let why = waits(&req, &ws);
    assert!(!why.is_unsatisfiable());
    assert_eq!(
        why.to_string(),
        "no ready worker has 4 cpus free (3 checked: a: arch x86_64 ≠ aarch64, b: lost, c: needs 4 cpus, 2 free)"
    );
    assert_eq!(why.headline(), "no ready worker has 4 cpus free");
    assert_eq!(
        why.checked()[0],
        Checked {
            worker: "a".into(),
            blocker: Blocker::Arch {
                has: "x86_64".into(),
                wants: "aarch64".into()
            }
        }
    );

    let browser = Requirements {
        labels: vec!["browser".into()],
        ..cpus(1)
    };
    let ws = [
        w("a", 8, 8).labels(&["browser"]).state(WorkerState::Lost),
        w("b", 8, 8),
        w("c", 8, 8).labels(&["gpu"]),
    ];
    assert_eq!(
        waits(&browser, &ws).to_string(),
        "no ready worker has label browser (3 checked: a: lost, b: no label browser, c: no label browser)"
    );

    let browser4 = Requirements {
        labels: vec!["browser".into()],
        ..cpus(4)
    };
    let ws = [
        w("a", 8, 8).labels(&["browser"]).busy(6, 0, 0),
        w("b", 8, 8),
        w("c", 8, 8),
    ];
    assert_eq!(
        waits(&browser4, &ws).to_string(),
        "2 of 3 workers lack label browser (3 checked: a: needs 4 cpus, 2 free, b: no label browser, c: no label browser)"
    );

    let big = Requirements {
        memory_bytes: 6 * GIB,
        gpus: 1,
        ..cpus(1)
    };
    let ws = [
        w("a", 8, 8).gpus(1).busy(0, 3, 0),
        w("b", 8, 8).gpus(2).busy(0, 0, 2),
        w("c", 8, 8).gpus(1),
        w("d", 8, 8).gpus(1).busy(0, 4, 0),
    ];
    assert_eq!(placed(&big, &ws), "c");
    let ws = [ws[0].clone(), ws[1].clone(), ws[3].clone()];
    assert_eq!(
        waits(&big, &ws).to_string(),
        "2 of 3 workers have less than 6 GiB memory free (3 checked: a: needs 6 GiB memory, \
         5 GiB free, b: needs 1 gpu, 0 free, d: needs 6 GiB memory, 4 GiB free)"
    );
    // A tie goes to the later check; "fewer than 1" reads as "no".
    let ws = [ws[0].clone(), ws[1].clone()];
    assert_eq!(
        waits(&big, &ws).headline(),
        "1 of 2 workers has no gpu free"
    );
}

#[test]
fn requirements_no_worker_can_ever_meet_are_unsatisfiable() {
    let ws = [w("a", 8, 64), w("b", 4, 8).state(WorkerState::Lost)];
    let why = waits(&cpus(64), &ws);
    assert!(why.is_unsatisfiable());
    assert_eq!(
        why.to_string(),
        "needs 64 cpus, the largest known worker has 8 (2 checked: a: needs 64 cpus, has 8, b: needs 64 cpus, has 4)"
    );
    let mem = Requirements {
        memory_bytes: 512 * GIB,
        ..cpus(1)
    };
    assert_eq!(
        waits(&mem, &ws).headline(),
        "needs 512 GiB memory, the largest known worker has 64 GiB"
    );
    let gpu = Requirements { gpus: 1, ..cpus(1) };
    assert_eq!(waits(&gpu, &ws).to_string(), "needs 1 gpu, no known worker has any (2 checked: a: needs 1 gpu, has none, b: needs 1 gpu, has none)");
    let gpus = Requirements { gpus: 2, ..cpus(1) };
    assert_eq!(
        waits(&gpus, &[w("a", 8, 8).gpus(1)]).headline(),
        "needs 2 gpus, no known worker has more than 1"
    );
    let riscv = Requirements {
        arch: Some("riscv64".into()),
        ..cpus(1)
    };
    assert_eq!(
        waits(&riscv, &ws).headline(),
        "no known worker has arch riscv64"
    );

    // Each requirement is met somewhere, never together.
    let both = Requirements {
        arch: Some("aarch64".into()),
        labels: vec!["browser".into()],
        ..cpus(1)
    };
    let ws2 = [
        w("a", 8, 8).arch("aarch64"),
        w("b", 8, 8).labels(&["browser"]),
    ];
    let why = waits(&both, &ws2);
    assert!(why.is_unsatisfiable());
    assert_eq!(
        why.to_string(),
        "no known worker meets all its requirements at once (2 checked: a: no label browser, b: arch x86_64 ≠ aarch64)"
    );

    // The static checks ignore state: a lost worker that fits means "wait", not "never".
    let why = waits(
        &cpus(4),
        &[w("a", 2, 8), w("b", 8, 8).state(WorkerState::Down)],
    );
    assert!(!why.is_unsatisfiable());
    // Busy is not unsatisfiable either.
    assert!(!waits(&cpus(4), &[w("a", 4, 8).busy(1, 0, 0)]).is_unsatisfiable());

    let why = waits(&cpus(1), &[]);
    assert!(why.is_unsatisfiable());
    assert_eq!(why.to_string(), "no worker has registered yet");
}

#[test]
fn long_explanations_stay_one_line() {
    let ws: Vec<_> = (0..12)
        .map(|i| w(&format!("w{i:02}"), 8, 8).state(WorkerState::Down))
        .collect();
    let text = waits(&cpus(1), &ws).to_string();
    assert!(
        text.starts_with("no worker is ready (12 checked: w00: down, "),
        "{text}"
    );
    assert!(text.ends_with("w07: down, and 4 more)"), "{text}");
    assert!(!text.contains('\n'));
}

#[test]
fn view_from_worker_info() {
    let info = WorkerInfo {
        name: "pi-1".into(),
        state: WorkerState::Ready,
        connected: true,
        address: "10.0.0.2:40000".into(),
        version: "drover-worker 0.1.0".into(),
        protocol_version: 1,
        first_seen_ms: 0,
        registered_ms: 0,
        state_changed_ms: 0,
        last_heartbeat_ms: 0,
        last_heartbeat_age_ms: 0,
        resources: ResourceReport {
            arch: "aarch64".into(),
            os: "Debian".into(),
            kernel: "6.1".into(),
            hostname: "pi-1".into(),
            cpu_count: 4,
            cpu_model: "Cortex-A76".into(),
            load: LoadAvg::default(),
            memory_total_bytes: 8 * GIB,
            memory_available_bytes: 6 * GIB,
            work_dir: "/var/lib/drover-worker".into(),
            disk_total_bytes: 0,
            disk_free_bytes: 0,
            gpus: vec![Gpu {
                vendor: GpuVendor::NvidiaTegra,
                model: "Orin".into(),
                memory_bytes: None,
            }],
            cgroup: CgroupVersion::V2,
            namespaces: true,
            labels: vec!["browser".into(), "gpu".into()],
        },
        usage: Usage::default(),
    };
    let v = WorkerView::from(&info);
    assert_eq!(
        v,
        WorkerView {
            name: "pi-1".into(),
            state: WorkerState::Ready,
            arch: "aarch64".into(),
            cpus: 4,
            memory_bytes: 8 * GIB,
            gpus: 1,
            labels: vec!["browser".into(), "gpu".into()],
            reserved: Capacity::default(),
        }
    );
    let busy = WorkerView::new(
        &info,
        Capacity {
            cpus: 3,
            memory_bytes: 9 * GIB,
            gpus: 0,
        },
    );
    assert_eq!(
        busy.free(),
        Capacity {
            cpus: 1,
            memory_bytes: 0,
            gpus: 1
        },
        "never below zero"
    );
}
