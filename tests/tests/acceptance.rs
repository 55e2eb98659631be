//! Acceptance criteria, the self-evaluation loop and the independent verdict, end to end with
//! the real binaries (issue 6): its four acceptance points, then the docs' example.
//!
//! - a task that needs two iterations (it reads `DROVER_FEEDBACK_FILE` and fixes its output)
//!   ends `satisfied` after exactly 2, with the events in order, and `submit --follow` shows
//!   the progress and exits 0;
//! - a task that never satisfies its criteria ends `failed` with `max_iterations_reached`
//!   after exactly `max_iterations`;
//! - a task whose criteria pass on its worker but whose declared outputs lack what they check
//!   is `rejected` by the verdict, which ran on the other worker;
//! - a worker SIGKILLed during iteration 2 is replaced and the task resumes at iteration 2 on
//!   the other worker, with the feedback of iteration 1 (`task show` tells the iteration while
//!   it runs).
//!
//! And the docs' own example and the other half of the verdict point:
//! - `examples/agent.toml`, the coding-agent example of docs/task-spec.md, ends `verified`
//!   with the session, `--follow` lines and `task show` lines the docs show;
//! - a task whose declared output is there but wrong (the "agent" made its own test pass
//!   instead of fixing the code) passes on its worker and is `rejected` by the verdict.
//!
//! Running tasks needs the sandbox (namespaces and cgroups), so these tests need root; without
//! it they print a loud SKIPPED line and pass. CI runs as root.

use drover_protocol::task::{TaskInfo, TaskState};
use drover_tests::{events, of_kind, root_or_skip, submit, task, write_spec, TestFleet, DEADLINE};
use nix::sys::signal::Signal;
use serde_json::Value;
use std::time::Duration;

fn wait_final(fleet: &TestFleet, id: &str, deadline: Duration) -> TaskInfo {
    fleet.wait_for(deadline, &format!("task {id} to end"), || {
        match task(fleet, id) {
            Ok(t) if t.state.is_final() => Ok(t),
            Ok(t) => Err(format!(
                "{} (attempts {}, iteration {}, reason {:?})",
                t.state, t.attempts, t.iteration, t.reason
            )),
            Err(e) => Err(e),
        }
    })
}

/// The task id `drover submit --follow` printed first, after checking that its output shows
/// every line of `shown`.
fn followed(stdout: &str, shown: &[&str]) -> String {
    for line in shown {
        assert!(stdout.contains(line), "--follow shows {line:?}:\n{stdout}");
    }
    stdout
        .lines()
        .next()
        .expect("the id first")
        .trim()
        .to_owned()
}

/// Kinds of the session without the chatter (output chunks).
fn kinds(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["kind"].as_str().unwrap_or("").to_owned())
        .filter(|k| k != "stdout" && k != "stderr")
        .collect()
}

/// The spec of a task that writes 41 first and 42 once the feedback names its criterion.
const FIXER: &str = r#"
name = "fixer"
command = ["sh", "-c", """
if [ -n "$DROVER_FEEDBACK_FILE" ] && grep -q '"name":"answer"' "$DROVER_FEEDBACK_FILE"; then
  echo 42 > answer.txt
else
  echo 41 > answer.txt
fi
echo "iteration $DROVER_ITERATION wrote $(cat answer.txt)"
"""]
outputs = ["answer.txt"]
max_iterations = 3

[[acceptance]]
name = "answer"
command = ["sh", "-c", "grep -qx 42 answer.txt || { echo \"answer.txt holds $(cat answer.txt), want 42\"; exit 1; }"]
timeout = "30s"
"#;

#[test]
fn two_iterations_then_satisfied_with_the_events_in_order() {
    if !root_or_skip("two_iterations_then_satisfied_with_the_events_in_order") {
        return;
    }
    let fleet = TestFleet::started(1);
    let spec = write_spec(&fleet, "fixer", FIXER);
    let out = fleet.cli(&["submit", spec.to_str().expect("utf-8"), "--follow"]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "submit --follow exits 0 for satisfied: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = followed(
        &stdout,
        &[
            "iteration 1 of 3",
            "[iteration 1] answer: FAILED (exit 1): answer.txt holds 41, want 42",
            "iteration 2 of 3",
            "[iteration 2] answer: passed",
        ],
    );
    let t = task(&fleet, &id).expect("task show");
    assert_eq!(
        (t.state, t.iteration, t.attempts),
        (TaskState::Satisfied, 2, 1),
        "{t:?}"
    );
    let all = events(&fleet, &id, &[]);
    assert_eq!(
        kinds(&all),
        [
            "submitted",
            "assigned",
            "started",
            "iteration_started",
            "criterion_checked",
            "iteration_started",
            "criterion_checked",
            "outputs_stored",
            "exited",
            "completed"
        ]
    );
    let checks = of_kind(&all, "criterion_checked");
    let first = &checks[0]["payload"];
    assert_eq!(
        (&first["iteration"], &first["passed"], &first["exit"]),
        (&Value::from(1), &Value::from(false), &Value::from(1))
    );
    assert!(first["excerpt"]
        .as_str()
        .unwrap_or("")
        .contains("answer.txt holds 41, want 42"));
    let second = &checks[1]["payload"];
    assert_eq!(
        (&second["iteration"], &second["passed"]),
        (&Value::from(2), &Value::from(true))
    );
    let iterations: Vec<&Value> = of_kind(&all, "iteration_started")
        .iter()
        .map(|e| &e["payload"]["n"])
        .collect();
    assert_eq!(iterations, [&Value::from(1), &Value::from(2)]);
    let completed = of_kind(&all, "completed");
    assert_eq!(completed[0]["payload"]["state"], "satisfied");
    // The stored output is the fixed one, and `task show` tells the progress.
    let shown = String::from_utf8_lossy(&fleet.cli(&["task", "show", &id]).stdout).into_owned();
    assert!(
        shown.contains("Iteration: 2 of max_iterations 3"),
        "{shown}"
    );
    assert!(shown.contains("Criteria:  answer passed"), "{shown}");
}

#[test]
fn never_satisfied_ends_max_iterations_reached_after_exactly_max_iterations() {
    if !root_or_skip("never_satisfied_ends_max_iterations_reached_after_exactly_max_iterations") {
        return;
    }
    let fleet = TestFleet::started(1);
    let spec = write_spec(
        &fleet,
        "hopeless",
        r#"
name = "hopeless"
command = ["sh", "-c", "echo try $DROVER_ITERATION >> tries.txt"]
max_iterations = 3

[[acceptance]]
name = "impossible"
command = ["sh", "-c", "cat tries.txt; exit 7"]
"#,
    );
    let out = fleet.cli(&["submit", spec.to_str().expect("utf-8"), "--follow"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "submit --follow exits 1 for failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .expect("the id")
        .trim()
        .to_owned();
    let t = wait_final(&fleet, &id, DEADLINE);
    assert_eq!(
        (t.state, t.iteration, t.attempts),
        (TaskState::Failed, 3, 1),
        "{t:?}"
    );
    let reason = t.reason.clone().unwrap_or_default();
    assert!(
        reason.starts_with("max_iterations_reached: 3 of 3"),
        "{reason}"
    );
    let all = events(&fleet, &id, &[]);
    let n: Vec<u64> = of_kind(&all, "iteration_started")
        .iter()
        .filter_map(|e| e["payload"]["n"].as_u64())
        .collect();
    assert_eq!(n, [1, 2, 3], "exactly max_iterations iterations");
    let checks = of_kind(&all, "criterion_checked");
    assert_eq!(checks.len(), 3);
    assert!(checks
        .iter()
        .all(|c| c["payload"]["passed"] == false && c["payload"]["exit"] == 7));
    // The same workspace each time: the third check saw all three tries.
    assert!(checks[2]["payload"]["excerpt"]
        .as_str()
        .unwrap_or("")
        .contains("try 1\ntry 2\ntry 3"));
    assert_eq!(
        of_kind(&all, "completed")[0]["payload"]["reason"]
            .as_str()
            .map(|r| r.starts_with("max_iterations_reached")),
        Some(true)
    );
}

#[test]
fn criteria_pass_on_the_worker_but_the_verdict_elsewhere_rejects_missing_output() {
    if !root_or_skip("criteria_pass_on_the_worker_but_the_verdict_elsewhere_rejects_missing_output")
    {
        return;
    }
    let fleet = TestFleet::started(2);
    // The report is written beside the declared outputs, not in them: the worker's own check
    // sees it, the verdict (which gets only the stored outputs) does not.
    let spec = write_spec(
        &fleet,
        "sloppy",
        r#"
name = "sloppy"
command = ["sh", "-c", "mkdir -p out; echo summary > out/summary.txt; echo '{\"ok\":true}' > report.json"]
outputs = ["out/*"]

[[acceptance]]
name = "report"
command = ["sh", "-c", "test -s report.json || { echo 'report.json is missing'; ls -R; exit 1; }"]

[verdict]
"#,
    );
    let id = submit(&fleet, &spec);
    let t = wait_final(&fleet, &id, DEADLINE);
    assert_eq!(t.state, TaskState::Rejected, "{t:?}");
    assert_eq!((t.attempts, t.iteration), (1, 1));
    let v = t.verdict.clone().expect("a verdict");
    assert_eq!(v.passed, Some(false));
    let all = events(&fleet, &id, &[]);
    assert_eq!(
        kinds(&all),
        [
            "submitted",
            "assigned",
            "started",
            "iteration_started",
            "criterion_checked",
            "outputs_stored",
            "exited",
            "verdict_requested",
            "assigned",
            "started",
            "verdict_outputs_unpacked",
            "criterion_checked",
            "exited",
            "completed"
        ]
    );
    let assigned = of_kind(&all, "assigned");
    let work_worker = assigned[0]["payload"]["worker"].as_str().expect("worker");
    let verdict_worker = assigned[1]["payload"]["worker"].as_str().expect("worker");
    assert_eq!(assigned[1]["payload"]["kind"], "verdict");
    assert_ne!(
        work_worker, verdict_worker,
        "the verdict ran on the other worker"
    );
    assert_eq!(v.worker.as_deref(), Some(verdict_worker));
    assert_eq!(v.work_worker.as_deref(), Some(work_worker));
    // The verdict's epoch is its own, and its events came from its worker's epoch.
    assert_eq!(assigned[1]["epoch"], 2);
    let checks = of_kind(&all, "criterion_checked");
    assert_eq!(checks[0]["payload"]["passed"], true, "passed on the worker");
    assert_eq!(checks[1]["epoch"], 2);
    assert_eq!(checks[1]["payload"]["verdict"], true);
    assert_eq!(
        checks[1]["payload"]["passed"], false,
        "failed in the verdict"
    );
    let excerpt = checks[1]["payload"]["excerpt"].as_str().unwrap_or("");
    assert!(excerpt.contains("report.json is missing"), "{excerpt}");
    assert!(
        excerpt.contains("summary.txt"),
        "the verdict saw the stored outputs: {excerpt}"
    );
    assert_eq!(
        of_kind(&all, "verdict_outputs_unpacked")[0]["payload"]["files"],
        1
    );
    assert_eq!(
        of_kind(&all, "completed")[0]["payload"]["state"],
        "rejected"
    );
    let out = fleet.cli(&["task", "show", &id]);
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains(&format!(
            "Verdict:   FAILED on {verdict_worker} (work by {work_worker}"
        )),
        "{shown}"
    );
}

#[test]
fn a_worker_killed_during_iteration_2_is_replaced_and_the_task_resumes_at_iteration_2() {
    if !root_or_skip(
        "a_worker_killed_during_iteration_2_is_replaced_and_the_task_resumes_at_iteration_2",
    ) {
        return;
    }
    let mut fleet = TestFleet::started(2);
    // Iteration 1 drafts; iteration 2 needs iteration 1's feedback (exit 3 without it), and
    // on the first attempt hangs until its worker is killed.
    let spec = write_spec(
        &fleet,
        "resumer",
        r#"
name = "resumer"
command = ["sh", "-c", """
if [ "$DROVER_ITERATION" = 1 ]; then echo draft > answer.txt; exit 0; fi
grep -q '"iteration":1' "$DROVER_FEEDBACK_FILE" || { echo "no feedback for iteration $DROVER_ITERATION"; exit 3; }
if [ "$DROVER_ATTEMPT" = 1 ]; then sleep 600; fi
echo 42 > answer.txt
"""]
max_iterations = 3

[retry]
max_attempts = 3
backoff = "100ms"

[[acceptance]]
name = "answer"
command = ["grep", "-qx", "42", "answer.txt"]
"#,
    );
    let id = submit(&fleet, &spec);
    let victim = fleet.wait_for(DEADLINE, "iteration 2 to start", || {
        let t = task(&fleet, &id)?;
        match (&t.worker, t.iteration, t.state) {
            (Some(w), 2, TaskState::Running) => Ok(w.clone()),
            _ => Err(format!("{} at iteration {}", t.state, t.iteration)),
        }
    });
    // `task show` tells the progress while it runs, not only at the end.
    let shown = String::from_utf8_lossy(&fleet.cli(&["task", "show", &id]).stdout).into_owned();
    assert!(
        shown.contains("Iteration: 2 of max_iterations 3"),
        "{shown}"
    );
    // Criteria show the current iteration's results (docs/task-spec.md): none yet, as this
    // attempt's iteration 2 never gets to its checks.
    assert!(!shown.contains("Criteria:"), "{shown}");
    fleet.stop_worker(&victim, Signal::SIGKILL);
    let t = wait_final(&fleet, &id, Duration::from_secs(40));
    assert_eq!(
        (t.state, t.iteration, t.attempts),
        (TaskState::Satisfied, 2, 2),
        "{t:?}"
    );
    assert_ne!(
        t.worker.as_deref(),
        Some(victim.as_str()),
        "on the other worker"
    );
    let all = events(&fleet, &id, &[]);
    let ended = of_kind(&all, "attempt_ended");
    assert_eq!(ended[0]["payload"]["reason"], "worker_lost");
    let assigned = of_kind(&all, "assigned");
    assert_eq!(assigned.len(), 2);
    assert_eq!(
        assigned[1]["payload"]["iteration"], 2,
        "resumes at iteration 2"
    );
    // Iterations per epoch: 1 and 2 on the first worker, only 2 on its replacement.
    let per_epoch = |epoch: u64| -> Vec<u64> {
        of_kind(&all, "iteration_started")
            .iter()
            .filter(|e| e["epoch"] == epoch)
            .filter_map(|e| e["payload"]["n"].as_u64())
            .collect()
    };
    assert_eq!(per_epoch(1), [1, 2]);
    assert_eq!(per_epoch(2), [2]);
    let checks = of_kind(&all, "criterion_checked");
    assert_eq!(checks.len(), 2, "iteration 1 failed, iteration 2 passed");
    assert_eq!(checks[1]["epoch"], 2);
    assert_eq!(checks[1]["payload"]["passed"], true);
}

/// Kinds of the session of `examples/agent.toml` as docs/task-spec.md lists them ("The session
/// of the example"), with the `submitted` that every session starts with.
const AGENT_SESSION: [&str; 19] = [
    "submitted",
    "assigned",
    "started",
    "inputs_unpacked",
    "iteration_started",
    "criterion_checked",
    "criterion_checked",
    "iteration_started",
    "criterion_checked",
    "criterion_checked",
    "outputs_stored",
    "exited",
    "verdict_requested",
    "assigned",
    "started",
    "verdict_outputs_unpacked",
    "criterion_checked",
    "exited",
    "completed",
];

#[test]
fn the_coding_agent_example_of_the_docs_runs_as_documented() {
    if !root_or_skip("the_coding_agent_example_of_the_docs_runs_as_documented") {
        return;
    }
    let fleet = TestFleet::started(2);
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/agent.toml");
    let out = fleet.cli(&["submit", example.to_str().expect("utf-8"), "--follow"]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "submit --follow exits 0 for verified: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = followed(
        &stdout,
        &[
            "iteration 1 of 3",
            "[iteration 1] tests: FAILED (exit 1): FAIL: add 2 3 gave 6, want 5",
            "[iteration 1] output: passed",
            "iteration 2 of 3",
            "[iteration 2] tests: passed",
            "[verdict] add: passed",
        ],
    );
    let t = task(&fleet, &id).expect("task show");
    assert_eq!(
        (t.state, t.iteration, t.attempts),
        (TaskState::Verified, 2, 1),
        "{t:?}"
    );
    let all = events(&fleet, &id, &[]);
    assert_eq!(kinds(&all), AGENT_SESSION, "the session the docs show");
    let feedback_fixed = of_kind(&all, "criterion_checked")
        .iter()
        .map(|c| {
            (
                c["payload"]["name"].as_str().unwrap_or("").to_owned(),
                c["payload"]["passed"] == true,
            )
        })
        .collect::<Vec<_>>();
    assert_eq!(
        feedback_fixed,
        [
            ("tests".to_owned(), false),
            ("output".to_owned(), true),
            ("tests".to_owned(), true),
            ("output".to_owned(), true),
            ("add".to_owned(), true),
        ]
    );
    let assigned = of_kind(&all, "assigned");
    let (work, verdict) = (
        assigned[0]["payload"]["worker"].as_str().expect("worker"),
        assigned[1]["payload"]["worker"].as_str().expect("worker"),
    );
    assert_ne!(work, verdict, "the verdict ran on the other worker");
    let shown = String::from_utf8_lossy(&fleet.cli(&["task", "show", &id]).stdout).into_owned();
    for line in [
        "Iteration: 2 of max_iterations 3".to_owned(),
        "Criteria:  add passed".to_owned(),
        format!("Verdict:   passed on {verdict} (work by {work}, outputs of epoch 1)"),
    ] {
        assert!(shown.contains(&line), "task show has {line:?}:\n{shown}");
    }
}

#[test]
fn criteria_gamed_on_the_worker_are_rejected_by_the_verdict_on_the_wrong_output() {
    if !root_or_skip("criteria_gamed_on_the_worker_are_rejected_by_the_verdict_on_the_wrong_output")
    {
        return;
    }
    let fleet = TestFleet::started(2);
    // The declared output is there but wrong: the "agent" made its own test pass instead of
    // fixing the code. The worker's criterion passes; the verdict checks the output itself.
    let spec = write_spec(
        &fleet,
        "gamer",
        r#"
name = "gamer"
command = ["sh", "-c", """
mkdir -p out
echo 'echo $(($2 + $3 + 1))' > out/calc.sh
echo 'exit 0' > test.sh
"""]
outputs = ["out/"]

[[acceptance]]
name = "tests"
command = ["sh", "test.sh"]

[verdict]
[[verdict.criteria]]
name = "add"
command = ["sh", "-c", "got=$(sh out/calc.sh add 2 3); test \"$got\" = 5 || { echo \"out/calc.sh: add 2 3 gave $got, want 5\"; exit 1; }"]
"#,
    );
    let out = fleet.cli(&["submit", spec.to_str().expect("utf-8"), "--follow"]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        out.status.code(),
        Some(1),
        "submit --follow exits 1 for rejected: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = followed(
        &stdout,
        &[
            "[iteration 1] tests: passed",
            "[verdict] add: FAILED (exit 1): out/calc.sh: add 2 3 gave 6, want 5",
        ],
    );
    let t = wait_final(&fleet, &id, DEADLINE);
    assert_eq!(
        (t.state, t.iteration, t.attempts),
        (TaskState::Rejected, 1, 1),
        "{t:?}"
    );
    let all = events(&fleet, &id, &[]);
    let checks = of_kind(&all, "criterion_checked");
    assert_eq!(checks.len(), 2, "one on the worker, one in the verdict");
    assert_eq!(checks[0]["payload"]["passed"], true, "passed on the worker");
    assert_eq!(checks[1]["payload"]["verdict"], true);
    assert_eq!(
        checks[1]["payload"]["passed"], false,
        "wrong in the verdict"
    );
    assert_eq!(
        of_kind(&all, "verdict_outputs_unpacked")[0]["payload"]["files"],
        1,
        "the output was there (wrong, not missing)"
    );
    assert_eq!(
        of_kind(&all, "completed")[0]["payload"]["state"],
        "rejected"
    );
}
