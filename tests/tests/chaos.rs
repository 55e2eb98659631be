//! The fault-injection suite of issue 5, with the real binaries: workers SIGKILLed, partitioned
//! (own network namespace, link cut), stalled (SIGSTOP) and restarted; the coordinator
//! SIGKILLed during heavy streaming; tasks OOM-killed; the worker daemon itself OOM-killed by
//! the kernel (its own memory cgroup, tests/src/host.rs); a worker's whole host dying (link
//! down and every process killed at once). After every round the independent checker
//! (`drover_tests::checker`) reads the coordinator's SQLite database directly and the workers'
//! ack logs, and fails the test on any violation: a worker-acknowledged event missing, a seq gap
//! or duplicate, a second completion, a stale epoch's event stored.
//!
//! Timing is random from a seeded RNG. The seed is printed at the start of each scenario
//! (`chaos seed: N`); replay one with `DROVER_CHAOS_SEED=N`. `DROVER_CHAOS_SCALE=K` multiplies
//! the number of rounds for longer local runs. Rounds of one scenario run on several fleets at
//! once (each fleet in its own thread, with its own port, directory and processes).
//!
//! Scenarios a–h; the table in docs/reliability.md says what each injects and checks.
//!
//! Needs root (namespaces, cgroups, `ip netns`); without it each test prints a loud SKIPPED
//! line and passes. CI runs as root. Results and counts: docs/reliability.md.

use drover_protocol::task::{TaskInfo, TaskState};
use drover_tests::checker::{self, StoredEvent, ACK_LOG_FILTER};
use drover_tests::host::HostCgroup;
use drover_tests::{process_with, root_or_skip_because, tail, task, TestFleet, DEADLINE};
use nix::sys::signal::Signal;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt as _;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

/// Longest a task may take to finish after a fault, on this busy 2-core machine.
const FINISH: Duration = Duration::from_secs(90);

/// The scenario's base seed: `DROVER_CHAOS_SEED`, else random; printed for replay.
fn seed(scenario: &str) -> u64 {
    let seed = std::env::var("DROVER_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u32>) as u64;
    eprintln!("chaos seed: {seed} ({scenario}; replay with DROVER_CHAOS_SEED={seed})");
    seed
}

/// `n` times `DROVER_CHAOS_SCALE` (default 1).
fn scaled(n: usize) -> usize {
    let k = std::env::var("DROVER_CHAOS_SCALE")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .unwrap_or(1)
        .max(1);
    n * k
}

/// A random pause in `lo..hi` milliseconds.
fn pause(rng: &mut StdRng, lo: u64, hi: u64) -> Duration {
    Duration::from_millis(rng.gen_range(lo..hi))
}

/// Run `rounds` rounds spread over `fleets` threads; `round(fleet_index, round_indices, seed)`
/// runs one thread's share. Panics from any thread fail the test after all have finished.
fn in_parallel(
    fleets: usize,
    rounds: usize,
    seed: u64,
    round: impl Fn(usize, Vec<usize>, u64) + Sync,
) {
    let round = &round;
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..fleets)
            .map(|f| {
                let mine: Vec<usize> = (0..rounds).filter(|r| r % fleets == f).collect();
                s.spawn(move || round(f, mine, seed.wrapping_add(f as u64 * 1000)))
            })
            .collect();
        let failed = handles.into_iter().filter_map(|h| h.join().err()).count();
        assert_eq!(
            failed, 0,
            "{failed} fleet(s) failed (seed {seed}); see above"
        );
    });
}

/// A fleet of `n` workers whose workers log every ack; coordinator and workers started.
fn chaos_fleet(n: usize) -> TestFleet {
    let mut fleet = TestFleet::new(n);
    fleet.start_coordinator();
    for name in fleet.worker_names.clone() {
        start_worker(&mut fleet, &name);
    }
    fleet.wait_all_ready();
    fleet
}

fn start_worker(fleet: &mut TestFleet, name: &str) {
    fleet.start_worker_with_env(name, &[("DROVER_LOG", ACK_LOG_FILTER)]);
}

fn submit(fleet: &TestFleet, name: &str, toml: &str) -> String {
    let path: PathBuf = fleet.dir().join(format!("{name}.toml"));
    std::fs::write(&path, toml).expect("write spec");
    let out = fleet.cli(&["submit", path.to_str().expect("utf-8 path")]);
    assert!(
        out.status.success(),
        "submit failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Wait until task `id` satisfies `pred`.
fn wait_task(
    fleet: &TestFleet,
    id: &str,
    what: &str,
    deadline: Duration,
    pred: impl Fn(&TaskInfo) -> bool,
) -> TaskInfo {
    fleet.wait_for(deadline, &format!("task {id} {what}"), || {
        match task(fleet, id) {
            Ok(t) if pred(&t) => Ok(t),
            Ok(t) => Err(format!(
                "{} on {:?} (attempts {}, reason {:?})",
                t.state, t.worker, t.attempts, t.reason
            )),
            Err(e) => Err(e),
        }
    })
}

fn wait_succeeded(fleet: &TestFleet, id: &str) -> TaskInfo {
    wait_task(fleet, id, "to succeed", FINISH, |t| {
        assert!(
            !matches!(t.state, TaskState::Failed | TaskState::Cancelled),
            "task {id} ended {} ({:?})",
            t.state,
            t.reason
        );
        t.state == TaskState::Succeeded
    })
}

/// Run the checker over the whole database; panics with the violations, the seed and the
/// logs. Returns the sessions for scenario-specific checks.
fn verify(
    fleet: &TestFleet,
    final_tasks: &[String],
    seed: u64,
) -> BTreeMap<String, Vec<StoredEvent>> {
    let sessions =
        checker::read_sessions(&fleet.db_path()).expect("read the coordinator's database");
    let acks = checker::merge_acks(
        fleet
            .worker_names
            .iter()
            .map(|w| checker::acks_from_log(&fleet.worker_log(w))),
    );
    let bad = checker::check(&sessions, final_tasks, &acks);
    assert!(
        bad.is_empty(),
        "checker (seed {seed}) found {} violation(s):\n{}\n{}",
        bad.len(),
        bad.join("\n"),
        fleet.log_tail()
    );
    sessions
}

/// Numbers `prefix N` printed on stdout in `epoch`, in order.
fn numbered(events: &[StoredEvent], epoch: u64, prefix: &str) -> Vec<u64> {
    checker::stdout_of(events, epoch)
        .lines()
        .filter_map(|l| l.strip_prefix(prefix)?.trim().parse().ok())
        .collect()
}

fn last_epoch(events: &[StoredEvent]) -> u64 {
    checker::epochs(events).last().copied().unwrap_or(0)
}

/// A task that counts to `steps`, checkpointing after each step and resuming from the
/// checkpoint file it is given.
fn checkpointing_spec(name: &str, steps: u32) -> String {
    checkpointing_spec_with(name, steps, "", name)
}

/// [`checkpointing_spec`] running the shell snippet `hook` in each step, before its checkpoint;
/// `$0` is `marker`, so the task's processes can be found on the host.
fn checkpointing_spec_with(name: &str, steps: u32, hook: &str, marker: &str) -> String {
    format!(
        r#"name = "{name}"
command = ["sh", "-c", '''
i=0
if [ -n "$DROVER_CHECKPOINT_FILE" ]; then i=$(sed -n 's/.*"step":\([0-9]*\).*/\1/p' "$DROVER_CHECKPOINT_FILE"); fi
echo "from $i"
while [ "$i" -lt {steps} ]; do
  echo "step $i"
  {hook}
  i=$((i+1))
  echo "{{\"type\":\"checkpoint\",\"step\":$i}}" >&$DROVER_EVENTS_FD
  sleep 0.1
done
''', "{marker}"]
[retry]
max_attempts = 10
backoff = "100ms"
"#
    )
}

/// A task that prints `line 0` .. `line {n-1}`, one every 70 ms.
fn lines_spec(name: &str, n: u32, extra: &str) -> String {
    format!(
        "name = \"{name}\"\n{extra}\ncommand = [\"sh\", \"-c\", \"i=0; while [ $i -lt {n} ]; do echo \\\"line $i\\\"; i=$((i+1)); sleep 0.07; done\"]\n[retry]\nmax_attempts = 10\nbackoff = \"100ms\"\n"
    )
}

/// The completing attempt printed every line exactly once, in order.
fn assert_all_lines(events: &[StoredEvent], id: &str, n: u64, seed: u64) {
    let epoch = last_epoch(events);
    let got = numbered(events, epoch, "line ");
    assert_eq!(
        got,
        (0..n).collect::<Vec<_>>(),
        "task {id} epoch {epoch}: every line once, in order (seed {seed})"
    );
}

/// The last attempt of a checkpointing task resumed from the last checkpoint stored before it
/// started (if any) and counted from there to the end.
fn assert_resumed(events: &[StoredEvent], id: &str, steps: u64, seed: u64) -> bool {
    let epoch = last_epoch(events);
    let assigned_pos = events
        .iter()
        .find(|e| e.kind == "assigned" && e.epoch == epoch)
        .map(|e| e.pos)
        .expect("the last epoch was assigned");
    let last_ckpt = events
        .iter()
        .rfind(|e| e.kind == "checkpoint" && e.pos < assigned_pos);
    let from = checker::stdout_of(events, epoch)
        .lines()
        .find_map(|l| l.strip_prefix("from ")?.trim().parse::<u64>().ok());
    let resumed = events
        .iter()
        .find(|e| e.kind == "resumed" && e.epoch == epoch);
    match last_ckpt {
        None => {
            assert_eq!(
                from,
                Some(0),
                "task {id}: no checkpoint, starts over (seed {seed})"
            );
            assert!(
                resumed.is_none(),
                "task {id}: `resumed` without a checkpoint"
            );
            false
        }
        Some(c) => {
            let step = c.json()["step"].as_u64().expect("checkpoint step");
            let r = resumed.unwrap_or_else(|| {
                panic!("task {id} epoch {epoch}: no `resumed` event after checkpoint at pos {} (seed {seed})", c.pos)
            });
            assert_eq!(
                r.json()["checkpoint"]["pos"].as_u64(),
                Some(c.pos),
                "task {id}: resumed from the last checkpoint (seed {seed})"
            );
            assert_eq!(
                from,
                Some(step),
                "task {id}: attempt {epoch} started at the checkpoint's step (seed {seed})"
            );
            assert_eq!(
                numbered(events, epoch, "step "),
                (step..steps).collect::<Vec<_>>(),
                "task {id}: counted from the checkpoint to the end (seed {seed})"
            );
            true
        }
    }
}

// ---------------------------------------------------------------------------------------------
// a. SIGKILL a worker mid-task.

#[test]
fn a_worker_sigkilled_mid_task_resumes_elsewhere_from_its_checkpoint() {
    if !root_or_skip_because(
        "a_worker_sigkilled_mid_task_resumes_elsewhere_from_its_checkpoint",
        "fault injection needs root (namespaces, cgroups, ip netns)",
    ) {
        return;
    }
    let seed = seed("a: worker SIGKILL");
    let rounds = scaled(50);
    let kills = std::sync::atomic::AtomicUsize::new(0);
    let resumed = std::sync::atomic::AtomicUsize::new(0);
    in_parallel(5, rounds, seed, |_, mine, seed| {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut fleet = chaos_fleet(3);
        let mut finals = Vec::new();
        for r in mine {
            let ck = submit(&fleet, &format!("ck{r}"), &checkpointing_spec("ckpt", 30));
            let ln = submit(&fleet, &format!("ln{r}"), &lines_spec("lines", 40, ""));
            let victim = wait_task(&fleet, &ck, "to run", DEADLINE, |t| {
                t.state == TaskState::Running
            })
            .worker
            .expect("running on a worker");
            wait_task(&fleet, &ln, "to run", DEADLINE, |t| {
                t.state == TaskState::Running
            });
            // Mid-task for real: the attempt has started and stored 1..10 checkpoints.
            let progress = rng.gen_range(1..10);
            fleet.wait_for(DEADLINE, "checkpoints to be stored", || {
                let sessions =
                    checker::read_sessions(&fleet.db_path()).map_err(|e| e.to_string())?;
                let n = sessions.get(&ck).map_or(0, |evs| {
                    evs.iter().filter(|e| e.kind == "checkpoint").count()
                });
                if n >= progress {
                    Ok(())
                } else {
                    Err(format!("{n} checkpoints"))
                }
            });
            std::thread::sleep(pause(&mut rng, 0, 300));
            fleet.stop_worker(&victim, Signal::SIGKILL);
            if rng.gen_bool(0.5) {
                // Back at once (it reconnects within the lease) or only after the lease.
                std::thread::sleep(Duration::from_millis(fleet.lease_ms + 300));
            }
            start_worker(&mut fleet, &victim);
            let t = wait_succeeded(&fleet, &ck);
            assert!(
                t.attempts >= 2,
                "ck{r}: the killed attempt was retried: {t:?} (seed {seed})\n{}\n--- {victim} ---\n{}",
                fleet.log_tail(),
                tail(&fleet.worker_log(&victim), 40)
            );
            wait_succeeded(&fleet, &ln);
            kills.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            finals.extend([ck.clone(), ln.clone()]);
            let sessions = verify(&fleet, &finals, seed);
            if assert_resumed(&sessions[&ck], &ck, 30, seed) {
                resumed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            assert_all_lines(&sessions[&ln], &ln, 40, seed);
        }
    });
    eprintln!(
        "a: {} worker SIGKILLs mid-task, every task completed once; {} resumed from a checkpoint (seed {seed})",
        kills.into_inner(),
        resumed.into_inner()
    );
}

// ---------------------------------------------------------------------------------------------
// b. and c. A worker cut off past its lease, then back.

/// A task that ticks for about `steps` × 0.1 s; `$0` is a marker unique to the task, so its
/// processes can be found on the host.
fn ticking_spec(marker: &str, steps: u32) -> String {
    format!(
        "name = \"tick\"\ncommand = [\"sh\", \"-c\", \"i=0; while [ $i -lt {steps} ]; do echo \\\"tick $DROVER_ATTEMPT $i\\\"; i=$((i+1)); sleep 0.1; done\", \"{marker}\"]\n[retry]\nmax_attempts = 10\nbackoff = \"100ms\"\n"
    )
}

/// After a worker came back from being cut off: exactly one completion on the other worker,
/// the stale attempt's processes gone, and its late events refused (none stored; the
/// coordinator logs the refusal or the order to kill).
fn assert_fenced(fleet: &TestFleet, id: &str, marker: &str, victim: &str, seed: u64) {
    let t = wait_succeeded(fleet, id);
    assert!(
        t.attempts >= 2,
        "{id}: moved to another attempt: {t:?} (seed {seed})"
    );
    assert_ne!(
        t.worker.as_deref(),
        Some(victim),
        "{id}: completed elsewhere (seed {seed})"
    );
    fleet.wait_for(
        DEADLINE,
        "the stale attempt's processes to be killed",
        || (!process_with(marker)).then_some(()).ok_or("still running"),
    );
    let sessions = verify(fleet, &[id.to_owned()], seed);
    let events = &sessions[id];
    let first = checker::epochs(events)[0];
    let needle = format!("task={id} ");
    let log = fleet.coordinator_log();
    // A stalled or cut-off worker still owns its socket: the liveness probe must not have
    // declared it lost (only the lease may).
    let probed = format!("worker={victim} ");
    assert!(
        !log.lines().any(|l| l.contains("liveness probe") && l.contains(&probed)),
        "{victim} was declared lost by the liveness probe although its process lives (seed {seed})\n{}",
        fleet.log_tail()
    );
    let refused = log.lines().any(|l| {
        l.contains(&needle)
            && (l.contains("refused a stale attempt event")
                || l.contains("stale attempt; telling it to kill it"))
    });
    let wlog = fleet.worker_log(victim);
    let stopped_itself = wlog.lines().any(|l| {
        l.contains(&needle)
            && l.contains(&format!("epoch={first} "))
            && l.contains("attempt stopped")
    });
    assert!(
        refused || stopped_itself,
        "{id}: no trace of the stale attempt {first} being refused or stopped (seed {seed})\n{}\n--- {victim} ---\n{}",
        fleet.log_tail(),
        tail(&wlog, 30)
    );
    eprintln!(
        "{id}: stale attempt {first} {}",
        if refused {
            "fenced by the coordinator"
        } else {
            "stopped by its worker (link dropped)"
        }
    );
}

#[test]
fn c_worker_sigstopped_past_its_lease_is_fenced_when_it_continues() {
    if !root_or_skip_because(
        "c_worker_sigstopped_past_its_lease_is_fenced_when_it_continues",
        "fault injection needs root (namespaces, cgroups, ip netns)",
    ) {
        return;
    }
    let seed = seed("c: worker SIGSTOP");
    in_parallel(3, scaled(9), seed, |f, mine, seed| {
        let mut rng = StdRng::seed_from_u64(seed);
        let fleet = chaos_fleet(2);
        for r in mine {
            let marker = format!("chaos-stop-{}-{f}-{r}", std::process::id());
            let id = submit(&fleet, "tick", &ticking_spec(&marker, 40));
            let victim = wait_task(&fleet, &id, "to run", DEADLINE, |t| {
                t.state == TaskState::Running
            })
            .worker
            .expect("on a worker");
            std::thread::sleep(pause(&mut rng, 100, 600));
            let pid = fleet.worker_pid(&victim).expect("victim runs");
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGSTOP);
            wait_task(&fleet, &id, "to run on the other worker", FINISH, |t| {
                t.attempts >= 2 && t.worker.as_deref() != Some(victim.as_str())
            });
            std::thread::sleep(pause(&mut rng, 0, 1000));
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGCONT);
            assert_fenced(&fleet, &id, &marker, &victim, seed);
        }
        // The stopped worker is back and usable.
        fleet.wait_all_ready();
    });
}

/// A network namespace with a veth pair to the host; removed on drop.
struct NetNs {
    name: String,
    host_dev: String,
    host_addr: String,
    /// `--net=/run/netns/<name>`, for `nsenter`.
    net_arg: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Namespaces one test process may have at once (scenarios b and h run side by side: b uses
/// indices 0..3, h 3..6).
const NETNS_PER_PROCESS: usize = 6;

impl NetNs {
    fn new(index: usize) -> Self {
        assert!(index < NETNS_PER_PROCESS, "netns index {index}");
        let tag = format!("{}{index}", std::process::id() % 100_000);
        // A /30 of its own per (process, index), so concurrent test runs on one host do not
        // collide.
        let net = format!(
            "10.213.{}",
            (std::process::id() % 40) * NETNS_PER_PROCESS as u32 + index as u32
        );
        let ns = NetNs {
            name: format!("drchaos{tag}"),
            host_dev: format!("dch{tag}"),
            host_addr: format!("{net}.1"),
            net_arg: format!("--net=/run/netns/drchaos{tag}"),
        };
        let peer = format!("dcn{tag}");
        let _ = Command::new("ip").args(["netns", "del", &ns.name]).output();
        ip(&["netns", "add", &ns.name]);
        ip(&[
            "link",
            "add",
            &ns.host_dev,
            "type",
            "veth",
            "peer",
            "name",
            &peer,
        ]);
        ip(&["link", "set", &peer, "netns", &ns.name]);
        ip(&[
            "addr",
            "add",
            &format!("{}/30", ns.host_addr),
            "dev",
            &ns.host_dev,
        ]);
        ip(&["link", "set", &ns.host_dev, "up"]);
        let inside = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &ns.name, "ip"];
            all.extend_from_slice(args);
            ip(&all);
        };
        inside(&["addr", "add", &format!("{net}.2/30"), "dev", &peer]);
        inside(&["link", "set", &peer, "up"]);
        inside(&["link", "set", "lo", "up"]);
        ns
    }

    /// The command prefix that runs a program in the namespace (`nsenter` execs it: the pid
    /// the test holds is the program's own).
    fn nsenter(&self) -> Vec<&str> {
        vec!["nsenter", self.net_arg.as_str()]
    }

    fn link(&self, up: bool) {
        ip(&[
            "link",
            "set",
            &self.host_dev,
            if up { "up" } else { "down" },
        ]);
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_dev])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A fleet of 2 workers (not started) whose w1 is to live in `ns` and reach the coordinator
/// over the veth (the coordinator listens on every address); w2 stays on loopback.
fn netns_fleet(ns: &NetNs) -> TestFleet {
    let fleet = TestFleet::new(2);
    let toml = std::fs::read_to_string(fleet.coordinator_config()).expect("coordinator.toml");
    std::fs::write(
        fleet.coordinator_config(),
        toml.replace("listen = \"127.0.0.1:", "listen = \"0.0.0.0:"),
    )
    .expect("rewrite coordinator.toml");
    let w1 = std::fs::read_to_string(fleet.worker_config("w1")).expect("w1.toml");
    std::fs::write(
        fleet.worker_config("w1"),
        w1.replace("127.0.0.1:", &format!("{}:", ns.host_addr)),
    )
    .expect("rewrite w1.toml");
    fleet
}

#[test]
fn b_worker_partitioned_past_its_lease_is_fenced_when_it_heals() {
    if !root_or_skip_because(
        "b_worker_partitioned_past_its_lease_is_fenced_when_it_heals",
        "fault injection needs root (namespaces, cgroups, ip netns)",
    ) {
        return;
    }
    if Command::new("ip").arg("-V").output().is_err() {
        panic!("`ip` (iproute2) is missing: install it (.ci/run does)");
    }
    let seed = seed("b: worker partition");
    in_parallel(3, scaled(9), seed, |f, mine, seed| {
        let mut rng = StdRng::seed_from_u64(seed);
        let ns = NetNs::new(f);
        let mut fleet = netns_fleet(&ns);
        fleet.start_coordinator();
        fleet.start_worker_wrapped("w1", &ns.nsenter(), &[("DROVER_LOG", ACK_LOG_FILTER)]);
        fleet.wait_worker_state("w1", drover_protocol::WorkerState::Ready);
        for r in mine {
            let marker = format!("chaos-part-{}-{f}-{r}", std::process::id());
            // Only w1 is up when the task is placed, so it runs there.
            if fleet.worker_pid("w2").is_some() {
                fleet.stop_worker("w2", Signal::SIGTERM);
            }
            let id = submit(&fleet, "tick", &ticking_spec(&marker, 40));
            wait_task(&fleet, &id, "to run on w1", DEADLINE, |t| {
                t.state == TaskState::Running && t.worker.as_deref() == Some("w1")
            });
            start_worker(&mut fleet, "w2");
            fleet.wait_worker_state("w2", drover_protocol::WorkerState::Ready);
            std::thread::sleep(pause(&mut rng, 100, 600));
            ns.link(false);
            wait_task(&fleet, &id, "to run on w2", FINISH, |t| {
                t.attempts >= 2 && t.worker.as_deref() == Some("w2")
            });
            std::thread::sleep(pause(&mut rng, 0, 1000));
            ns.link(true);
            assert_fenced(&fleet, &id, &marker, "w1", seed);
            fleet.wait_worker_state("w1", drover_protocol::WorkerState::Ready);
        }
    });
}

// ---------------------------------------------------------------------------------------------
// d. SIGKILL the coordinator during heavy event streaming.

/// A task that writes `n` structured events (and as many stdout lines) as fast as it can.
fn streaming_spec(n: u32, keep_running: bool) -> String {
    let policy = if keep_running {
        "on_disconnect = \"keep_running\"\nlost_after = \"60s\""
    } else {
        ""
    };
    format!(
        "name = \"stream\"\n{policy}\ncommand = [\"sh\", \"-c\", \"i=0; while [ $i -lt {n} ]; do echo \\\"line $i\\\"; echo \\\"{{\\\\\\\"type\\\\\\\":\\\\\\\"progress\\\\\\\",\\\\\\\"n\\\\\\\":$i}}\\\" >&$DROVER_EVENTS_FD; i=$((i+1)); done\"]\n[retry]\nmax_attempts = 10\nbackoff = \"100ms\"\n"
    )
}

#[test]
fn d_coordinator_sigkilled_while_streaming_loses_nothing_acknowledged() {
    if !root_or_skip_because(
        "d_coordinator_sigkilled_while_streaming_loses_nothing_acknowledged",
        "fault injection needs root (namespaces, cgroups, ip netns)",
    ) {
        return;
    }
    let seed = seed("d: coordinator SIGKILL");
    let n = 1500;
    let checked = std::sync::atomic::AtomicUsize::new(0);
    in_parallel(4, scaled(20), seed, |_, mine, seed| {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut fleet = chaos_fleet(2);
        let mut finals = Vec::new();
        for r in mine {
            let keep = r % 2 == 0;
            let ids: Vec<String> = (0..2)
                .map(|i| submit(&fleet, &format!("s{r}-{i}"), &streaming_spec(n, keep)))
                .collect();
            // Streaming for real: both attempts started (a worker can only keep running an
            // attempt it received), then a random moment of the stream.
            fleet.wait_for(DEADLINE, "both attempts to start streaming", || {
                let sessions =
                    checker::read_sessions(&fleet.db_path()).map_err(|e| e.to_string())?;
                let started = ids
                    .iter()
                    .filter(|id| {
                        sessions
                            .get(*id)
                            .is_some_and(|evs| evs.iter().any(|e| e.kind == "started"))
                    })
                    .count();
                if started == ids.len() {
                    Ok(())
                } else {
                    Err(format!("{started} started"))
                }
            });
            std::thread::sleep(pause(&mut rng, 0, 1000));
            fleet.stop_coordinator(Signal::SIGKILL);
            // What was acknowledged before the crash is stored, before anything can be resent.
            verify(&fleet, &finals, seed);
            std::thread::sleep(pause(&mut rng, 0, 500));
            fleet.start_coordinator_and_wait();
            for id in &ids {
                wait_succeeded(&fleet, id);
            }
            finals.extend(ids.iter().cloned());
            let sessions = verify(&fleet, &finals, seed);
            for id in &ids {
                let events = &sessions[id];
                assert_all_lines(events, id, n.into(), seed);
                let epoch = last_epoch(events);
                let ticks: Vec<u64> = events
                    .iter()
                    .filter(|e| e.epoch == epoch && e.kind == "progress")
                    .filter_map(|e| e.json()["n"].as_u64())
                    .collect();
                assert_eq!(
                    ticks,
                    (0..u64::from(n)).collect::<Vec<_>>(),
                    "{id}: every event once (seed {seed})"
                );
                if keep {
                    let kinds: Vec<(u64, &str)> = events
                        .iter()
                        .map(|e| (e.epoch, e.kind.as_str()))
                        .filter(|(_, k)| *k != "stdout" && *k != "progress")
                        .collect();
                    assert_eq!(
                        checker::epochs(events).len(),
                        1,
                        "{id}: a started keep_running attempt is reattached, not rerun (seed {seed}): {kinds:?}\n{}",
                        fleet.log_tail()
                    );
                }
            }
            checked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    });
    eprintln!(
        "d: {} coordinator SIGKILLs during streaming, nothing acknowledged lost (seed {seed})",
        checked.into_inner()
    );
}

// ---------------------------------------------------------------------------------------------
// e. OOM under retry_with_more_memory.

#[test]
fn e_oom_under_retry_with_more_memory_completes_on_a_retry() {
    if !root_or_skip_because(
        "e_oom_under_retry_with_more_memory_completes_on_a_retry",
        "fault injection needs root (namespaces, cgroups, ip netns)",
    ) {
        return;
    }
    let seed = seed("e: OOM");
    let fleet = chaos_fleet(1);
    let ids: Vec<String> = (0..scaled(3))
        .map(|i| {
            submit(
                &fleet,
                &format!("hog{i}"),
                "name = \"hog\"\ncommand = [\"sh\", \"-c\", \"dd if=/dev/zero of=/dev/null bs=60M count=1 2>/dev/null && echo fits\"]\n[limits]\nmemory = \"40MiB\"\n[retry]\nmax_attempts = 3\nbackoff = \"100ms\"\non_oom = \"retry_with_more_memory\"\nmemory_factor = 2.0\nmemory_ceiling = \"256MiB\"\n",
            )
        })
        .collect();
    for id in &ids {
        let t = wait_succeeded(&fleet, id);
        assert_eq!(t.attempts, 2, "{id}: one OOM, then success: {t:?}");
    }
    let sessions = verify(&fleet, &ids, seed);
    for id in &ids {
        let exits: Vec<_> = sessions[id].iter().filter(|e| e.kind == "exited").collect();
        assert_eq!(exits[0].json()["class"], "oom_killed", "{id}");
        assert_eq!(exits[0].json()["memory_limit_bytes"], 40 << 20, "{id}");
        assert_eq!(exits[1].json()["memory_limit_bytes"], 80 << 20, "{id}");
        assert!(
            checker::stdout_of(&sessions[id], 2).contains("fits"),
            "{id}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// f. A worker restarted while its keep_running tasks run.

#[test]
fn f_worker_restarted_under_keep_running_finishes_each_task_once() {
    if !root_or_skip_because(
        "f_worker_restarted_under_keep_running_finishes_each_task_once",
        "fault injection needs root (namespaces, cgroups, ip netns)",
    ) {
        return;
    }
    let seed = seed("f: worker restart under keep_running");
    in_parallel(2, scaled(6), seed, |_, mine, seed| {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut fleet = chaos_fleet(1);
        let mut finals = Vec::new();
        for r in mine {
            let ids: Vec<String> = (0..3)
                .map(|i| {
                    submit(
                        &fleet,
                        &format!("k{r}-{i}"),
                        &lines_spec(
                            "kept",
                            30,
                            "on_disconnect = \"keep_running\"\nlost_after = \"60s\"",
                        ),
                    )
                })
                .collect();
            for id in &ids {
                wait_task(&fleet, id, "to run", DEADLINE, |t| {
                    t.state == TaskState::Running
                });
            }
            std::thread::sleep(pause(&mut rng, 100, 1200));
            // Alternate a clean restart (SIGTERM) and a crash (SIGKILL).
            let sig = if r % 2 == 0 {
                Signal::SIGTERM
            } else {
                Signal::SIGKILL
            };
            fleet.stop_worker("w1", sig);
            std::thread::sleep(pause(&mut rng, 0, 800));
            start_worker(&mut fleet, "w1");
            for id in &ids {
                wait_succeeded(&fleet, id);
            }
            finals.extend(ids.iter().cloned());
            let sessions = verify(&fleet, &finals, seed);
            for id in &ids {
                assert_all_lines(&sessions[id], id, 30, seed);
            }
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Shared by g and h: a worker on a simulated host (tests/src/host.rs) and what its death left.

/// Wall clock in Unix-epoch milliseconds (the coordinator stamps events with the same clock).
fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Start worker `name` in `host`'s cgroup, after `inner` (e.g. `nsenter` into a namespace).
fn start_worker_on_host(fleet: &mut TestFleet, name: &str, host: &HostCgroup, inner: &[&str]) {
    let mut prefix = host.wrapper();
    prefix.extend(inner.iter().map(|s| (*s).to_owned()));
    let prefix: Vec<&str> = prefix.iter().map(String::as_str).collect();
    let mut env = vec![("DROVER_LOG", ACK_LOG_FILTER)];
    env.extend(host.worker_env());
    fleet.start_worker_wrapped(name, &prefix, &env);
}

/// Wait until task `id` has stored at least `n` checkpoints; returns the sessions.
fn wait_checkpoints(fleet: &TestFleet, id: &str, n: usize) -> BTreeMap<String, Vec<StoredEvent>> {
    fleet.wait_for(
        DEADLINE,
        &format!("{n} checkpoints of {id} to be stored"),
        || {
            let sessions = checker::read_sessions(&fleet.db_path()).map_err(|e| e.to_string())?;
            let have = sessions.get(id).map_or(0, |evs| {
                evs.iter().filter(|e| e.kind == "checkpoint").count()
            });
            if have >= n {
                Ok(sessions)
            } else {
                Err(format!("{have} checkpoints"))
            }
        },
    )
}

/// Lines of the coordinator's log saying the liveness probe declared `worker` lost.
fn probe_verdicts(fleet: &TestFleet, worker: &str) -> usize {
    let needle = format!("worker={worker} ");
    fleet
        .coordinator_log()
        .lines()
        .filter(|l| l.contains("liveness probe") && l.contains(&needle))
        .count()
}

/// After a worker died with the task `id` running (its first attempt): the task completed once,
/// on another worker, resumed from its last checkpoint; the dead attempt ended `worker_lost`,
/// the way a lost lease ends it. Returns the failover time, from `fault_ms` to the coordinator
/// assigning the next attempt.
fn assert_failed_over(fleet: &TestFleet, id: &str, victim: &str, fault_ms: u64, seed: u64) -> u64 {
    let t = wait_succeeded(fleet, id);
    assert_ne!(
        t.worker.as_deref(),
        Some(victim),
        "{id}: completed on another worker (seed {seed})"
    );
    let sessions = verify(fleet, &[id.to_owned()], seed);
    let events = &sessions[id];
    assert!(
        assert_resumed(events, id, 30, seed),
        "{id}: resumed from a checkpoint (seed {seed})"
    );
    let epochs = checker::epochs(events);
    assert!(epochs.len() >= 2, "{id}: retried: {epochs:?} (seed {seed})");
    let ended = events
        .iter()
        .find(|e| e.kind == "attempt_ended" && e.epoch == epochs[0])
        .unwrap_or_else(|| panic!("{id}: the dead attempt {} ended (seed {seed})", epochs[0]));
    assert_eq!(
        ended.json()["reason"],
        "worker_lost",
        "{id}: the dead worker's attempt ended as for a lost lease (seed {seed}): {}",
        ended.payload
    );
    let next = events
        .iter()
        .find(|e| e.kind == "assigned" && e.epoch == epochs[1])
        .expect("the next attempt was assigned");
    next.ts_ms.saturating_sub(fault_ms)
}

/// Wait until the attempt cgroups a dead worker (`pid`) left in `host` are gone (the worker's
/// next start removes them) and no process of the task (`marker`) is left.
fn assert_host_cleaned(fleet: &TestFleet, host: &HostCgroup, pid: i32, marker: &str) {
    let prefix = format!("drover-{pid}-");
    fleet.wait_for(
        DEADLINE,
        "the dead worker's attempt cgroups to be removed",
        || {
            let left: Vec<String> = host
                .children()
                .into_iter()
                .filter(|c| c.starts_with(&prefix))
                .collect();
            left.is_empty().then_some(()).ok_or(left)
        },
    );
    fleet.wait_for(DEADLINE, "the dead attempt's processes to be gone", || {
        (!process_with(marker)).then_some(()).ok_or("still running")
    });
}

/// `min / p50 / p90 / max` of `ms`, for the record (never asserted).
fn distribution(mut ms: Vec<u64>) -> String {
    ms.sort_unstable();
    if ms.is_empty() {
        return "no samples".into();
    }
    let at = |q: f64| ms[((ms.len() - 1) as f64 * q).round() as usize];
    format!(
        "n={} min {} ms, p50 {} ms, p90 {} ms, max {} ms",
        ms.len(),
        ms[0],
        at(0.5),
        at(0.9),
        ms[ms.len() - 1]
    )
}

// ---------------------------------------------------------------------------------------------
// g. The kernel's OOM killer kills the worker daemon itself.

/// Memory of the simulated host in g: room for a debug-build worker (about 30 MiB) and a small
/// task, not for the 512 MiB the task asks for at once.
const HOST_MEMORY: u64 = 192 << 20;

/// The checkpointing task of g: in the step after the file `oom-now` appears in its workspace
/// it allocates 512 MiB in one go (`dd` fills its whole buffer). The test drops the file there;
/// a retry's fresh workspace has none, so the retry just counts on.
fn hungry_spec(marker: &str) -> String {
    checkpointing_spec_with(
        "hungry",
        30,
        "if [ -e oom-now ]; then echo allocating; dd if=/dev/zero of=/dev/null bs=512M count=1 2>/dev/null; fi",
        marker,
    )
}

#[test]
fn g_worker_oom_killed_by_the_kernel_fails_over_like_a_lost_lease() {
    if !root_or_skip_because(
        "g_worker_oom_killed_by_the_kernel_fails_over_like_a_lost_lease",
        "fault injection needs root (namespaces, cgroups, ip netns)",
    ) {
        return;
    }
    let seed = seed("g: kernel OOM kills the worker");
    let probed = std::sync::atomic::AtomicUsize::new(0);
    let logged = std::sync::atomic::AtomicUsize::new(0);
    let failovers = std::sync::Mutex::new(Vec::new());
    in_parallel(3, scaled(9), seed, |f, mine, seed| {
        let mut rng = StdRng::seed_from_u64(seed);
        // Declared before the fleet, so it is removed after the fleet's processes are killed.
        let host = HostCgroup::new(
            &format!("oom-{}-{f}", std::process::id()),
            Some(HOST_MEMORY),
        );
        let mut fleet = TestFleet::new(2);
        fleet.start_coordinator();
        start_worker_on_host(&mut fleet, "w1", &host, &[]);
        fleet.wait_worker_state("w1", drover_protocol::WorkerState::Ready);
        for r in mine {
            let marker = format!("chaos-oom-{}-{f}-{r}", std::process::id());
            // Only w1 is up when the task is placed, so it runs there.
            if fleet.worker_pid("w2").is_some() {
                fleet.stop_worker("w2", Signal::SIGTERM);
            }
            let id = submit(&fleet, &format!("hungry{r}"), &hungry_spec(&marker));
            wait_task(&fleet, &id, "to run on w1", DEADLINE, |t| {
                t.state == TaskState::Running && t.worker.as_deref() == Some("w1")
            });
            start_worker(&mut fleet, "w2");
            fleet.wait_worker_state("w2", drover_protocol::WorkerState::Ready);
            let sessions = wait_checkpoints(&fleet, &id, rng.gen_range(1..10));
            let started = sessions[&id]
                .iter()
                .rfind(|e| e.kind == "started")
                .expect("the attempt started");
            let workspace = PathBuf::from(
                started.json()["workspace"]
                    .as_str()
                    .expect("`started` names the workspace"),
            );
            std::thread::sleep(pause(&mut rng, 0, 300));
            let pid = fleet.worker_pid("w1").expect("w1 runs");
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            assert_eq!(comm.trim(), "drover-worker", "w1's pid is the daemon's");
            // The OOM killer takes the process with the highest badness (memory use plus
            // oom_score_adj thousandths of the limit): the worker at 1000 outranks any task at 0
            // whatever their sizes. The tasks were forked before, with the worker's old score;
            // put them at 0 in case the test runs with a score of its own.
            std::fs::write(format!("/proc/{pid}/oom_score_adj"), "1000")
                .expect("set the worker's oom_score_adj");
            for task_pid in host.pids().into_iter().filter(|&p| p != pid) {
                let _ = std::fs::write(format!("/proc/{task_pid}/oom_score_adj"), "0");
            }
            let kills_before = host.worker_oom_kills();
            std::fs::write(workspace.join("oom-now"), "").expect("drop the trigger file");
            let status = fleet.wait_worker_exit("w1", DEADLINE);
            let died_ms = wall_ms();
            assert_eq!(
                status.signal(),
                Some(Signal::SIGKILL as i32),
                "w1 was killed (seed {seed}): {status:?}\n{}",
                tail(&fleet.worker_log("w1"), 30)
            );
            assert_eq!(
                host.worker_oom_kills() - kills_before,
                1,
                "the kernel's OOM killer killed the worker daemon (its cgroup's oom_kill counter, \
                 {}) (seed {seed})",
                host.dir().display()
            );
            // The kernel's own account, when its log is readable.
            let needle = format!("task=drover-worker,pid={pid},");
            if let Ok(out) = Command::new("dmesg").output() {
                if String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .any(|l| l.contains(&needle) && l.contains("CONSTRAINT_MEMCG"))
                {
                    logged.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
            let probes_before = probe_verdicts(&fleet, "w1");
            wait_task(&fleet, &id, "to run on w2", FINISH, |t| {
                t.attempts >= 2 && t.worker.as_deref() == Some("w2")
            });
            if probe_verdicts(&fleet, "w1") > probes_before {
                probed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            // The daemon comes back (systemd's Restart=), in the same host, at a random moment.
            std::thread::sleep(pause(&mut rng, 0, 1000));
            start_worker_on_host(&mut fleet, "w1", &host, &[]);
            let ms = assert_failed_over(&fleet, &id, "w1", died_ms, seed);
            failovers.lock().unwrap_or_else(|e| e.into_inner()).push(ms);
            assert_host_cleaned(&fleet, &host, pid, &marker);
            fleet.wait_worker_state("w1", drover_protocol::WorkerState::Ready);
        }
    });
    let failovers = failovers.into_inner().unwrap_or_else(|e| e.into_inner());
    eprintln!(
        "g: {} workers OOM-killed by the kernel (oom_kill counter +1 each, the kernel log named \
         the worker in {}), every task completed once elsewhere from its checkpoint; declared \
         lost by the liveness probe in {} of them, by the lease in the rest; failover (worker \
         death to next attempt assigned): {} (seed {seed})",
        failovers.len(),
        logged.into_inner(),
        probed.into_inner(),
        distribution(failovers.clone())
    );
}

// ---------------------------------------------------------------------------------------------
// h. A worker's host dies: no process left, no answer on the network.

#[test]
fn h_worker_host_dies_and_its_task_fails_over_on_the_lease() {
    if !root_or_skip_because(
        "h_worker_host_dies_and_its_task_fails_over_on_the_lease",
        "fault injection needs root (namespaces, cgroups, ip netns)",
    ) {
        return;
    }
    if Command::new("ip").arg("-V").output().is_err() {
        panic!("`ip` (iproute2) is missing: install it (.ci/run does)");
    }
    let seed = seed("h: host death");
    let failovers = std::sync::Mutex::new(Vec::new());
    in_parallel(3, scaled(9), seed, |f, mine, seed| {
        let mut rng = StdRng::seed_from_u64(seed);
        let ns = NetNs::new(3 + f);
        let host = HostCgroup::new(&format!("host-{}-{f}", std::process::id()), None);
        let mut fleet = netns_fleet(&ns);
        fleet.start_coordinator();
        start_worker_on_host(&mut fleet, "w1", &host, &ns.nsenter());
        fleet.wait_worker_state("w1", drover_protocol::WorkerState::Ready);
        for r in mine {
            let marker = format!("chaos-host-{}-{f}-{r}", std::process::id());
            if fleet.worker_pid("w2").is_some() {
                fleet.stop_worker("w2", Signal::SIGTERM);
            }
            let id = submit(
                &fleet,
                &format!("doomed{r}"),
                &checkpointing_spec_with("doomed", 30, "", &marker),
            );
            wait_task(&fleet, &id, "to run on w1", DEADLINE, |t| {
                t.state == TaskState::Running && t.worker.as_deref() == Some("w1")
            });
            start_worker(&mut fleet, "w2");
            fleet.wait_worker_state("w2", drover_protocol::WorkerState::Ready);
            wait_checkpoints(&fleet, &id, rng.gen_range(1..10));
            std::thread::sleep(pause(&mut rng, 0, 300));
            let pid = fleet.worker_pid("w1").expect("w1 runs");
            // The host dies: its link first, so nothing it could still send (an ICMP "port
            // unreachable" included) gets out, then at once every process on it.
            let fault_ms = wall_ms();
            ns.link(false);
            let killed = host.kill_all();
            let status = fleet.wait_worker_exit("w1", DEADLINE);
            assert_eq!(
                status.signal(),
                Some(Signal::SIGKILL as i32),
                "w1 died with its host: {status:?}"
            );
            assert!(
                killed >= 2,
                "the worker and its task's processes were on the host: {killed} killed"
            );
            wait_task(&fleet, &id, "to run on w2", FINISH, |t| {
                t.attempts >= 2 && t.worker.as_deref() == Some("w2")
            });
            // The host reboots: link back, a fresh worker with the same disk.
            std::thread::sleep(pause(&mut rng, 0, 1000));
            ns.link(true);
            start_worker_on_host(&mut fleet, "w1", &host, &ns.nsenter());
            let ms = assert_failed_over(&fleet, &id, "w1", fault_ms, seed);
            failovers.lock().unwrap_or_else(|e| e.into_inner()).push(ms);
            // A dead host answers nothing: only the lease may have declared w1 lost.
            assert_eq!(
                probe_verdicts(&fleet, "w1"),
                0,
                "the liveness probe declared a dead host's worker lost: something answered for \
                 it (seed {seed})\n{}",
                fleet.log_tail()
            );
            assert_host_cleaned(&fleet, &host, pid, &marker);
            fleet.wait_worker_state("w1", drover_protocol::WorkerState::Ready);
        }
    });
    let failovers = failovers.into_inner().unwrap_or_else(|e| e.into_inner());
    eprintln!(
        "h: {} worker hosts died (link down, every process SIGKILLed), every task completed once \
         elsewhere from its checkpoint, never declared lost by the probe; failover (host death \
         to next attempt assigned, lease {} ms): {} (seed {seed})",
        failovers.len(),
        drover_tests::LEASE_MS,
        distribution(failovers.clone())
    );
}
