//! Tasks end to end with the real binaries: submit, sandboxed run, the session read back by
//! position, retries, cancel, and the two crashes the design promises to survive — a worker
//! SIGKILLed mid-task and the coordinator SIGKILLed mid-task. After each, the session is
//! checked like an independent auditor would: positions contiguous from 0, worker seqs
//! contiguous within each epoch, exactly one `completed`, no event of an epoch after it was
//! superseded.
//!
//! Running tasks needs the sandbox (namespaces and cgroups), so these tests need root; without
//! it they print a loud SKIPPED line and pass. CI runs as root.

use drover_protocol::task::TaskState;
use drover_tests::{
    check_session, events, kinds, root_or_skip, submit, task, wait_state, write_spec, TestFleet,
    DEADLINE,
};
use nix::sys::signal::Signal;
use std::time::Duration;

#[test]
fn task_runs_sandboxed_and_its_session_reads_back_by_position() {
    if !root_or_skip("task_runs_sandboxed_and_its_session_reads_back_by_position") {
        return;
    }
    let fleet = TestFleet::started(2);
    let spec = write_spec(
        &fleet,
        "hello",
        r#"
name = "hello"
command = ["sh", "-c", "echo \"hello $GREETING\"; echo \"host=$(hostname)\"; env | sort > env.txt; echo '{\"type\":\"progress\",\"pct\":50}' >&$DROVER_EVENTS_FD; echo 'not json' >&$DROVER_EVENTS_FD; cat env.txt"]
[env]
GREETING = "drover"
"#,
    );
    let id = submit(&fleet, &spec);
    let t = wait_state(&fleet, &id, TaskState::Succeeded, DEADLINE);
    assert_eq!(t.attempts, 1);
    let all = events(&fleet, &id, &[]);
    check_session(&all);
    let out = drover_tests::output(&all, "stdout");
    assert!(out.contains("hello drover"), "{out}");
    assert!(
        out.contains(&format!("host=drover-{id}")),
        "own uts namespace: {out}"
    );
    // The environment is exactly the declared variables plus DROVER_* (and a default PATH).
    for line in out
        .lines()
        .filter(|l| l.contains('=') && !l.starts_with("host=") && !l.starts_with("hello"))
    {
        let key = line.split('=').next().unwrap_or("");
        assert!(
            ["GREETING", "PATH", "PWD", "SHLVL", "_"].contains(&key) || key.starts_with("DROVER_"),
            "unexpected variable in the sandbox: {line}"
        );
    }
    let k = kinds(&all);
    assert!(
        k.contains(&"progress".to_owned()) && k.contains(&"error".to_owned()),
        "{k:?}"
    );
    // Positional slices: exactly the asked range.
    let slice = events(&fleet, &id, &["--from", "1", "--to", "3"]);
    assert_eq!(slice, all[1..3].to_vec());
}

#[test]
fn failing_task_retries_with_new_epochs_then_fails_once() {
    if !root_or_skip("failing_task_retries_with_new_epochs_then_fails_once") {
        return;
    }
    let fleet = TestFleet::started(1);
    let spec = write_spec(
        &fleet,
        "flaky",
        "name = \"flaky\"\ncommand = [\"sh\", \"-c\", \"echo try $DROVER_ATTEMPT; exit 3\"]\n[retry]\nmax_attempts = 2\nbackoff = \"100ms\"\n",
    );
    let id = submit(&fleet, &spec);
    let t = wait_state(&fleet, &id, TaskState::Failed, DEADLINE);
    assert_eq!((t.attempts, t.epoch), (2, 2));
    assert!(
        t.reason
            .as_deref()
            .unwrap_or("")
            .contains("exited with code 3"),
        "{t:?}"
    );
    let all = events(&fleet, &id, &[]);
    check_session(&all);
    assert_eq!(
        kinds(&all)
            .iter()
            .filter(|k| *k == "retry_scheduled")
            .count(),
        1
    );
    // `submit --follow` exits with the task's status.
    let out = fleet.cli(&["submit", spec.to_str().unwrap_or_default(), "--follow"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Is any process on the host running with `marker` in its command line?
fn process_with(marker: &str) -> bool {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .any(|p| {
            std::fs::read(p.path().join("cmdline"))
                .map(|c| {
                    String::from_utf8_lossy(&c)
                        .replace('\0', " ")
                        .contains(marker)
                })
                .unwrap_or(false)
        })
}

#[test]
fn cancel_kills_the_whole_tree() {
    if !root_or_skip("cancel_kills_the_whole_tree") {
        return;
    }
    let fleet = TestFleet::started(1);
    let marker = "987654";
    let spec = write_spec(
        &fleet,
        "sleeper",
        &format!("name = \"sleeper\"\ncommand = [\"sh\", \"-c\", \"setsid sh -c 'sleep {marker}' & sleep {marker}\"]\n"),
    );
    let id = submit(&fleet, &spec);
    wait_state(&fleet, &id, TaskState::Running, DEADLINE);
    fleet.wait_for(DEADLINE, "the task's processes to start", || {
        process_with(marker).then_some(()).ok_or("not yet")
    });
    let out = fleet.cli(&["cancel", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t = wait_state(&fleet, &id, TaskState::Cancelled, DEADLINE);
    assert_eq!(t.attempts, 1);
    check_session(&events(&fleet, &id, &[]));
    fleet.wait_for(
        DEADLINE,
        "every process of the task, the daemonized one too, to be gone",
        || (!process_with(marker)).then_some(()).ok_or("still running"),
    );
}

#[test]
fn worker_killed_mid_task_is_rescheduled_elsewhere_and_completes_once() {
    if !root_or_skip("worker_killed_mid_task_is_rescheduled_elsewhere_and_completes_once") {
        return;
    }
    let mut fleet = TestFleet::started(2);
    let spec = write_spec(
        &fleet,
        "slow",
        "name = \"slow\"\ncommand = [\"sh\", \"-c\", \"echo begin $DROVER_ATTEMPT; sleep 2; echo end $DROVER_ATTEMPT\"]\n",
    );
    let id = submit(&fleet, &spec);
    let first = wait_state(&fleet, &id, TaskState::Running, DEADLINE);
    let victim = first.worker.clone().expect("running on a worker");
    fleet.stop_worker(&victim, Signal::SIGKILL);
    let t = wait_state(&fleet, &id, TaskState::Succeeded, Duration::from_secs(40));
    assert_eq!(t.attempts, 2, "{t:?}");
    assert_ne!(
        t.worker.as_deref(),
        Some(victim.as_str()),
        "rescheduled on the other worker"
    );
    let all = events(&fleet, &id, &[]);
    check_session(&all);
    let ended = all
        .iter()
        .find(|e| e["kind"] == "attempt_ended")
        .expect("the lost attempt is recorded");
    assert_eq!(ended["payload"]["reason"], "worker_lost");
}

#[test]
fn coordinator_killed_mid_task_rebuilds_from_its_log() {
    if !root_or_skip("coordinator_killed_mid_task_rebuilds_from_its_log") {
        return;
    }
    let mut fleet = TestFleet::started(1);
    let spec = write_spec(
        &fleet,
        "slow",
        "name = \"slow\"\ncommand = [\"sh\", \"-c\", \"echo begin; sleep 2; echo end\"]\n",
    );
    let done = submit(
        &fleet,
        &write_spec(&fleet, "quick", "name = \"quick\"\ncommand = [\"true\"]\n"),
    );
    wait_state(&fleet, &done, TaskState::Succeeded, DEADLINE);
    let before = events(&fleet, &done, &[]);
    let id = submit(&fleet, &spec);
    wait_state(&fleet, &id, TaskState::Running, DEADLINE);
    fleet.stop_coordinator(Signal::SIGKILL);
    fleet.start_coordinator_and_wait();
    // Everything acknowledged before the crash is still there, unchanged.
    assert_eq!(events(&fleet, &done, &[]), before);
    assert_eq!(
        task(&fleet, &done).map(|t| t.state),
        Ok(TaskState::Succeeded)
    );
    // The running task carries on (its attempt died with the connection and is retried).
    let t = wait_state(&fleet, &id, TaskState::Succeeded, Duration::from_secs(40));
    assert!(t.attempts >= 1);
    check_session(&events(&fleet, &id, &[]));
}

/// Assign ahead (`assign_ahead`, on by default): a worker whose capacity is taken is given the
/// next task before the running one ends, holds it, and starts it only once the running one's
/// processes are gone — never running more than its capacity. Each task takes every CPU the
/// worker reports, so they must run one after the other.
#[test]
fn a_full_worker_holds_the_next_task_and_starts_it_when_the_first_is_gone() {
    if !root_or_skip("a_full_worker_holds_the_next_task_and_starts_it_when_the_first_is_gone") {
        return;
    }
    let fleet = TestFleet::started(1);
    // What the worker reports (and gates by), not this process's view of the machine.
    let cpus = fleet
        .try_cli_json::<drover_protocol::WorkerInfo>(&["worker", "show", "w1", "--json"])
        .expect("worker show")
        .resources
        .cpu_count;
    let spec = write_spec(
        &fleet,
        "whole",
        &format!(
            r#"
name = "whole"
command = ["sh", "-c", "echo start $(date +%s%N); sleep 2; echo end $(date +%s%N)"]
isolation = "process"
[requirements]
cpus = {cpus}
"#
        ),
    );
    let ids: Vec<String> = (0..3).map(|_| submit(&fleet, &spec)).collect();
    let mut runs = Vec::new();
    for id in &ids {
        wait_state(&fleet, id, TaskState::Succeeded, DEADLINE);
        let all = events(&fleet, id, &[]);
        check_session(&all);
        let out = drover_tests::output(&all, "stdout");
        let stamp = |word: &str| -> u128 {
            out.lines()
                .find_map(|l| l.strip_prefix(word)?.trim().parse().ok())
                .unwrap_or_else(|| panic!("no {word} stamp in {out:?}"))
        };
        let ts = |kind: &str| -> u64 {
            all.iter()
                .find(|e| e["kind"] == kind)
                .and_then(|e| e["ts_ms"].as_u64())
                .unwrap_or_else(|| panic!("no {kind} in {id}"))
        };
        let assigned = all.iter().find(|e| e["kind"] == "assigned").cloned();
        let ahead = assigned
            .as_ref()
            .and_then(|e| e["payload"]["ahead"].as_bool())
            == Some(true);
        runs.push((
            stamp("start "),
            stamp("end "),
            ts("assigned"),
            ts("completed"),
            ahead,
        ));
    }
    for pair in runs.windows(2) {
        let (first, next) = (&pair[0], &pair[1]);
        assert!(
            next.0 >= first.1,
            "the next task started before the first was gone: {runs:?}"
        );
    }
    // The second was given to the worker while the first still ran: ahead of its capacity.
    assert!(runs[1].4, "the second task went ahead: {runs:?}");
    assert!(
        runs[1].2 < runs[0].3,
        "assigned before the first completed: {runs:?}"
    );
}
