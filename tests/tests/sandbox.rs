//! Issue 4's "bad input and faults" list, end to end with the real `drover` and
//! `drover-worker` binaries: what a sandboxed task cannot do (see other processes, reach a
//! network, write outside its workspace and /tmp, read the worker's environment, keys or
//! state), limits and endings (OOM, daemons, ignored SIGTERM, timeouts), floods (100 MB of
//! output, a million events: every event once and in order, both daemons' memory bounded) and
//! bad specs.
//!
//! Each probe is a task that reports through its output; every probe that must fail is shown
//! able to succeed (the same probe with `network = "host"` or `isolation = "process"`, or the
//! test reading the path itself). Fleets live under /var/tmp: a fleet under /tmp would be
//! hidden from the task by its private /tmp whatever the sandbox did about private paths.
//!
//! Running tasks needs root (namespaces, cgroups); without it those tests print a loud SKIPPED
//! line and pass. The spec-error test needs no root.

use drover_protocol::task::{TaskInfo, TaskState};
use drover_protocol::WorkerState;
use drover_tests::{
    events, output, proc_status_bytes, process_with, root_or_skip, task, wait_state, TestFleet,
    DEADLINE,
};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where fleets are made (see the module doc).
const FLEET_PARENT: &str = "/var/tmp";
/// Generous bound for the flood tests' tasks (debug builds on a busy 2-core machine).
const FLOOD_DEADLINE: Duration = Duration::from_secs(170);
/// Memory either daemon may reach (peak RSS) while a task floods it.
const MEMORY_BOUND: u64 = 200 * 1024 * 1024;

fn fleet_builder() -> drover_tests::FleetBuilder {
    TestFleet::builder().in_dir(Path::new(FLEET_PARENT))
}

/// A fleet of one worker `w1`, everything started and ready.
fn started_fleet() -> TestFleet {
    let mut fleet = fleet_builder().worker("w1", &["test"]).build();
    fleet.start_coordinator();
    fleet.start_all_workers();
    fleet.wait_all_ready();
    fleet
}

fn write_spec(fleet: &TestFleet, name: &str, spec: &Value) -> PathBuf {
    let path = fleet.dir().join(format!("{name}.json"));
    std::fs::write(&path, spec.to_string()).expect("write spec");
    path
}

/// A sandboxed `sh -c script` task that reserves no CPU (so several fit on one worker) and
/// runs once.
fn sh_spec(name: &str, script: &str) -> Value {
    json!({
        "name": name,
        "command": ["sh", "-c", script],
        "requirements": { "cpus": 0 },
        "retry": { "max_attempts": 1 },
    })
}

fn submit(fleet: &TestFleet, name: &str, spec: &Value) -> String {
    let path = write_spec(fleet, name, spec);
    let out = fleet.cli(&["submit", path.to_str().expect("utf-8 path")]);
    assert!(
        out.status.success(),
        "submit {name} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Wait until the task ends (any final state) and return it.
fn wait_final(fleet: &TestFleet, id: &str, deadline: Duration) -> TaskInfo {
    fleet.wait_for(deadline, &format!("task {id} to end"), || {
        match task(fleet, id) {
            Ok(t) if t.state.is_final() => Ok(t),
            Ok(t) => Err(format!("{} (reason {:?})", t.state, t.reason)),
            Err(e) => Err(e),
        }
    })
}

/// The classification in the (last) `exited` event, e.g. `{"exited":0}` or `"oom_killed"`.
fn exit_class(events: &[Value]) -> Value {
    events
        .iter()
        .rev()
        .find(|e| e["kind"] == "exited")
        .map(|e| e["payload"]["class"].clone())
        .unwrap_or(Value::Null)
}

/// Run `spec` to its end; returns the task and its session.
fn run(fleet: &TestFleet, name: &str, spec: &Value) -> (TaskInfo, Vec<Value>) {
    let id = submit(fleet, name, spec);
    let t = wait_final(fleet, &id, DEADLINE);
    let all = events(fleet, &id, &[]);
    (t, all)
}

/// Positions contiguous from 0 and worker seqs contiguous from 0 within each epoch.
fn check_order(events: &[Value]) {
    let mut next_seq: BTreeMap<u64, u64> = BTreeMap::new();
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e["pos"].as_u64(), Some(i as u64), "positions contiguous");
        if let Some(seq) = e["seq"].as_u64() {
            let epoch = e["epoch"].as_u64().unwrap_or(0);
            let want = next_seq.entry(epoch).or_insert(0);
            assert_eq!(seq, *want, "seq contiguous within epoch {epoch}");
            *want += 1;
        }
    }
}

#[test]
fn sandboxed_task_sees_only_its_own_tree_and_no_network() {
    if !root_or_skip("sandboxed_task_sees_only_its_own_tree_and_no_network") {
        return;
    }
    let fleet = started_fleet();
    let worker = fleet.worker_pid("w1").expect("worker pid");
    let coordinator = fleet.coordinator_pid().expect("coordinator pid");
    // A TCP server on the host's loopback; the kernel completes connections without accept().
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
    let tcp = listener.local_addr().expect("addr").port();
    let script = format!(
        r#"for p in /proc/[0-9]*; do printf '%s ' ${{p#/proc/}}; done; echo
for pid in {worker} {coordinator}; do
  [ -e /proc/$pid ] && echo SEES $pid; kill -0 $pid 2>/dev/null && echo SIGNALS $pid
done
ls /sys/class/net | tr '\n' ' '; echo
wc -l < /proc/net/route
bash -c 'exec 3<>/dev/tcp/127.0.0.1/{tcp}' 2>/dev/null && echo TCP-CONNECTED
perl -MIO::Socket::INET -e 'my $s = IO::Socket::INET->new(PeerAddr => "127.0.0.1:{udp}", Proto => "udp") or exit 1; defined($s->send("x")) or exit 1' 2>/dev/null && echo UDP-SENT
echo end"#,
        udp = fleet.port
    );
    let (t, all) = run(&fleet, "isolated", &sh_spec("isolated", &script));
    assert_eq!(t.state, TaskState::Succeeded, "{t:?} {all:#?}");
    let stdout = output(&all, "stdout");
    // Only the sandbox's init (1) and the task's shell (2): not the worker, not the
    // coordinator, nothing else of the host.
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        ["1 2 ", "lo ", "0", "end"],
        "network none: {stdout}"
    );

    // The same probe with the host's network connects: the network probes can fail.
    let mut spec = sh_spec("host-net", &script);
    spec["network"] = json!("host");
    let (t, all) = run(&fleet, "host-net", &spec);
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}");
    let stdout = output(&all, "stdout");
    assert!(
        stdout.contains("TCP-CONNECTED") && stdout.contains("UDP-SENT"),
        "network host: {stdout}"
    );
    assert!(
        stdout.starts_with("1 2 \n"),
        "still its own pid namespace: {stdout}"
    );
    // And a process-isolated task, which is not in a pid namespace, sees both daemons.
    let mut spec = sh_spec("process", &script);
    spec["isolation"] = json!("process");
    let (_, all) = run(&fleet, "process", &spec);
    let stdout = output(&all, "stdout");
    for pid in [worker, coordinator] {
        assert!(stdout.contains(&format!("SEES {pid}")), "{stdout}");
    }
    drop(listener);
}

#[test]
fn sandboxed_task_cannot_write_outside_its_workspace_and_tmp() {
    if !root_or_skip("sandboxed_task_cannot_write_outside_its_workspace_and_tmp") {
        return;
    }
    let fleet = started_fleet();
    let fleet_dir = fleet.dir().canonicalize().expect("fleet dir");
    let work = fleet_dir.join("work/w1");
    let probe = format!("drover-probe-{}", std::process::id());
    let targets: Vec<PathBuf> = ["/", "/etc", "/usr/bin", "/var/tmp", "/root", "/var/lib"]
        .iter()
        .map(PathBuf::from)
        .chain([fleet_dir.clone(), work.clone(), work.join("tasks")])
        .collect();
    std::fs::create_dir_all(work.join("tasks")).expect("the worker's tasks directory");
    // Each target is writable from outside: the probe can fail.
    for dir in &targets {
        let file = dir.join(&probe);
        std::fs::write(&file, b"x")
            .unwrap_or_else(|e| panic!("{} is not writable from outside: {e}", dir.display()));
        std::fs::remove_file(&file).expect("remove probe");
    }
    let list: Vec<String> = targets.iter().map(|p| p.display().to_string()).collect();
    let script = format!(
        r#"for d in {list} /dev /sys /proc/sys/kernel; do
  touch "$d/{probe}" 2>/dev/null && echo "WROTE $d"
done
echo x > /proc/sys/kernel/hostname 2>/dev/null && echo WROTE-SYSCTL
echo h > /proc/sysrq-trigger 2>/dev/null && echo WROTE-SYSRQ
touch ./in-workspace /tmp/in-tmp /dev/shm/in-shm && echo writable-ok
echo end"#,
        list = list.join(" ")
    );
    // Declared as an output, the workspace file is collected from the worker's side of the
    // workspace (which is emptied once the attempt has ended).
    let mut spec = sh_spec("writer", &script);
    spec["outputs"] = json!(["in-workspace"]);
    let id = submit(&fleet, "writer", &spec);
    let t = wait_final(&fleet, &id, DEADLINE);
    let all = events(&fleet, &id, &[]);
    assert_eq!(t.state, TaskState::Succeeded, "{t:?} {all:#?}");
    let stdout = output(&all, "stdout");
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        ["writable-ok", "end"],
        "{stdout}"
    );
    for dir in &targets {
        assert!(!dir.join(&probe).exists(), "{} written", dir.display());
    }
    let stored = all
        .iter()
        .find(|e| e["kind"] == "outputs_stored")
        .unwrap_or_else(|| panic!("no outputs_stored: {all:#?}"));
    assert_eq!(
        stored["payload"]["paths"],
        json!(["in-workspace"]),
        "the workspace write did not land in the worker's workspace"
    );
    assert!(
        !Path::new("/tmp/in-tmp").exists(),
        "the task's /tmp is the host's"
    );
}

/// Second line of a PEM file: key material, unlike the BEGIN line.
fn pem_body_line(path: &Path) -> String {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{} unreadable from outside: {e}", path.display()));
    text.lines()
        .nth(1)
        .unwrap_or_else(|| panic!("{} is not PEM", path.display()))
        .to_owned()
}

#[test]
fn sandboxed_task_cannot_read_the_workers_environment_keys_or_state() {
    if !root_or_skip("sandboxed_task_cannot_read_the_workers_environment_keys_or_state") {
        return;
    }
    let mut fleet = fleet_builder().worker("w1", &["test"]).build();
    let fleet_dir = fleet.dir().canonicalize().expect("fleet dir");
    let nonce = format!("{:016x}", rand::random::<u64>());
    let env_canary = format!("ENV-CANARY-{nonce}");
    let config_canary = format!("CONFIG-CANARY-{nonce}");
    let ws_canary = format!("WS-CANARY-{nonce}");
    let state_canary = format!("STATE-CANARY-{nonce}");
    // A comment is the one thing a strict config file accepts that nobody else says.
    let config = fleet.worker_config("w1");
    let mut text = std::fs::read_to_string(&config).expect("worker config");
    text.push_str(&format!("# {config_canary}\n"));
    std::fs::write(&config, text).expect("write worker config");
    fleet.start_coordinator();
    fleet.start_worker_with_env("w1", &[("DROVER_TEST_CANARY", &env_canary)]);
    fleet.wait_all_ready();

    // State of another task: a file in the workspace of an attempt that runs beside the probes,
    // and a session in the coordinator's database. The canaries are put together at run time,
    // so that only the database and the workspace hold them (not the spec file, not the
    // stored spec).
    let earlier = format!(
        "n={nonce}; echo STATE-CANARY-$n; echo WS-CANARY-$n > canary; while [ ! -e stop ]; do sleep 0.05; done"
    );
    let neighbour = submit(&fleet, "earlier", &sh_spec("earlier", &earlier));
    let neighbour_ws = fleet_dir.join(format!("work/w1/tasks/{neighbour}-1"));
    fleet.wait_for(DEADLINE, "the neighbour's canaries to be in place", || {
        let stored = output(&events(&fleet, &neighbour, &[]), "stdout");
        (neighbour_ws.join("canary").exists() && stored.contains(&state_canary))
            .then_some(())
            .ok_or(stored)
    });

    let tls = fleet_dir.join("tls");
    let keys = [
        tls.join("w1.key"),
        tls.join("coordinator.key"),
        tls.join("operator.key"),
    ];
    let secrets: Vec<String> = keys
        .iter()
        .map(|k| pem_body_line(k))
        .chain([
            env_canary.clone(),
            config_canary.clone(),
            ws_canary.clone(),
            state_canary.clone(),
        ])
        .collect();
    let key_list: Vec<String> = keys.iter().map(|k| k.display().to_string()).collect();
    // Everything a curious task would try; errors are silenced, what it reads it prints.
    let probe = format!(
        r#"cat /proc/*/environ 2>/dev/null | tr '\0' '\n' | grep -a DROVER_TEST_CANARY
env | grep DROVER_TEST_CANARY
cat {keys} {tls}/* {config} 2>/dev/null
grep -rao '[A-Z]*-CANARY-[0-9a-f]*' {fleet} /etc/drover /var/lib/drover /var/lib/drover-worker 2>/dev/null
cat {work}/tasks/*/canary 2>/dev/null
ls -A {fleet} {tls} {work} 2>/dev/null
echo end"#,
        keys = key_list.join(" "),
        tls = tls.display(),
        config = fleet
            .worker_config("w1")
            .canonicalize()
            .expect("config")
            .display(),
        fleet = fleet_dir.display(),
        work = fleet_dir.join("work/w1").display(),
    );
    let (t, all) = run(&fleet, "probe", &sh_spec("probe", &probe));
    assert_eq!(t.state, TaskState::Succeeded, "{t:?} {all:#?}");
    let session = serde_json::to_string(&all).expect("session as text");
    assert!(output(&all, "stdout").ends_with("end\n"), "{session}");
    for secret in &secrets {
        assert!(
            !session.contains(secret.as_str()),
            "the sandboxed task read {secret:?}: {}",
            output(&all, "stdout")
        );
    }
    // The fleet's directory shows only the path down to the task's own workspace.
    let stdout = output(&all, "stdout");
    let listed: Vec<&str> = stdout
        .lines()
        .filter(|l| !l.is_empty() && *l != "end" && !l.ends_with(':'))
        .map(str::trim)
        .collect::<Vec<_>>();
    assert!(
        listed.iter().all(|l| ["work", "w1", "tasks"].contains(l)),
        "{listed:?}"
    );

    // The same probe as a process-isolated (trusted) task reads every one of them: the probe
    // can fail. (Trusted work gets none of the sandbox's hiding.)
    let mut spec = sh_spec("trusted", &probe);
    spec["isolation"] = json!("process");
    let (_, all) = run(&fleet, "trusted", &spec);
    let stdout = output(&all, "stdout");
    for secret in &secrets {
        assert!(
            stdout.contains(secret.as_str()),
            "the trusted probe did not find {secret:?}, so the sandboxed one proves nothing: {stdout}"
        );
    }
    std::fs::write(neighbour_ws.join("stop"), b"").expect("stop the neighbour");
    let t = wait_final(&fleet, &neighbour, DEADLINE);
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}");
}

#[test]
fn memory_hog_is_oom_killed_while_its_neighbour_completes() {
    if !root_or_skip("memory_hog_is_oom_killed_while_its_neighbour_completes") {
        return;
    }
    let fleet = started_fleet();
    let workspace_of = |id: &str| fleet.dir().join(format!("work/w1/tasks/{id}-1"));
    // The neighbour runs until the hog has ended, so both run side by side.
    let neighbour = submit(
        &fleet,
        "neighbour",
        &sh_spec(
            "neighbour",
            "echo started; while [ ! -e go ]; do sleep 0.05; done; echo survived",
        ),
    );
    wait_state(&fleet, &neighbour, TaskState::Running, DEADLINE);
    let mut hog = sh_spec(
        "hog",
        r#"x=$(head -c 300000000 /dev/zero | tr "\0" a); echo not-killed"#,
    );
    hog["limits"] = json!({ "memory": "64MiB" });
    let hog = submit(&fleet, "hog", &hog);
    let t = wait_final(&fleet, &hog, DEADLINE);
    let all = events(&fleet, &hog, &[]);
    assert_eq!(t.state, TaskState::Failed, "{t:?}");
    assert_eq!(exit_class(&all), json!("oom_killed"), "{all:#?}");
    assert!(!output(&all, "stdout").contains("not-killed"));
    let exited = all.iter().rfind(|e| e["kind"] == "exited").expect("exited");
    assert!(
        exited["payload"]["oom_kills"].as_u64() >= Some(1),
        "{exited}"
    );

    assert_eq!(
        task(&fleet, &neighbour).map(|t| t.state),
        Ok(TaskState::Running),
        "the neighbour died with the hog"
    );
    std::fs::write(workspace_of(&neighbour).join("go"), b"").expect("go");
    wait_state(&fleet, &neighbour, TaskState::Succeeded, DEADLINE);
    assert!(output(&events(&fleet, &neighbour, &[]), "stdout").contains("survived"));
    let w = fleet.wait_worker_state("w1", WorkerState::Ready);
    assert!(w.connected);
    // And it still runs work.
    let (t, _) = run(&fleet, "after", &sh_spec("after", "true"));
    assert_eq!(t.state, TaskState::Succeeded);
}

/// A unique number for `sleep` so the test can find the task's processes on the host.
fn marker(i: u32) -> String {
    (7_000_000 + std::process::id() % 100_000 * 10 + i).to_string()
}

fn wait_running_marker(fleet: &TestFleet, marker: &str) {
    fleet.wait_for(DEADLINE, &format!("a process with {marker}"), || {
        process_with(marker).then_some(()).ok_or("not yet")
    });
}

fn wait_gone(fleet: &TestFleet, marker: &str, what: &str) {
    fleet.wait_for(
        DEADLINE,
        &format!("every process of {what} ({marker}) to be gone"),
        || (!process_with(marker)).then_some(()).ok_or("still running"),
    );
}

#[test]
fn daemons_sigterm_ignorers_and_overtime_tasks_leave_nothing_behind() {
    if !root_or_skip("daemons_sigterm_ignorers_and_overtime_tasks_leave_nothing_behind") {
        return;
    }
    let fleet = started_fleet();

    // 1. A task that daemonizes a child (new session, own process group) and exits.
    let daemon = marker(1);
    let script = format!(
        "setsid sh -c 'sleep {daemon}' </dev/null >/dev/null 2>&1 & \
         while [ ! -e go ]; do sleep 0.05; done; exit 0"
    );
    let id = submit(&fleet, "daemonizer", &sh_spec("daemonizer", &script));
    wait_running_marker(&fleet, &daemon);
    std::fs::write(fleet.dir().join(format!("work/w1/tasks/{id}-1/go")), b"").expect("go");
    let t = wait_final(&fleet, &id, DEADLINE);
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}");
    assert_eq!(
        exit_class(&events(&fleet, &id, &[])),
        json!({ "exited": 0 })
    );
    wait_gone(&fleet, &daemon, "the daemonizing task");

    // 2. A task whose processes all ignore SIGTERM, cancelled.
    let stubborn = marker(2);
    let script =
        format!("trap '' TERM; setsid sh -c \"trap '' TERM; sleep {stubborn}\" & sleep {stubborn}");
    let id = submit(&fleet, "stubborn", &sh_spec("stubborn", &script));
    wait_state(&fleet, &id, TaskState::Running, DEADLINE);
    wait_running_marker(&fleet, &stubborn);
    let out = fleet.cli(&["cancel", &id]);
    assert!(out.status.success(), "{out:?}");
    let t = wait_final(&fleet, &id, DEADLINE);
    assert_eq!(t.state, TaskState::Cancelled, "{t:?}");
    assert_eq!(exit_class(&events(&fleet, &id, &[])), json!("cancelled"));
    wait_gone(&fleet, &stubborn, "the cancelled task");

    // 3. A task past its wall time, with a background child.
    let overtime = marker(3);
    let mut spec = sh_spec("overtime", &format!("sleep {overtime} & sleep {overtime}"));
    spec["limits"] = json!({ "wall_time": "2s" });
    let id = submit(&fleet, "overtime", &spec);
    wait_running_marker(&fleet, &overtime);
    let t = wait_final(&fleet, &id, DEADLINE);
    assert_eq!(t.state, TaskState::Failed, "{t:?}");
    assert_eq!(exit_class(&events(&fleet, &id, &[])), json!("timed_out"));
    wait_gone(&fleet, &overtime, "the timed-out task");
}

/// Peak and last-seen resident memory of the worker and the coordinator.
#[derive(Debug, Default)]
struct Memory {
    worker_rss: u64,
    coordinator_rss: u64,
}

/// Wait for `id` to end while sampling both daemons' RSS; then check both peaks (VmHWM, the
/// kernel's own high-water mark, so nothing between samples is missed) against the bound.
fn wait_bounded(fleet: &TestFleet, id: &str) -> TaskInfo {
    let worker = fleet.worker_pid("w1").expect("worker pid");
    let coordinator = fleet.coordinator_pid().expect("coordinator pid");
    let mut seen = Memory::default();
    let t = fleet.wait_for(FLOOD_DEADLINE, &format!("task {id} to end"), || {
        seen.worker_rss = seen
            .worker_rss
            .max(proc_status_bytes(worker, "VmRSS").unwrap_or(0));
        seen.coordinator_rss = seen
            .coordinator_rss
            .max(proc_status_bytes(coordinator, "VmRSS").unwrap_or(0));
        match task(fleet, id) {
            Ok(t) if t.state.is_final() => Ok(t),
            Ok(t) => Err(t.state.to_string()),
            Err(e) => Err(e),
        }
    });
    let worker_peak = proc_status_bytes(worker, "VmHWM").expect("worker VmHWM");
    let coordinator_peak = proc_status_bytes(coordinator, "VmHWM").expect("coordinator VmHWM");
    eprintln!(
        "memory during the flood: worker peak {} MiB (sampled max RSS {} MiB), \
         coordinator peak {} MiB (sampled max RSS {} MiB)",
        worker_peak >> 20,
        seen.worker_rss >> 20,
        coordinator_peak >> 20,
        seen.coordinator_rss >> 20
    );
    assert!(
        worker_peak < MEMORY_BOUND,
        "worker peak RSS {worker_peak} bytes"
    );
    assert!(
        coordinator_peak < MEMORY_BOUND,
        "coordinator peak RSS {coordinator_peak} bytes"
    );
    t
}

#[test]
fn hundred_megabytes_of_output_are_stored_once_in_order_with_bounded_memory() {
    if !root_or_skip("hundred_megabytes_of_output_are_stored_once_in_order_with_bounded_memory") {
        return;
    }
    let fleet = started_fleet();
    // `seq` is deterministic, so the test knows every byte to expect.
    let lines = 12_500_000u64;
    let id = submit(
        &fleet,
        "flood",
        &sh_spec("flood", &format!("seq 1 {lines}")),
    );
    let started = std::time::Instant::now();
    let t = wait_bounded(&fleet, &id);
    eprintln!("100 MB task ran in {:?}", started.elapsed());
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}");
    let read = std::time::Instant::now();
    let all = events(&fleet, &id, &[]);
    eprintln!("read back {} events in {:?}", all.len(), read.elapsed());
    check_order(&all);
    let stdout = output(&all, "stdout");
    let mut expected = String::with_capacity(stdout.len());
    for n in 1..=lines {
        use std::fmt::Write as _;
        let _ = writeln!(expected, "{n}");
    }
    assert!(expected.len() >= 100_000_000, "{}", expected.len());
    assert_eq!(stdout.len(), expected.len(), "bytes of stdout");
    assert!(stdout == expected, "stdout differs from `seq 1 {lines}`");
}

#[test]
fn a_million_task_events_are_stored_once_in_order_with_bounded_memory() {
    if !root_or_skip("a_million_task_events_are_stored_once_in_order_with_bounded_memory") {
        return;
    }
    let fleet = started_fleet();
    let count = 1_000_000u64;
    let script =
        format!(r#"seq 1 {count} | sed 's/.*/{{"type":"progress","n":&}}/' >&$DROVER_EVENTS_FD"#);
    let id = submit(&fleet, "chatty", &sh_spec("chatty", &script));
    let started = std::time::Instant::now();
    let t = wait_bounded(&fleet, &id);
    eprintln!("1M-event task ran in {:?}", started.elapsed());
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}");
    let read = std::time::Instant::now();
    let all = events(&fleet, &id, &[]);
    eprintln!("read back {} events in {:?}", all.len(), read.elapsed());
    check_order(&all);
    let progress: Vec<u64> = all
        .iter()
        .filter(|e| e["kind"] == "progress")
        .map(|e| e["payload"]["n"].as_u64().expect("n"))
        .collect();
    assert_eq!(progress.len() as u64, count, "every event stored once");
    assert!(
        progress.iter().copied().eq(1..=count),
        "events stored in the order written"
    );
}

#[test]
fn bad_specs_name_the_field_and_queue_nothing_and_unmeetable_ones_say_why() {
    // Nothing runs here, so no root is needed.
    let mut fleet = fleet_builder().worker("w1", &["test"]).build();
    fleet.start_coordinator();
    fleet.start_all_workers();
    fleet.wait_all_ready();
    let tasks = |fleet: &TestFleet| -> Vec<TaskInfo> { fleet.cli_json(&["tasks", "--json"]) };
    let cases: [(&str, &str, &[&str]); 4] = [
        (
            "unknown.toml",
            "command = [\"true\"]\nnmae = \"typo\"\n",
            &["nmae"],
        ),
        ("wrong-type.toml", "command = \"echo hi\"\n", &["command"]),
        ("missing.toml", "name = \"no command\"\n", &["command"]),
        (
            "nested.json",
            r#"{"command":["true"],"limits":{"memory":"lots"}}"#,
            &["limits.memory", "lots"],
        ),
    ];
    for (file, text, names) in cases {
        let path = fleet.dir().join(file);
        std::fs::write(&path, text).expect("write spec");
        let out = fleet.cli(&["submit", path.to_str().expect("utf-8")]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{file}: {stderr}");
        for name in names {
            assert!(
                stderr.contains(name),
                "{file}: {name:?} not named in: {stderr}"
            );
        }
        assert!(
            stderr.contains(file),
            "{file}: the file is not named: {stderr}"
        );
        assert!(out.stdout.is_empty(), "{file}: printed a task id");
    }
    assert!(tasks(&fleet).is_empty(), "a bad spec was queued");

    // Requirements no worker can ever meet: refused with --no-queue, nothing queued ...
    let arch = if std::env::consts::ARCH == "riscv64" {
        "x86_64"
    } else {
        "riscv64"
    };
    let spec = write_spec(
        &fleet,
        "impossible",
        &json!({ "command": ["true"], "requirements": { "arch": arch } }),
    );
    let spec = spec.to_str().expect("utf-8");
    let out = fleet.cli(&["submit", spec, "--no-queue"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("--no-queue") && stderr.contains(arch),
        "{stderr}"
    );
    assert!(
        tasks(&fleet).is_empty(),
        "refused with --no-queue, yet queued"
    );
    // ... else queued with a warning, and `task show` says why it waits.
    let out = fleet.cli(&["submit", spec]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("warning") && stderr.contains(arch),
        "{stderr}"
    );
    let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let t = task(&fleet, &id).expect("task show");
    assert_eq!(t.state, TaskState::Queued);
    let reason = t.reason.unwrap_or_default();
    assert!(
        reason.contains(arch) && reason.contains("w1"),
        "task show gives no reason naming the arch and the worker checked: {reason:?}"
    );
    let shown = fleet.cli(&["task", "show", &id]);
    assert!(
        String::from_utf8_lossy(&shown.stdout).contains(arch),
        "{shown:?}"
    );
}
