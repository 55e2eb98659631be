//! Offline-first attempts end to end with the real binaries: `on_disconnect = "keep_running"`,
//! the worker's on-disk event spool, and resending after a reconnect.
//!
//! - A keep_running task survives a stalled worker (declared lost, then back) and a coordinator
//!   SIGKILL + restart: it finishes once, in its single epoch, every line it printed stored
//!   once and in order.
//! - Everything a task prints while the coordinator is down is there after it returns — more
//!   than the spool holds, so the task is slowed down (backpressure) rather than losing any.
//! - A worker SIGKILLed while its keep_running task runs: the task's processes die with it, the
//!   restarted worker removes the dead attempt's workspace, and the task is rescheduled and
//!   finishes once.
//! - A worker that comes back after `lost_after` has its stale attempt killed (fencing), and
//!   nothing of it is stored; one that stays disconnected stops the attempt itself.
//! - An attempt whose spool cannot be created is reported at once and retried.
//!
//! The session checker is the one of tests/tasks.rs: positions contiguous from 0, worker seqs
//! contiguous within each epoch, no event of a superseded epoch, exactly one `completed`, last.
//! Running tasks needs the sandbox (namespaces and cgroups), so these tests need root; without
//! it they print a loud SKIPPED line and pass. CI runs as root.

use drover_protocol::task::TaskState;
use drover_protocol::WorkerState;
use drover_tests::{
    check_session, kinds, process_with, root_or_skip, signal, submit, task, wait_state, write_spec,
    TestFleet, DEADLINE,
};
use nix::sys::signal::Signal;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Long enough for a task to finish after a restart on this busy 2-core machine.
const FINISH: Duration = Duration::from_secs(60);

fn try_events(fleet: &TestFleet, id: &str) -> Result<Vec<Value>, String> {
    let out = fleet.cli(&["events", id, "--json"]);
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).map_err(|e| e.to_string()))
        .collect()
}

fn events(fleet: &TestFleet, id: &str) -> Vec<Value> {
    try_events(fleet, id).unwrap_or_else(|e| panic!("events {id} failed: {e}"))
}

/// The whole session read in slices of `step` events, small enough that a slice of 16 KiB
/// output chunks fits one frame whatever the server's own paging does.
fn events_in_slices(fleet: &TestFleet, id: &str, step: u64) -> Vec<Value> {
    let mut all = Vec::new();
    loop {
        let (from, to) = (all.len() as u64, all.len() as u64 + step);
        let out = fleet.cli(&[
            "events",
            id,
            "--json",
            "--from",
            &from.to_string(),
            "--to",
            &to.to_string(),
        ]);
        assert!(
            out.status.success(),
            "events {from}..{to}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let before = all.len();
        for l in String::from_utf8_lossy(&out.stdout).lines() {
            all.push(serde_json::from_str::<Value>(l).expect("each line is JSON"));
        }
        if all.len() == before {
            return all;
        }
    }
}

/// The attempt's workspace as the test sees it from the host.
fn workspace(fleet: &TestFleet, worker: &str, id: &str, epoch: u64) -> PathBuf {
    fleet
        .dir()
        .join("work")
        .join(worker)
        .join("tasks")
        .join(format!("{id}-{epoch}"))
}

/// The counter a task keeps in its workspace (0 before it starts).
fn count(ws: &Path) -> u64 {
    std::fs::read_to_string(ws.join("count"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn wait_count(fleet: &TestFleet, ws: &Path, at_least: u64, what: &str) -> u64 {
    fleet.wait_for(FINISH, what, || {
        let n = count(ws);
        (n >= at_least).then_some(n).ok_or(n)
    })
}

/// Prints `line N` and a `progress` event per step until a `stop` file appears in its
/// workspace, keeping the step in `count`; then `final N`.
const COUNTER: &str = r#"i=0; while [ ! -e stop ]; do i=$((i+1)); echo "line $i"; echo "{\"type\":\"progress\",\"n\":$i}" >&$DROVER_EVENTS_FD; echo $i > count.tmp; mv count.tmp count; sleep 0.02; done; echo "final $i""#;

fn counter_spec(fleet: &TestFleet, extra: &str) -> PathBuf {
    let toml = format!(
        "name = \"counter\"\ncommand = [\"sh\", \"-c\", {COUNTER:?}]\n{extra}\n[retry]\nmax_attempts = 1\n"
    );
    write_spec(fleet, "counter", &toml)
}

/// Lines `line 1` .. `line N` each exactly once and in order, then `final N`; returns N.
fn check_counter_output(out: &str) -> u64 {
    let mut want = 1;
    let mut last = None;
    for l in out.lines() {
        if let Some(n) = l.strip_prefix("line ") {
            assert_eq!(
                n.parse::<u64>().ok(),
                Some(want),
                "line {want} expected, got {l:?}"
            );
            want += 1;
        } else if let Some(n) = l.strip_prefix("final ") {
            last = n.parse::<u64>().ok();
        } else {
            panic!("unexpected output line {l:?}");
        }
    }
    assert_eq!(last, Some(want - 1), "`final` names the last line");
    want - 1
}

#[test]
fn keep_running_task_survives_a_stalled_worker_and_a_coordinator_crash() {
    if !root_or_skip("keep_running_task_survives_a_stalled_worker_and_a_coordinator_crash") {
        return;
    }
    let mut fleet = TestFleet::started(1);
    let spec = counter_spec(
        &fleet,
        "on_disconnect = \"keep_running\"\nlost_after = \"60s\"",
    );
    let id = submit(&fleet, &spec);
    wait_state(&fleet, &id, TaskState::Running, DEADLINE);
    let ws = workspace(&fleet, "w1", &id, 1);
    wait_count(&fleet, &ws, 5, "the task to count");

    // 1. The worker stalls past its lease (the link is dead for the coordinator), then resumes.
    signal(fleet.worker_process("w1"), Signal::SIGSTOP);
    fleet.wait_worker_state("w1", WorkerState::Lost);
    let lost = task(&fleet, &id).expect("task show");
    assert_eq!(
        lost.state,
        TaskState::Running,
        "kept while its worker is lost: {lost:?}"
    );
    signal(fleet.worker_process("w1"), Signal::SIGCONT);
    fleet.wait_for(DEADLINE, "the attempt to be reattached", || {
        let evs = try_events(&fleet, &id)?;
        kinds(&evs)
            .contains(&"attempt_reattached".to_owned())
            .then_some(())
            .ok_or_else(|| format!("{:?}", kinds(&evs).last()))
    });
    fleet.wait_worker_state("w1", WorkerState::Ready);

    // 2. The coordinator is killed; the task keeps running and spooling; it comes back.
    let before = count(&ws);
    fleet.stop_coordinator(Signal::SIGKILL);
    wait_count(
        &fleet,
        &ws,
        before + 30,
        "the task to go on while the coordinator is down",
    );
    let down_until = count(&ws);
    fleet.start_coordinator_and_wait();
    wait_count(
        &fleet,
        &ws,
        down_until + 10,
        "the task to go on after the restart",
    );
    std::fs::write(ws.join("stop"), b"").expect("write the stop file");

    let t = wait_state(&fleet, &id, TaskState::Succeeded, FINISH);
    assert_eq!((t.attempts, t.epoch), (1, 1), "never restarted: {t:?}");
    let all = events(&fleet, &id);
    check_session(&all);
    let reattached = kinds(&all)
        .iter()
        .filter(|k| *k == "attempt_reattached")
        .count();
    assert!(
        reattached >= 2,
        "reattached after the stall and after the restart: {:?}",
        kinds(&all)
    );
    assert!(
        !kinds(&all).contains(&"attempt_ended".to_owned()),
        "{:?}",
        kinds(&all)
    );
    // Every line, the ones printed while the coordinator was down included, once and in order.
    let last = check_counter_output(&drover_tests::output(&all, "stdout"));
    assert!(last > down_until, "{last} > {down_until}");
    let progress: Vec<u64> = all
        .iter()
        .filter(|e| e["kind"] == "progress")
        .filter_map(|e| e["payload"]["n"].as_u64())
        .collect();
    assert_eq!(
        progress,
        (1..=last).collect::<Vec<_>>(),
        "progress events once each, in order"
    );
}

#[test]
fn output_while_the_coordinator_is_down_is_spooled_bounded_and_all_delivered() {
    if !root_or_skip("output_while_the_coordinator_is_down_is_spooled_bounded_and_all_delivered") {
        return;
    }
    let mut fleet = TestFleet::new(1);
    // The worker's defaults make every task keep_running, with the smallest spool (4 MiB).
    let spool_max: u64 = 4 << 20;
    let toml = format!(
        "spool_max_bytes = {spool_max}\non_disconnect = \"keep_running\"\nlost_after_ms = 120000\n{}",
        fleet.worker_toml("w1", &["test".to_owned()])
    );
    std::fs::write(fleet.worker_config("w1"), toml).expect("write worker config");
    fleet.start_coordinator();
    fleet.start_all_workers();
    fleet.wait_all_ready();
    // About 10.9 MB of numbered lines once `go` appears: more than the spool, the event
    // channel and the pipe hold together, so the task cannot finish while nobody acknowledges.
    let lines: u64 = 1_500_000;
    let spec = write_spec(
        &fleet,
        "burst",
        &format!(
            "name = \"burst\"\ncommand = [\"sh\", \"-c\", \"while [ ! -e go ]; do sleep 0.05; done; seq 1 {lines}; touch produced\"]\n[retry]\nmax_attempts = 1\n"
        ),
    );
    let id = submit(&fleet, &spec);
    wait_state(&fleet, &id, TaskState::Running, DEADLINE);
    let ws = workspace(&fleet, "w1", &id, 1);
    let spool = fleet.dir().join("work/w1/spool").join(format!("{id}-1"));
    fleet.stop_coordinator(Signal::SIGKILL);
    std::fs::write(ws.join("go"), b"").expect("write the go file");
    let spool_bytes = || -> u64 {
        std::fs::read_dir(&spool)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum()
    };
    let full = fleet.wait_for(FINISH, "the spool to fill up to its bound", || {
        let b = spool_bytes();
        (b >= spool_max).then_some(b).ok_or(b)
    });
    // At the bound the task is held back, not allowed to run ahead: it cannot have finished.
    assert!(
        full < spool_max + (64 << 10),
        "the spool stays at its bound: {full}"
    );
    assert!(
        !ws.join("produced").exists(),
        "the task was not slowed down"
    );
    assert!(spool_bytes() < spool_max + (64 << 10));
    fleet.start_coordinator_and_wait();
    let t = wait_state(&fleet, &id, TaskState::Succeeded, Duration::from_secs(120));
    assert_eq!((t.attempts, t.epoch), (1, 1), "{t:?}");
    let all = events_in_slices(&fleet, &id, 40);
    check_session(&all);
    let out = drover_tests::output(&all, "stdout");
    let mut want = 1u64;
    for l in out.lines() {
        assert_eq!(
            l.parse::<u64>().ok(),
            Some(want),
            "line {want} expected, got {l:?}"
        );
        want += 1;
    }
    assert_eq!(want - 1, lines, "every line delivered once");
    fleet.wait_for(DEADLINE, "the spool to be removed", || {
        (!spool.exists()).then_some(()).ok_or("still there")
    });
}

#[test]
fn worker_killed_under_keep_running_reschedules_and_finishes_once() {
    if !root_or_skip("worker_killed_under_keep_running_reschedules_and_finishes_once") {
        return;
    }
    let mut fleet = TestFleet::started(1);
    let marker = "917263";
    let spec = write_spec(
        &fleet,
        "twice",
        &format!(
            "name = \"twice\"\non_disconnect = \"keep_running\"\nlost_after = \"60s\"\ncommand = [\"sh\", \"-c\", \"echo attempt $DROVER_ATTEMPT; if [ $DROVER_ATTEMPT -ge 2 ]; then exit 0; fi; sleep {marker}\"]\n"
        ),
    );
    let id = submit(&fleet, &spec);
    wait_state(&fleet, &id, TaskState::Running, DEADLINE);
    fleet.wait_for(DEADLINE, "the task's process to start", || {
        process_with(marker).then_some(()).ok_or("not yet")
    });
    fleet.wait_for(DEADLINE, "the first attempt's output to be stored", || {
        let evs = try_events(&fleet, &id)?;
        (drover_tests::output(&evs, "stdout") == "attempt 1\n")
            .then_some(())
            .ok_or_else(|| drover_tests::output(&evs, "stdout"))
    });
    fleet.stop_worker("w1", Signal::SIGKILL);
    // The sandbox's init dies with the worker, and the whole tree with it: nothing to reattach.
    fleet.wait_for(
        DEADLINE,
        "the task's processes to die with the worker",
        || (!process_with(marker)).then_some(()).ok_or("still running"),
    );
    fleet.start_worker("w1");
    let t = wait_state(&fleet, &id, TaskState::Succeeded, FINISH);
    assert_eq!((t.attempts, t.epoch), (2, 2), "{t:?}");
    let all = events(&fleet, &id);
    check_session(&all);
    let ended: Vec<&Value> = all
        .iter()
        .filter(|e| e["kind"] == "attempt_ended")
        .collect();
    assert_eq!(ended.len(), 1, "{:?}", kinds(&all));
    assert_eq!(ended[0]["payload"]["reason"], "worker_restarted");
    let out = drover_tests::output(&all, "stdout");
    assert_eq!(out, "attempt 1\nattempt 2\n", "each attempt's output once");
    // Its few events never left the worker's memory (see worker-agent's outbox), so only its
    // workspace is left on disk to clean up.
    assert!(
        fleet
            .worker_log("w1")
            .contains("removing the workspaces of attempts that died"),
        "the dead attempt's workspace is removed at start"
    );
}

#[test]
fn worker_back_after_lost_after_has_its_stale_attempt_killed() {
    if !root_or_skip("worker_back_after_lost_after_has_its_stale_attempt_killed") {
        return;
    }
    let mut fleet = TestFleet::started(2);
    let marker = "917264";
    let spec = write_spec(
        &fleet,
        "fenced",
        &format!(
            "name = \"fenced\"\non_disconnect = \"keep_running\"\nlost_after = \"2s\"\ncommand = [\"sh\", \"-c\", \"echo attempt $DROVER_ATTEMPT; if [ $DROVER_ATTEMPT -ge 2 ]; then exit 0; fi; sleep {marker}\"]\n"
        ),
    );
    let id = submit(&fleet, &spec);
    let first = wait_state(&fleet, &id, TaskState::Running, DEADLINE);
    let victim = first.worker.expect("running on a worker");
    fleet.wait_for(DEADLINE, "the task's process to start", || {
        process_with(marker).then_some(()).ok_or("not yet")
    });
    fleet.wait_for(DEADLINE, "the first attempt's output to be stored", || {
        let evs = try_events(&fleet, &id)?;
        (drover_tests::output(&evs, "stdout") == "attempt 1\n")
            .then_some(())
            .ok_or_else(|| drover_tests::output(&evs, "stdout"))
    });
    // Stalled past its lease and past lost_after: the task moves on without it.
    signal(fleet.worker_process(&victim), Signal::SIGSTOP);
    let t = wait_state(&fleet, &id, TaskState::Succeeded, FINISH);
    assert_eq!(t.attempts, 2, "{t:?}");
    assert_ne!(t.worker.as_deref(), Some(victim.as_str()));
    assert!(
        process_with(marker),
        "the stalled worker's attempt is still there"
    );
    // Back: its attempt is stale, so it is killed (told at re-registration, or fenced on its
    // next event), and nothing of it is stored.
    signal(fleet.worker_process(&victim), Signal::SIGCONT);
    fleet.wait_for(DEADLINE, "the stale attempt to be killed", || {
        (!process_with(marker)).then_some(()).ok_or("still running")
    });
    let all = events(&fleet, &id);
    check_session(&all);
    let ended: Vec<&Value> = all
        .iter()
        .filter(|e| e["kind"] == "attempt_ended")
        .collect();
    assert_eq!(ended.len(), 1, "{:?}", kinds(&all));
    assert_eq!(ended[0]["payload"]["reason"], "worker_lost");
    assert_eq!(
        drover_tests::output(&all, "stdout"),
        "attempt 1\nattempt 2\n"
    );
    fleet.wait_worker_state(&victim, WorkerState::Ready);
}

#[test]
fn an_attempt_that_cannot_spool_is_retried_at_once() {
    if !root_or_skip("an_attempt_that_cannot_spool_is_retried_at_once") {
        return;
    }
    let fleet = TestFleet::started(1);
    // A plain file where the first attempt's spool directory must go (the first task is t1).
    let spool_root = fleet.dir().join("work/w1/spool");
    std::fs::create_dir_all(&spool_root).expect("create the spool root");
    std::fs::write(spool_root.join("t1-1"), b"in the way").expect("block the spool");
    let spec = write_spec(
        &fleet,
        "blocked",
        "name = \"blocked\"\ncommand = [\"echo\", \"ran\"]\n[retry]\nbackoff = \"100ms\"\n",
    );
    let id = submit(&fleet, &spec);
    assert_eq!(id, "t1");
    let t = wait_state(&fleet, &id, TaskState::Succeeded, DEADLINE);
    assert_eq!((t.attempts, t.epoch), (2, 2), "{t:?}");
    let all = events(&fleet, &id);
    check_session(&all);
    let ended: Vec<&Value> = all
        .iter()
        .filter(|e| e["kind"] == "attempt_ended")
        .collect();
    assert_eq!(ended.len(), 1, "{:?}", kinds(&all));
    assert_eq!(ended[0]["payload"]["reason"], "attempt_lost_on_worker");
    assert_eq!(
        drover_tests::output(&all, "stdout"),
        "ran\n",
        "the first attempt never ran"
    );
    assert!(fleet
        .worker_log("w1")
        .contains("cannot create the attempt's spool"));
}

#[test]
fn worker_stops_a_keep_running_attempt_disconnected_past_lost_after() {
    if !root_or_skip("worker_stops_a_keep_running_attempt_disconnected_past_lost_after") {
        return;
    }
    let mut fleet = TestFleet::started(1);
    let marker = "917265";
    let spec = write_spec(
        &fleet,
        "orphan",
        &format!(
            "name = \"orphan\"\non_disconnect = \"keep_running\"\nlost_after = \"1s\"\ncommand = [\"sh\", \"-c\", \"echo attempt $DROVER_ATTEMPT; if [ $DROVER_ATTEMPT -ge 2 ]; then exit 0; fi; sleep {marker}\"]\n[retry]\nbackoff = \"100ms\"\n"
        ),
    );
    let id = submit(&fleet, &spec);
    wait_state(&fleet, &id, TaskState::Running, DEADLINE);
    fleet.wait_for(DEADLINE, "the task's process to start", || {
        process_with(marker).then_some(()).ok_or("not yet")
    });
    // The coordinator goes away and stays away: past lost_after the worker stops the attempt
    // itself, since it could not be reattached any more.
    fleet.stop_coordinator(Signal::SIGKILL);
    fleet.wait_for(FINISH, "the worker to stop the orphaned attempt", || {
        (!process_with(marker)).then_some(()).ok_or("still running")
    });
    // The worker says why it stopped the attempt (logged before the kill; waited for all the
    // same, as the log is another process's file).
    fleet.wait_for(
        DEADLINE,
        "the worker to log why it stopped the attempt",
        || {
            let log = fleet.worker_log("w1");
            log.contains("disconnected for longer than lost_after")
                .then_some(())
                .ok_or_else(|| drover_tests::tail(&log, 20))
        },
    );
    // Back: the attempt is not reported, so it is retried, and finishes once.
    fleet.start_coordinator_and_wait();
    let t = wait_state(&fleet, &id, TaskState::Succeeded, FINISH);
    assert_eq!((t.attempts, t.epoch), (2, 2), "{t:?}");
    let all = events(&fleet, &id);
    check_session(&all);
    assert!(
        drover_tests::output(&all, "stdout").ends_with("attempt 2\n"),
        "{}",
        drover_tests::output(&all, "stdout")
    );
}
