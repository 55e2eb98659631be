//! Helpers the end-to-end tests share to drive one task's session through the operator CLI:
//! skip without root, write and submit a spec, read the task back, wait for a state, and read
//! the session's events as JSON values. One copy here instead of one per test file.

use crate::TestFleet;
use drover_protocol::task::{TaskInfo, TaskState};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// `true` when running as root; otherwise print a loud SKIPPED line naming `test` and saying
/// that running tasks needs root, and return `false` (the caller returns and the test passes).
pub fn root_or_skip(test: &str) -> bool {
    root_or_skip_because(test, "running tasks needs root (namespaces, cgroups)")
}

/// [`root_or_skip`] with the reason the test needs root spelled out by the caller.
pub fn root_or_skip_because(test: &str, why: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    eprintln!("*** SKIPPED {test}: {why}; CI runs it as root ***");
    false
}

/// Write the TOML spec `toml` to `<fleet dir>/<name>.toml` and return its path.
pub fn write_spec(fleet: &TestFleet, name: &str, toml: &str) -> PathBuf {
    let path = fleet.dir().join(format!("{name}.toml"));
    std::fs::write(&path, toml).expect("write spec");
    path
}

/// `drover submit <spec>`, asserting success; returns the new task's id.
pub fn submit(fleet: &TestFleet, spec: &Path) -> String {
    let out = fleet.cli(&["submit", spec.to_str().expect("utf-8 path")]);
    assert!(
        out.status.success(),
        "submit {} failed: {}",
        spec.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// `drover task show <id> --json`; the error is the CLI's message.
pub fn task(fleet: &TestFleet, id: &str) -> Result<TaskInfo, String> {
    fleet.try_cli_json(&["task", "show", id, "--json"])
}

/// Wait (bounded by `deadline`) until task `id` is in state `want` and return it.
pub fn wait_state(fleet: &TestFleet, id: &str, want: TaskState, deadline: Duration) -> TaskInfo {
    fleet.wait_for(
        deadline,
        &format!("task {id} to be {want}"),
        || match task(fleet, id) {
            Ok(t) if t.state == want => Ok(t),
            Ok(t) => Err(format!(
                "{} (attempts {}, reason {:?})",
                t.state, t.attempts, t.reason
            )),
            Err(e) => Err(e),
        },
    )
}

/// `drover events <id> --json <extra...>`, asserting success: the session (or the slice
/// `extra` selects) as one JSON value per event.
pub fn events(fleet: &TestFleet, id: &str, extra: &[&str]) -> Vec<Value> {
    let mut args = vec!["events", id, "--json"];
    args.extend_from_slice(extra);
    let out = fleet.cli(&args);
    assert!(
        out.status.success(),
        "events {id} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect()
}

/// The `kind` of each event, in order (output chunks included).
pub fn kinds(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["kind"].as_str().unwrap_or("").to_owned())
        .collect()
}

/// The concatenated `data` of the events of `kind` (`stdout` or `stderr`): what the task
/// printed there, in session order.
pub fn output(events: &[Value], kind: &str) -> String {
    events
        .iter()
        .filter(|e| e["kind"] == kind)
        .map(|e| e["payload"]["data"].as_str().unwrap_or(""))
        .collect()
}

/// The events of kind `kind`, in order.
pub fn of_kind<'a>(events: &'a [Value], kind: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["kind"] == kind).collect()
}

/// The checker of a session read through the CLI: what must hold of any session, whatever
/// happened during it. Positions contiguous from 0; `epoch` grows at each `assigned`; worker
/// seqs contiguous from 0 within each epoch, with no event of a superseded epoch stored;
/// exactly one `completed`, and it is last.
pub fn check_session(events: &[Value]) {
    for (i, e) in events.iter().enumerate() {
        assert_eq!(
            e["pos"].as_u64(),
            Some(i as u64),
            "positions contiguous from 0"
        );
    }
    let mut next_seq: std::collections::BTreeMap<u64, u64> = Default::default();
    let mut current_epoch = 0;
    for e in events {
        let epoch = e["epoch"].as_u64().unwrap_or(0);
        if e["kind"] == "assigned" {
            assert!(epoch > current_epoch, "epochs only grow");
            current_epoch = epoch;
        }
        if let Some(seq) = e["seq"].as_u64() {
            assert_eq!(
                epoch, current_epoch,
                "worker event of a superseded epoch stored: {e}"
            );
            let want = next_seq.entry(epoch).or_insert(0);
            assert_eq!(
                seq, *want,
                "seq contiguous within epoch {epoch}, no duplicates"
            );
            *want += 1;
        }
    }
    let k = kinds(events);
    assert_eq!(
        k.iter().filter(|k| *k == "completed").count(),
        1,
        "exactly one completion: {k:?}"
    );
    assert_eq!(
        k.last().map(String::as_str),
        Some("completed"),
        "completion is last"
    );
}
