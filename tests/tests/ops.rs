//! Fleet operations end to end with the real binaries (issue 5 items 4, 5, 8, 9): a task that
//! resumes from its checkpoint after its worker is SIGKILLed, an OOM retried with twice the
//! memory, a drain whose deadline moves a long task to another worker (and that survives a
//! coordinator restart), undrain, and `drover status` / `drover task show` telling all of it.
//!
//! Every session is checked as in tests/tasks.rs: positions contiguous, seqs contiguous per
//! epoch, no event of a superseded epoch, exactly one `completed`, last.
//!
//! Running tasks needs the sandbox (namespaces and cgroups), so these tests need root; without
//! it they print a loud SKIPPED line and pass. CI runs as root.

use drover_protocol::task::TaskState;
use drover_protocol::{DrainReport, WorkerState};
use drover_tests::{
    check_session, events, kinds, of_kind, process_with, root_or_skip, submit, task, wait_state,
    write_spec, TestFleet, DEADLINE,
};
use nix::sys::signal::Signal;
use serde_json::Value;
use std::time::Duration;

const MIB: u64 = 1 << 20;

/// Everything a task printed on stdout in attempt `epoch`.
fn stdout_of(events: &[Value], epoch: u64) -> String {
    events
        .iter()
        .filter(|e| e["kind"] == "stdout" && e["epoch"] == epoch)
        .map(|e| e["payload"]["data"].as_str().unwrap_or("").to_owned())
        .collect()
}

fn status_json(fleet: &TestFleet) -> Result<Value, String> {
    fleet.try_cli_json(&["status", "--json"])
}

#[test]
fn checkpoint_survives_a_worker_sigkill_and_the_next_attempt_resumes_from_it() {
    if !root_or_skip("checkpoint_survives_a_worker_sigkill_and_the_next_attempt_resumes_from_it") {
        return;
    }
    let mut fleet = TestFleet::started(2);
    // Attempt 1 checkpoints and then hangs until its worker dies; a resumed attempt prints
    // what it was given and succeeds.
    let spec = write_spec(
        &fleet,
        "resumable",
        r#"
name = "resumable"
command = ["sh", "-c", """
if [ -n "$DROVER_CHECKPOINT_FILE" ]; then
  echo "attempt=$DROVER_ATTEMPT checkpoint=$(cat "$DROVER_CHECKPOINT_FILE")"
  exit 0
fi
echo "attempt=$DROVER_ATTEMPT fresh"
echo '{"type":"checkpoint","step":1}' >&$DROVER_EVENTS_FD
echo '{"type":"checkpoint","step":7,"cursor":"abc"}' >&$DROVER_EVENTS_FD
sleep 30
"""]
[retry]
backoff = "100ms"
"#,
    );
    let id = submit(&fleet, &spec);
    let first = fleet.wait_for(DEADLINE, "both checkpoints to be stored", || {
        let all = events(&fleet, &id, &[]);
        if of_kind(&all, "checkpoint").len() == 2 {
            task(&fleet, &id)
        } else {
            Err(format!("{:?}", kinds(&all)))
        }
    });
    let victim = first.worker.clone().expect("running on a worker");
    fleet.stop_worker(&victim, Signal::SIGKILL);

    let t = wait_state(&fleet, &id, TaskState::Succeeded, Duration::from_secs(40));
    assert_eq!(t.attempts, 2, "{t:?}");
    assert_ne!(t.worker.as_deref(), Some(victim.as_str()));
    let all = events(&fleet, &id, &[]);
    check_session(&all);
    let out = stdout_of(&all, 2);
    let read = out
        .trim()
        .strip_prefix("attempt=2 checkpoint=")
        .unwrap_or_else(|| panic!("attempt 2 printed {out:?}"));
    let read: Value = serde_json::from_str(read).expect("the checkpoint file holds JSON");
    assert_eq!(
        read,
        serde_json::json!({"type": "checkpoint", "step": 7, "cursor": "abc"}),
        "attempt 2 read the last checkpoint from DROVER_CHECKPOINT_FILE"
    );
    let last_checkpoint = of_kind(&all, "checkpoint")[1];
    let resumed = of_kind(&all, "resumed");
    assert_eq!(resumed.len(), 1, "{:?}", kinds(&all));
    let r = &resumed[0]["payload"];
    assert_eq!(r["attempt"], 2);
    assert_eq!(r["checkpoint"]["pos"], last_checkpoint["pos"]);
    assert_eq!(r["checkpoint"]["epoch"], 1);
    assert_eq!(r["checkpoint"]["seq"], last_checkpoint["seq"]);
    assert_eq!(resumed[0]["epoch"], 2);
    let ended = of_kind(&all, "attempt_ended");
    assert_eq!(ended[0]["payload"]["reason"], "worker_lost");
}

#[test]
fn oom_under_retry_with_more_memory_completes_with_twice_the_limit() {
    if !root_or_skip("oom_under_retry_with_more_memory_completes_with_twice_the_limit") {
        return;
    }
    let fleet = TestFleet::started(1);
    // dd's 60 MiB buffer does not fit in 40 MiB, and does in 80 MiB. The backoff leaves time
    // to see the task retrying in `drover status`.
    let spec = write_spec(
        &fleet,
        "hog",
        r#"
name = "hog"
command = ["sh", "-c", "dd if=/dev/zero of=/dev/null bs=60M count=1 2>/dev/null && echo fits"]
[limits]
memory = "40MiB"
[retry]
max_attempts = 3
backoff = "5s"
on_oom = "retry_with_more_memory"
memory_factor = 2.0
memory_ceiling = "256MiB"
"#,
    );
    let id = submit(&fleet, &spec);
    let retrying = fleet.wait_for(DEADLINE, "the task to show as retrying in status", || {
        let s = status_json(&fleet)?;
        s["retrying"]
            .as_array()
            .and_then(|r| r.iter().find(|t| t["id"] == id.as_str()).cloned())
            .ok_or_else(|| format!("{}", s["retrying"]))
    });
    assert_eq!(retrying["attempts"], 1);
    assert_eq!(retrying["max_attempts"], 3);
    let reason = retrying["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("OOM") && reason.contains("40 MiB limit") && reason.contains("80 MiB"),
        "{reason}"
    );
    let human = fleet.cli(&["status"]);
    let human = String::from_utf8_lossy(&human.stdout);
    assert!(human.contains("RETRYING") && human.contains(&id), "{human}");
    let show = fleet.cli(&["task", "show", &id]);
    let show = String::from_utf8_lossy(&show.stdout);
    assert!(
        show.contains("queued (retrying)") && show.contains("OOM"),
        "{show}"
    );

    let t = wait_state(&fleet, &id, TaskState::Succeeded, Duration::from_secs(40));
    assert_eq!(t.attempts, 2, "{t:?}");
    let all = events(&fleet, &id, &[]);
    check_session(&all);
    let exits = of_kind(&all, "exited");
    assert_eq!(exits[0]["payload"]["class"], "oom_killed");
    assert_eq!(exits[0]["payload"]["memory_limit_bytes"], 40 * MIB);
    if let Some(peak) = exits[0]["payload"]["peak_memory_bytes"].as_u64() {
        assert!(peak > 20 * MIB && peak <= 40 * MIB, "peak {peak}");
    }
    assert_eq!(
        of_kind(&all, "retry_scheduled")[0]["payload"]["memory_bytes"],
        80 * MIB
    );
    assert_eq!(
        of_kind(&all, "assigned")[1]["payload"]["memory_bytes"],
        80 * MIB
    );
    assert_eq!(exits[1]["payload"]["class"]["exited"], 0);
    assert_eq!(exits[1]["payload"]["memory_limit_bytes"], 80 * MIB);
    assert_eq!(stdout_of(&all, 2).trim(), "fits");
}

fn drain(fleet: &TestFleet, args: &[&str]) -> DrainReport {
    let mut all = vec!["drain"];
    all.extend_from_slice(args);
    all.push("--json");
    fleet.cli_json(&all)
}

#[test]
fn drain_moves_a_long_task_at_its_deadline_undrain_reverses_and_it_survives_a_restart() {
    if !root_or_skip(
        "drain_moves_a_long_task_at_its_deadline_undrain_reverses_and_it_survives_a_restart",
    ) {
        return;
    }
    let mut fleet = TestFleet::started(2);
    let marker = "7734519";
    // One attempt only: the drained attempt must not count against it.
    let spec = write_spec(
        &fleet,
        "long",
        &format!(
            "name = \"long\"\ncommand = [\"sh\", \"-c\", \"if [ $DROVER_ATTEMPT = 1 ]; then sleep {marker}; fi; echo done on attempt $DROVER_ATTEMPT\"]\n[retry]\nmax_attempts = 1\n"
        ),
    );
    let id = submit(&fleet, &spec);
    let first = wait_state(&fleet, &id, TaskState::Running, DEADLINE);
    let busy = first.worker.clone().expect("running on a worker");
    let other = fleet
        .worker_names
        .iter()
        .find(|n| **n != busy)
        .cloned()
        .expect("two workers");

    // Drain without a deadline: no new work there, the running attempt carries on.
    let r = drain(&fleet, &[&busy]);
    assert_eq!(
        (r.previous, r.state, r.changed),
        (WorkerState::Ready, WorkerState::Draining, true)
    );
    assert_eq!(r.running, vec![id.clone()]);
    assert_eq!(r.drain.and_then(|d| d.deadline_ms), None);
    let s = status_json(&fleet).expect("status");
    assert_eq!(s["workers"]["draining"], 1);
    assert_eq!(s["draining"][0]["name"], busy.as_str());
    assert_eq!(s["draining"][0]["running"][0], id.as_str());
    let show = fleet.cli(&["task", "show", &id]);
    let show = String::from_utf8_lossy(&show.stdout);
    assert!(show.contains(&format!("{busy} (draining)")), "{show}");
    let shown = fleet.cli(&["worker", "show", &busy]);
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(
        shown.contains("Drain:") && shown.contains("no deadline"),
        "{shown}"
    );
    assert!(
        shown.contains(&format!("Running:    1 attempt ({id})")),
        "{shown}"
    );
    let quick = submit(
        &fleet,
        &write_spec(&fleet, "quick", "name = \"quick\"\ncommand = [\"true\"]\n"),
    );
    let q = wait_state(&fleet, &quick, TaskState::Succeeded, DEADLINE);
    assert_eq!(
        q.worker.as_deref(),
        Some(other.as_str()),
        "nothing new on a draining worker"
    );
    assert_eq!(task(&fleet, &id).map(|t| t.state), Ok(TaskState::Running));

    // A short deadline: the attempt is stopped there and runs again on the other worker.
    let r = drain(&fleet, &[&busy, "--deadline", "1s"]);
    assert_eq!(
        (r.previous, r.state),
        (WorkerState::Draining, WorkerState::Draining)
    );
    assert!(r.drain.and_then(|d| d.deadline_ms).is_some());
    let t = wait_state(&fleet, &id, TaskState::Succeeded, DEADLINE);
    assert_eq!(
        (t.attempts, t.worker.as_deref()),
        (2, Some(other.as_str())),
        "{t:?}"
    );
    let all = events(&fleet, &id, &[]);
    check_session(&all);
    assert_eq!(
        of_kind(&all, "attempt_ended")[0]["payload"]["reason"],
        "drained"
    );
    assert_eq!(
        of_kind(&all, "retry_scheduled")[0]["payload"]["counted"],
        false
    );
    assert_eq!(stdout_of(&all, 2).trim(), "done on attempt 2");
    fleet.wait_for(
        DEADLINE,
        "the drained attempt's processes to be killed",
        || {
            (!process_with(&format!("sleep {marker}")))
                .then_some(())
                .ok_or("still running")
        },
    );
    assert_eq!(
        fleet.worker(&busy).map(|w| w.state),
        Ok(WorkerState::Draining)
    );

    // The drain is in the registry: a coordinator restart and the worker's reconnect keep it.
    fleet.stop_coordinator(Signal::SIGKILL);
    fleet.start_coordinator_and_wait();
    fleet.wait_workers("both workers to reconnect", |list| {
        list.iter().all(|w| w.connected)
    });
    assert_eq!(
        fleet.worker(&busy).map(|w| w.state),
        Ok(WorkerState::Draining)
    );

    // Undrain: ready again; twice is a no-op that says so.
    let r: DrainReport = fleet.cli_json(&["undrain", &busy, "--json"]);
    assert_eq!(
        (r.previous, r.state, r.changed),
        (WorkerState::Draining, WorkerState::Ready, true)
    );
    assert_eq!(r.drain, None);
    let out = fleet.cli(&["undrain", &busy]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("was not drained"));
    assert_eq!(fleet.worker(&busy).map(|w| w.state), Ok(WorkerState::Ready));

    // Unknown workers and bad deadlines are clear errors with their exit codes.
    let out = fleet.cli(&["drain", "no-such-worker"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no worker named \"no-such-worker\""),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = fleet.cli(&["undrain", "no-such-worker", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let out = fleet.cli(&["drain", &busy, "--deadline", "soon"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--deadline"));
}

/// No task runs here, so no root is needed.
#[test]
fn status_shows_lost_workers() {
    let mut fleet = TestFleet::started(2);
    fleet.stop_worker("w2", Signal::SIGKILL);
    fleet.wait_worker_state("w2", WorkerState::Lost);
    let s = status_json(&fleet).expect("status");
    assert_eq!(s["lost"][0]["name"], "w2");
    assert_eq!(s["draining"].as_array().map(Vec::len), Some(0));
    let human = fleet.cli(&["status"]);
    let human = String::from_utf8_lossy(&human.stdout);
    assert!(
        human
            .lines()
            .any(|l| l.starts_with("w2") && l.contains("lost") && l.contains("no heartbeat for")),
        "{human}"
    );
}
