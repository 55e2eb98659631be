//! A worker's connection may open only a few streams until the coordinator raises its limit
//! for each attempt it assigns (coordinator/src/server/mod.rs, `StreamBudget`). This checks
//! the promise that makes that safe: a worker given more attempts at once than the initial
//! limit allows starts every one of them at once — none waits to open its attempt stream.
//!
//! Needs root (the sandbox), like tests/tasks.rs; without it, a loud SKIPPED line.

use drover_protocol::task::{TaskInfo, TaskState};
use drover_tests::{TestFleet, DEADLINE};
use serde_json::Value;

/// More attempts than the streams a registered worker may open before any is assigned
/// (control stream + 2 spare).
const ATTEMPTS: usize = 6;

#[test]
fn many_attempts_on_one_worker_all_start_at_once() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("*** SKIPPED many_attempts_on_one_worker_all_start_at_once: running tasks needs root ***");
        return;
    }
    let fleet = TestFleet::started(1);
    let spec = fleet.dir().join("sleepy.toml");
    // No CPU reserved, so one worker takes them all however many CPUs this machine has.
    std::fs::write(
        &spec,
        "name = \"sleepy\"\ncommand = [\"sh\", \"-c\", \"echo up; sleep 4\"]\n\n[requirements]\ncpus = 0\n",
    )
    .expect("write spec");
    let ids: Vec<String> = (0..ATTEMPTS)
        .map(|_| {
            let out = fleet.cli(&["submit", spec.to_str().expect("utf-8 path")]);
            assert!(
                out.status.success(),
                "submit failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).trim().to_owned()
        })
        .collect();
    let mut first_output = Vec::new();
    let mut ended = Vec::new();
    for id in &ids {
        fleet.wait_for(DEADLINE, &format!("task {id} to succeed"), || {
            match fleet.try_cli_json::<TaskInfo>(&["task", "show", id, "--json"]) {
                Ok(t) if t.state == TaskState::Succeeded => Ok(()),
                Ok(t) => Err(format!("{}", t.state)),
                Err(e) => Err(e),
            }
        });
        let out = fleet.cli(&["events", id, "--json"]);
        assert!(out.status.success(), "events of {id}");
        let events: Vec<Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("each line is JSON"))
            .collect();
        let ts = |kind: &str| {
            events
                .iter()
                .find(|e| e["kind"] == kind)
                .and_then(|e| e["ts_ms"].as_u64())
                .unwrap_or_else(|| panic!("task {id} has no {kind} event: {events:?}"))
        };
        first_output.push(ts("stdout"));
        ended.push(ts("exited"));
    }
    // Every attempt printed before any ended: all ran side by side, none waited for a stream
    // to free up.
    let last_start = first_output.iter().max().expect("attempts");
    let first_end = ended.iter().min().expect("attempts");
    assert!(
        last_start < first_end,
        "an attempt started only after another ended (first output at {first_output:?}, ends at {ended:?})"
    );
}
