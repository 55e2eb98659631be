//! End-to-end tests of the sandbox on this host: real cgroups, namespaces and processes.
//!
//! They need root; as another user each prints a loud SKIPPED line and passes. Nothing here
//! asserts on timing: waits are bounded polls, and every task has a generous wall-time limit so
//! a broken sandbox fails a test instead of hanging it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use drover_protocol::task::{ExitClass, Isolation, Limits, NetworkPolicy};
use nix::errno::Errno;
use nix::sys::signal::kill;
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};
use tokio_util::sync::CancellationToken;

use super::cgroup::{v1, v2, Hierarchy};
use super::*;

const MIB: u64 = 1024 * 1024;
const BOTH: [Isolation; 2] = [Isolation::Sandbox, Isolation::Process];

fn skip() -> bool {
    if nix::unistd::geteuid().is_root() {
        return false;
    }
    eprintln!("\n*** SKIPPED: needs root (namespaces, cgroups) ***\n");
    true
}

/// One detected sandbox for the whole test binary.
fn sandbox() -> Sandbox {
    static SANDBOX: OnceLock<Sandbox> = OnceLock::new();
    SANDBOX
        .get_or_init(|| {
            let sandbox = Sandbox::detect(None).expect("detect a sandbox");
            eprintln!("sandbox: {sandbox}");
            sandbox
        })
        .clone()
}

/// A task to run, owning what an [`AttemptSpec`] borrows.
struct Job {
    task: String,
    argv: Vec<String>,
    env: BTreeMap<String, String>,
    limits: Limits,
    network: NetworkPolicy,
    isolation: Isolation,
}

impl Job {
    fn sh(script: &str, isolation: Isolation) -> Job {
        static NEXT: AtomicU32 = AtomicU32::new(1);
        Job {
            task: format!("test-{}", NEXT.fetch_add(1, Ordering::Relaxed)),
            argv: vec!["sh".into(), "-c".into(), script.into()],
            env: BTreeMap::new(),
            limits: Limits {
                memory_bytes: None,
                pids: Some(512),
                wall_time_ms: Some(120_000),
            },
            network: NetworkPolicy::None,
            isolation,
        }
    }

    fn spec<'a>(&'a self, workspace: &'a Path) -> AttemptSpec<'a> {
        AttemptSpec {
            task_id: &self.task,
            attempt: 1,
            argv: &self.argv,
            env: &self.env,
            workspace,
            limits: &self.limits,
            network: self.network,
            isolation: self.isolation,
            checkpoint_file: None,
            extra_env: &[],
            egress: None,
            confirmation: None,
        }
    }
}

#[derive(Debug)]
struct Output {
    outcome: AttemptOutcome,
    stdout: String,
    stderr: String,
    events: String,
}

async fn read_all(reader: Option<impl AsyncRead + Unpin>) -> String {
    let mut text = String::new();
    if let Some(mut r) = reader {
        r.read_to_string(&mut text).await.expect("read a pipe");
    }
    text
}

async fn run_with(
    sandbox: &Sandbox,
    job: &Job,
    workspace: &Path,
    cancel: CancellationToken,
) -> Output {
    let mut attempt = sandbox.spawn(job.spec(workspace)).await.expect("spawn");
    let (stdout, stderr, events) = (
        attempt.stdout.take(),
        attempt.stderr.take(),
        attempt.events.take(),
    );
    let (outcome, stdout, stderr, events) = bounded(async {
        tokio::join!(
            attempt.wait(cancel),
            read_all(stdout),
            read_all(stderr),
            read_all(events)
        )
    })
    .await;
    Output {
        outcome,
        stdout,
        stderr,
        events,
    }
}

async fn run(job: &Job) -> Output {
    let ws = tempfile::tempdir().expect("workspace");
    run_with(&sandbox(), job, ws.path(), CancellationToken::new()).await
}

/// Fails the test instead of hanging it.
async fn bounded<T>(fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(180), fut)
        .await
        .expect("the test did not finish within its bound")
}

fn lines(text: &str) -> Vec<&str> {
    text.lines().collect()
}

/// Gone: `kill(pid, 0)` fails with ESRCH (not even a zombie is left).
fn gone(pid: i32) -> bool {
    kill(Pid::from_raw(pid), None) == Err(Errno::ESRCH)
}

async fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    super::cgroup::poll_until(Duration::from_secs(10), &mut cond).await
}

#[tokio::test]
async fn sandbox_exit_codes_are_classified() {
    if skip() {
        return;
    }
    for isolation in BOTH {
        for code in [0, 3] {
            let out = run(&Job::sh(&format!("exit {code}"), isolation)).await;
            assert_eq!(
                out.outcome.class,
                ExitClass::Exited(code),
                "{isolation:?} {out:?}"
            );
            assert_eq!(out.outcome.oom_kills, 0);
        }
    }
}

#[tokio::test]
async fn sandbox_kill_from_inside_is_signaled() {
    if skip() {
        return;
    }
    for isolation in BOTH {
        let out = run(&Job::sh("kill -TERM $$; sleep 100", isolation)).await;
        assert_eq!(
            out.outcome.class,
            ExitClass::Signaled(15),
            "{isolation:?} {out:?}"
        );
    }
}

#[tokio::test]
async fn sandbox_environment_is_exactly_declared_plus_drover() {
    if skip() {
        return;
    }
    for isolation in BOTH {
        let ws = tempfile::tempdir().expect("workspace");
        let canonical = ws.path().canonicalize().expect("canonical");
        let mut job = Job::sh("", isolation);
        job.argv = vec!["env".into()];
        job.env = BTreeMap::from([
            ("FOO".into(), "bar baz".into()),
            ("PATH".into(), "/usr/bin:/bin".into()),
        ]);
        let out = run_with(&sandbox(), &job, ws.path(), CancellationToken::new()).await;
        assert_eq!(out.outcome.class, ExitClass::Exited(0), "{out:?}");
        let mut got = lines(&out.stdout);
        got.sort();
        let workspace = format!("DROVER_WORKSPACE={}", canonical.display());
        let task = format!("DROVER_TASK_ID={}", job.task);
        assert_eq!(
            got,
            [
                "DROVER_ATTEMPT=1",
                "DROVER_EVENTS_FD=3",
                task.as_str(),
                workspace.as_str(),
                "FOO=bar baz",
                "PATH=/usr/bin:/bin"
            ],
            "{isolation:?}"
        );

        // Without a declared PATH the default one is added, and nothing else.
        job.env.clear();
        let out = run_with(&sandbox(), &job, ws.path(), CancellationToken::new()).await;
        let path = format!("PATH={}", plan::DEFAULT_PATH);
        assert!(lines(&out.stdout).contains(&path.as_str()), "{out:?}");
        assert_eq!(lines(&out.stdout).len(), 5, "{out:?}");
    }
}

#[tokio::test]
async fn sandbox_process_basics_cwd_stdin_no_new_privs() {
    if skip() {
        return;
    }
    for isolation in BOTH {
        let ws = tempfile::tempdir().expect("workspace");
        let canonical = ws.path().canonicalize().expect("canonical");
        let script = "pwd; readlink /proc/self/fd/0; cat; grep NoNewPrivs /proc/self/status; \
                      echo hi >&2; touch made-here";
        let job = Job::sh(script, isolation);
        let out = run_with(&sandbox(), &job, ws.path(), CancellationToken::new()).await;
        assert_eq!(out.outcome.class, ExitClass::Exited(0), "{out:?}");
        let got = lines(&out.stdout);
        assert_eq!(got[0], canonical.display().to_string(), "{isolation:?}");
        assert_eq!(got[1], "/dev/null", "{isolation:?}");
        assert_eq!(
            got[2].split_whitespace().collect::<Vec<_>>(),
            ["NoNewPrivs:", "1"]
        );
        assert_eq!(out.stderr, "hi\n");
        assert!(
            ws.path().join("made-here").exists(),
            "{isolation:?}: workspace not shared"
        );
    }
}

#[tokio::test]
async fn sandbox_proc_shows_only_the_sandbox() {
    if skip() {
        return;
    }
    // Globbing is a shell builtin: no extra process shows up.
    let script = "for p in /proc/[0-9]*; do echo ${p#/proc/}; done; echo self=$$";
    let out = run(&Job::sh(script, Isolation::Sandbox)).await;
    assert_eq!(out.outcome.class, ExitClass::Exited(0), "{out:?}");
    assert_eq!(lines(&out.stdout), ["1", "2", "self=2"], "{out:?}");
}

#[tokio::test]
async fn sandbox_hostname_differs_from_the_host() {
    if skip() {
        return;
    }
    let job = Job::sh("cat /proc/sys/kernel/hostname", Isolation::Sandbox);
    let out = run(&job).await;
    let host = nix::unistd::gethostname().expect("hostname");
    let inside = out.stdout.trim();
    assert_eq!(inside, format!("drover-{}", job.task));
    assert_ne!(Some(inside), host.to_str());
}

#[tokio::test]
async fn sandbox_network_none_has_only_loopback() {
    if skip() {
        return;
    }
    let out = run(&Job::sh("ls /sys/class/net", Isolation::Sandbox)).await;
    assert_eq!(lines(&out.stdout), ["lo"], "{out:?}");
}

/// Every attempt gets a network namespace of its own — made ahead by the spawner or by the
/// sandbox itself — never the host's, never one another live attempt has. (Run side by side:
/// one an attempt has left idle may be used again, see the next test.)
#[tokio::test]
async fn sandbox_network_namespaces_are_fresh_for_every_attempt() {
    if skip() {
        return;
    }
    let host = std::fs::read_link("/proc/self/ns/net").expect("host netns");
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..6 {
        set.spawn(async {
            run(&Job::sh(
                "readlink /proc/self/ns/net; cat /sys/class/net/lo/operstate; sleep 1",
                Isolation::Sandbox,
            ))
            .await
        });
    }
    let mut seen = std::collections::BTreeSet::new();
    while let Some(out) = bounded(set.join_next()).await {
        let out = out.expect("join");
        let lines = lines(&out.stdout);
        assert_eq!(lines.len(), 2, "{out:?}");
        assert_ne!(lines[0], host.to_string_lossy(), "the host's namespace");
        assert_eq!(lines[1], "down", "lo as a new namespace has it: {out:?}");
        assert!(seen.insert(lines[0].to_owned()), "{} used twice", lines[0]);
    }
}

/// Waits (bounded: 5 s) until `sandbox`'s spawner's network namespace counts (ready, lent,
/// reused) satisfy `until`, which says `what`; the counts then.
async fn netns_until(
    sandbox: &Sandbox,
    what: &str,
    until: impl Fn((usize, usize, u64)) -> bool,
) -> (usize, usize, u64) {
    let mut counts = (0, 0, 0);
    for _ in 0..500 {
        counts = sandbox.netns_counts().await;
        if until(counts) {
            return counts;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("not {what} within 5 s: (ready, lent, reused) = {counts:?}");
}

/// Waits until `sandbox`'s spawner has no network namespace lent; its counts then.
async fn netns_settled(sandbox: &Sandbox) -> (usize, usize, u64) {
    netns_lent_at_most(sandbox, 0).await
}

/// Waits until `sandbox`'s spawner has at most `lent` network namespaces lent.
async fn netns_lent_at_most(sandbox: &Sandbox, lent: usize) -> (usize, usize, u64) {
    netns_until(sandbox, "settled", |c| c.1 <= lent).await
}

/// A namespace an attempt with `network = none` joined comes back to the spawner's pool once
/// the attempt is over and nothing of it is left there, and the next attempt joins it, as
/// down and empty as a new one. (What keeps one from coming back is tested in the `netns`
/// module, on a real namespace.)
#[tokio::test]
async fn sandbox_idle_network_namespaces_are_used_again() {
    if skip() {
        return;
    }
    // Its own spawner, without warm cgroups: every attempt forks its helper and takes a
    // namespace from the pool.
    let sandbox = netns_pool_sandbox().await;
    let host = std::fs::read_link("/proc/self/ns/net").expect("host netns");
    let probe = "readlink /proc/self/ns/net; cat /sys/class/net/lo/operstate; \
                 ls /sys/class/net; cat /proc/net/sockstat | head -1";
    let ws = tempfile::tempdir().expect("workspace");
    let mut seen = Vec::new();
    for i in 0..4u64 {
        let out = sandboxed(&sandbox, probe, ws.path()).await;
        assert_eq!(out.outcome.class, ExitClass::Exited(0), "{out:?}");
        let got = lines(&out.stdout);
        assert_eq!(got.len(), 4, "{out:?}");
        assert_ne!(got[0], host.to_string_lossy(), "the host's namespace");
        assert_eq!(
            got[1..],
            ["down", "lo", "sockets: used 0"],
            "attempt {i}: {out:?}"
        );
        seen.push(got[0].to_owned());
        let (_, _, reused) = netns_settled(&sandbox).await;
        assert_eq!(reused, i + 1, "attempt {i}'s namespace came back: {out:?}");
    }
    assert!(
        seen.windows(2).all(|w| w[0] == w[1]),
        "each attempt joins the namespace the one before gave back: {seen:?}"
    );

    // A task that tried the network moved its namespace's counters (a connect with no
    // route counts in Ip: OutNoRoutes, a number the task could choose): not used again.
    let tried = "readlink /proc/self/ns/net; bash -c 'echo > /dev/tcp/10.1.2.3/9' 2>/dev/null; \
                 echo tried";
    let out = sandboxed(&sandbox, tried, ws.path()).await;
    let got = lines(&out.stdout);
    assert_eq!(got.len(), 2, "{out:?}");
    assert_eq!(
        got[0], seen[0],
        "it took the namespace given back last: {out:?}"
    );
    assert_eq!(got[1], "tried", "{out:?}");
    let (_, _, reused) = netns_settled(&sandbox).await;
    assert_eq!(reused, 4, "its namespace did not come back: {out:?}");
    let out = sandboxed(&sandbox, probe, ws.path()).await;
    let got = lines(&out.stdout);
    assert_eq!(got.len(), 4, "{out:?}");
    assert_ne!(got[0], seen[0], "a namespace whose counters moved: {out:?}");
    assert_eq!(got[1..], ["down", "lo", "sockets: used 0"], "{out:?}");
}

/// Runs `script` in a sandbox of `sandbox` (network none), in `workspace`.
async fn sandboxed(sandbox: &Sandbox, script: &str, workspace: &Path) -> Output {
    let job = Job::sh(script, Isolation::Sandbox);
    run_with(sandbox, &job, workspace, CancellationToken::new()).await
}

/// A sandbox with a spawner of its own, without warm cgroups (every attempt forks its helper
/// and takes a network namespace from the pool), once its pool is full.
async fn netns_pool_sandbox() -> Sandbox {
    let sandbox = sandbox().cold();
    netns_until(&sandbox, "a full pool", |c| c.0 >= 4).await;
    sandbox
}

/// Starts `script` in a sandbox of `sandbox` (network none), in `workspace`, in the
/// background; returns once the spawner has lent it a network namespace.
async fn sandboxed_in_background(
    sandbox: &Sandbox,
    script: String,
    workspace: &Path,
    cancel: CancellationToken,
) -> tokio::task::JoinHandle<Output> {
    let (theirs, dir) = (sandbox.clone(), workspace.to_owned());
    let run = tokio::spawn(async move {
        let job = Job::sh(&script, Isolation::Sandbox);
        run_with(&theirs, &job, &dir, cancel).await
    });
    netns_until(sandbox, "a namespace lent", |c| c.1 >= 1).await;
    run
}

/// A namespace is never given to another attempt while the one that joined it runs.
#[tokio::test]
async fn sandbox_network_namespace_in_use_is_not_lent_again() {
    if skip() {
        return;
    }
    let sandbox = netns_pool_sandbox().await;
    let ws = tempfile::tempdir().expect("workspace");
    let held = tempfile::tempdir().expect("the long one's workspace");
    let go = held.path().join("go");
    let script = format!(
        "readlink /proc/self/ns/net; while [ ! -e {} ]; do sleep 0.02; done",
        go.display()
    );
    let long =
        sandboxed_in_background(&sandbox, script, held.path(), CancellationToken::new()).await;
    let mut shorts = Vec::new();
    for _ in 0..3 {
        let out = sandboxed(&sandbox, "readlink /proc/self/ns/net", ws.path()).await;
        assert_eq!(out.outcome.class, ExitClass::Exited(0), "{out:?}");
        shorts.push(out.stdout.trim().to_owned());
        netns_lent_at_most(&sandbox, 1).await;
    }
    assert!(!long.is_finished(), "the long one still runs");
    let (_, _, reused) = sandbox.netns_counts().await;
    assert!(reused >= 1, "the short ones passed theirs on: {shorts:?}");
    std::fs::write(&go, b"").expect("let it end");
    let long = bounded(long).await.expect("join");
    assert_eq!(long.outcome.class, ExitClass::Exited(0), "{long:?}");
    let mine = lines(&long.stdout)[0].to_owned();
    assert!(
        !shorts.contains(&mine),
        "{mine} given out while in use: {shorts:?}"
    );
}

/// A namespace whose attempt was killed (here cancelled) does not come back: its outer
/// helper did not see every process of the attempt gone.
#[tokio::test]
async fn sandbox_network_namespace_of_a_killed_attempt_is_let_go() {
    if skip() {
        return;
    }
    let sandbox = netns_pool_sandbox().await;
    let ws = tempfile::tempdir().expect("workspace");
    let cancel = CancellationToken::new();
    let run = sandboxed_in_background(&sandbox, "sleep 60".into(), ws.path(), cancel.clone()).await;
    cancel.cancel();
    let out = bounded(run).await.expect("join");
    assert_eq!(out.outcome.class, ExitClass::Cancelled, "{out:?}");
    let (_, _, reused) = netns_settled(&sandbox).await;
    assert_eq!(reused, 0, "a killed attempt's namespace came back: {out:?}");
}

#[tokio::test]
async fn sandbox_network_host_sees_host_interfaces() {
    if skip() {
        return;
    }
    let mut host: Vec<String> = std::fs::read_dir("/sys/class/net")
        .expect("host interfaces")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    host.sort();
    let mut job = Job::sh("ls /sys/class/net", Isolation::Sandbox);
    job.network = NetworkPolicy::Host;
    let out = run(&job).await;
    assert_eq!(lines(&out.stdout), host, "{out:?}");
    assert!(
        host.len() > 1,
        "this host has only loopback: the test proves little"
    );
}

#[tokio::test]
async fn sandbox_tmp_is_private() {
    if skip() {
        return;
    }
    let name = format!("drover-private-tmp-{}", std::process::id());
    for workspace in [std::env::temp_dir(), PathBuf::from("/var/tmp")] {
        let ws = tempfile::tempdir_in(&workspace).expect("workspace");
        let script = format!("echo x > /tmp/{name} && ls -A /tmp | grep -c . && pwd");
        let out = run_with(
            &sandbox(),
            &Job::sh(&script, Isolation::Sandbox),
            ws.path(),
            CancellationToken::new(),
        )
        .await;
        assert_eq!(out.outcome.class, ExitClass::Exited(0), "{out:?}");
        assert!(
            !Path::new("/tmp").join(&name).exists(),
            "the task wrote into the host's /tmp"
        );
        // The new /tmp holds the file and, when the workspace is under /tmp, its path.
        let expected = if ws.path().starts_with("/tmp") {
            "2"
        } else {
            "1"
        };
        assert_eq!(lines(&out.stdout)[0], expected, "{out:?}");
    }
}

#[tokio::test]
async fn sandbox_events_fd_reaches_the_worker() {
    if skip() {
        return;
    }
    for isolation in BOTH {
        let script =
            r#"echo '{"type":"progress","payload":{"done":1}}' >&$DROVER_EVENTS_FD; echo out"#;
        let out = run(&Job::sh(script, isolation)).await;
        assert_eq!(
            out.events,
            "{\"type\":\"progress\",\"payload\":{\"done\":1}}\n"
        );
        assert_eq!(out.stdout, "out\n");
    }
}

#[tokio::test]
async fn sandbox_memory_hog_is_oom_killed() {
    if skip() {
        return;
    }
    for isolation in BOTH {
        let mut job = Job::sh(
            r#"x=$(head -c 300000000 /dev/zero | tr "\0" a); echo survived"#,
            isolation,
        );
        job.limits.memory_bytes = Some(64 * MIB);
        let out = run(&job).await;
        assert_eq!(
            out.outcome.class,
            ExitClass::OomKilled,
            "{isolation:?} {out:?}"
        );
        assert!(out.outcome.oom_kills >= 1);
        assert_eq!(out.outcome.memory_limit_bytes, Some(64 * MIB));
        if let Some(peak) = out.outcome.peak_memory_bytes {
            assert!(peak > 32 * MIB && peak <= 64 * MIB, "peak {peak}");
        }
        assert!(!out.stdout.contains("survived"));
    }
}

#[tokio::test]
async fn sandbox_pids_limit_stops_a_fork_bomb() {
    if skip() {
        return;
    }
    if !sandbox().pids_limit_available() {
        eprintln!("*** SKIPPED: no pids controller on this host ***");
        return;
    }
    // dash gives up at the first failed fork, so the bomb runs in a shell of its own; its
    // sleeps stay (reparented to the init) and the outer shell counts them without forking.
    let script = "sh -c 'for i in $(seq 50); do sleep 1000 & done'; set -- /proc/[0-9]*; echo $#";
    let mut job = Job::sh(script, Isolation::Sandbox);
    job.limits.pids = Some(20);
    let out = run(&job).await;
    assert_eq!(out.outcome.class, ExitClass::Exited(0), "{out:?}");
    assert!(out.outcome.pids_limit_enforced);
    let visible: u32 = out.stdout.trim().parse().expect("a count");
    // The init, the shell and as many sleeps as the limit allowed.
    assert!((3..=21).contains(&visible), "{visible} processes: {out:?}");
    assert!(out.stderr.to_lowercase().contains("fork"), "{out:?}");
}

/// A vforked spawn (process isolation, a pids limit of at least `VFORK_MIN_PIDS`): the limit
/// is in place from the start and holds against a fork bomb.
#[tokio::test]
async fn sandbox_vforked_process_keeps_its_pids_limit() {
    if skip() || !sandbox().pids_limit_available() {
        return;
    }
    let sandbox = Sandbox::detect(None).expect("detect");
    if !sandbox.warm_ready().await {
        eprintln!("*** SKIPPED: no warm cgroups on this host (cgroup v2) ***");
        return;
    }
    // The path first (that forks), then the bomb, then builtins only (the slots are taken).
    let script = "p=$(grep ':pids:' /proc/self/cgroup | cut -d: -f3); echo $p; \
                  sh -c 'for i in $(seq 30); do sleep 100 >/dev/null 2>&1 3>&- & done'; \
                  read max < /sys/fs/cgroup/pids$p/pids.max; echo $max; \
                  read n < /sys/fs/cgroup/pids$p/pids.current; echo $n";
    let mut job = Job::sh(script, Isolation::Process);
    job.limits.pids = Some(24);
    let ws = tempfile::tempdir().expect("workspace");
    let out = run_with(&sandbox, &job, ws.path(), CancellationToken::new()).await;
    assert_eq!(out.outcome.class, ExitClass::Exited(0), "{out:?}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert!(lines[0].contains("-warm"), "not a warm cgroup: {out:?}");
    assert_eq!(lines[1], "24", "{out:?}");
    let current: u32 = lines[2].parse().expect("pids.current");
    assert!((2..=24).contains(&current), "{current}: {out:?}");
    assert!(
        out.stderr.to_lowercase().contains("fork"),
        "the bomb was not stopped: {out:?}"
    );
}

/// A warm spawn (v1 hosts): the process is born in the attempt's cgroup in every hierarchy,
/// the pids limit is exact once it runs (the forking thread no longer counts), the limit holds,
/// and the worker's thread is gone from the cgroup.
#[tokio::test]
async fn sandbox_warm_spawn_starts_in_its_cgroup_with_exact_limits() {
    if skip() {
        return;
    }
    let sandbox = Sandbox::detect(None).expect("detect");
    if !sandbox.warm_ready().await {
        eprintln!("*** SKIPPED: no warm cgroups on this host (cgroup v2) ***");
        return;
    }
    let ws = tempfile::tempdir().expect("workspace");
    for isolation in BOTH {
        assert!(sandbox.warm_ready().await, "a warm cgroup again");
        // dash gives up at the first failed fork: the bomb runs in a shell of its own.
        let script =
            "cat /proc/self/cgroup; sh -c 'for i in 1 2 3 4 5 6; do sleep 100 >/dev/null 2>&1 & done'; exit 0";
        let mut job = Job::sh(script, isolation);
        job.limits.pids = Some(4);
        let mut attempt = sandbox.spawn(job.spec(ws.path())).await.expect("spawn");
        let dirs = attempt.cgroup_dirs();
        let name = dirs[0]
            .file_name()
            .expect("a name")
            .to_string_lossy()
            .into_owned();
        assert!(name.contains("-warm"), "{name}: not a warm cgroup");
        for dir in &dirs {
            let tasks = std::fs::read_to_string(dir.join("tasks")).expect("tasks");
            let me = std::fs::read_dir("/proc/self/task")
                .expect("own threads")
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect::<Vec<_>>();
            assert!(
                tasks.lines().all(|t| !me.iter().any(|m| m == t)),
                "a worker thread is still in {}",
                dir.display()
            );
            if dir.starts_with("/sys/fs/cgroup/pids") {
                let max = std::fs::read_to_string(dir.join("pids.max")).expect("pids.max");
                let helpers = if isolation == Isolation::Sandbox {
                    SANDBOX_HELPER_PIDS
                } else {
                    0
                };
                assert_eq!(max.trim(), (4 + helpers).to_string(), "{isolation:?}");
            }
        }
        let (stdout, stderr) = (attempt.stdout.take(), attempt.stderr.take());
        let cancel = CancellationToken::new();
        let (outcome, stdout, stderr) = bounded(async {
            let (out, err) = tokio::join!(read_all(stdout), read_all(stderr));
            (attempt.wait(cancel).await, out, err)
        })
        .await;
        assert_eq!(outcome.class, ExitClass::Exited(0), "{stderr}");
        for controller in ["memory", "pids", "freezer"] {
            let line = stdout.lines().find(|l| {
                l.split(':')
                    .nth(1)
                    .is_some_and(|c| c.split(',').any(|c| c == controller))
            });
            if let Some(line) = line {
                // With a cgroup namespace (sandbox isolation) the path shows as `/`.
                assert!(
                    line.ends_with(&name) || line.ends_with(":/"),
                    "{controller}: {line} is not the attempt cgroup {name}"
                );
            }
        }
        assert!(
            stderr.to_lowercase().contains("fork"),
            "the limit of 4 held: {stderr}"
        );
    }
}

/// The memory cgroup path, memory limit and pids limit an attempt sees (process isolation:
/// no cgroup namespace, so the host's paths).
const CGROUP_VIEW: &str = "p=$(grep ':memory:' /proc/self/cgroup | cut -d: -f3); echo $p; \
     read m < /sys/fs/cgroup/memory$p/memory.limit_in_bytes; echo $m; \
     q=$(grep ':pids:' /proc/self/cgroup | cut -d: -f3); \
     if [ -n \"$q\" ]; then read n < /sys/fs/cgroup/pids$q/pids.max; echo $n; else echo none; fi";

/// A fresh sandbox (its own spawner and warm pool) on a v1 host; `None` (skipped) elsewhere.
async fn own_warm_sandbox() -> Option<Sandbox> {
    if skip() {
        return None;
    }
    let sandbox = Sandbox::detect(None).expect("detect");
    if !sandbox.warm_ready().await {
        eprintln!("*** SKIPPED: no warm cgroups on this host (cgroup v2) ***");
        return None;
    }
    Some(sandbox)
}

/// Runs [`CGROUP_VIEW`] once the whole warm pool is ready (so it takes the cgroup made or
/// re-entered last) and returns its three lines and the outcome.
async fn cgroup_view(sandbox: &Sandbox, memory: Option<u64>, pids: u32) -> (Vec<String>, Output) {
    assert!(sandbox.warm_all_ready().await);
    let mut job = Job::sh(CGROUP_VIEW, Isolation::Process);
    job.limits.memory_bytes = memory;
    job.limits.pids = Some(pids);
    let ws = tempfile::tempdir().expect("workspace");
    let out = run_with(sandbox, &job, ws.path(), CancellationToken::new()).await;
    assert_eq!(out.outcome.class, ExitClass::Exited(0), "{out:?}");
    assert_eq!(out.outcome.oom_kills, 0, "{out:?}");
    let lines: Vec<String> = out.stdout.lines().map(str::to_owned).collect();
    assert_eq!(lines.len(), 3, "{out:?}");
    (lines, out)
}

/// Runs `script` (process isolation, memory limit `memory`) once the whole warm pool is ready,
/// so in the cgroup made or re-entered last; returns the first line it printed (the scripts
/// here print their memory cgroup's path first) and the output.
async fn first_line_of(
    sandbox: &Sandbox,
    script: &str,
    memory: Option<u64>,
) -> (Option<String>, Output) {
    assert!(sandbox.warm_all_ready().await);
    let mut job = Job::sh(script, Isolation::Process);
    job.limits.memory_bytes = memory;
    let ws = tempfile::tempdir().expect("workspace");
    let out = run_with(sandbox, &job, ws.path(), CancellationToken::new()).await;
    (out.stdout.lines().next().map(str::to_owned), out)
}

/// An attempt's emptied warm cgroup is re-entered for the next one (v1), and the next one
/// finds it as a new cgroup: its own limits (or none), not the last attempt's.
#[tokio::test]
async fn sandbox_warm_cgroups_are_reused_with_fresh_limits() {
    let Some(sandbox) = own_warm_sandbox().await else {
        return;
    };
    // v1's "no limit": the most pages a counter holds (LONG_MAX / page size), in bytes.
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .expect("the page size") as u64;
    let unlimited = (i64::MAX as u64 / page * page).to_string();
    let mut last: Option<String> = None;
    let mut reused = 0;
    for i in 0..8u32 {
        let (memory, pids) = if i % 2 == 0 {
            (Some(64 * MIB), 40 + i)
        } else {
            (None, 100 + i)
        };
        let (lines, out) = cgroup_view(&sandbox, memory, pids).await;
        assert!(lines[0].contains("-warm"), "not a warm cgroup: {out:?}");
        match memory {
            Some(bytes) => assert_eq!(lines[1], bytes.to_string(), "attempt {i}: {out:?}"),
            None => assert_eq!(lines[1], unlimited, "attempt {i}: {out:?}"),
        }
        if lines[2] != "none" {
            assert_eq!(lines[2], pids.to_string(), "attempt {i}: {out:?}");
        }
        reused += usize::from(last.as_deref() == Some(lines[0].as_str()));
        last = Some(lines[0].clone());
    }
    // Each attempt after the first takes the cgroup the one before it left.
    assert_eq!(reused, 7, "attempts did not reuse the cgroup before theirs");
}

/// An attempt in a reused cgroup reports its own peak memory, not the one before it.
#[tokio::test]
async fn sandbox_reused_cgroup_counts_its_own_peak() {
    let Some(sandbox) = own_warm_sandbox().await else {
        return;
    };
    let script = r#"grep ':memory:' /proc/self/cgroup | cut -d: -f3; x=$(head -c 48000000 /dev/zero | tr "\0" a); echo ${#x}"#;
    let (used, big) = first_line_of(&sandbox, script, Some(512 * MIB)).await;
    assert_eq!(big.outcome.class, ExitClass::Exited(0), "{big:?}");
    let Some(big_peak) = big.outcome.peak_memory_bytes else {
        eprintln!("*** SKIPPED: no peak memory counter on this host ***");
        return;
    };
    assert!(big_peak >= 40 * MIB, "{big:?}");
    let (lines, small) = cgroup_view(&sandbox, Some(512 * MIB), 64).await;
    assert_eq!(
        used.as_deref(),
        Some(lines[0].as_str()),
        "not the same cgroup: {big:?} {small:?}"
    );
    let small_peak = small.outcome.peak_memory_bytes.expect("a peak");
    assert!(
        small_peak < 16 * MIB,
        "the last attempt's peak carried over: {small:?}"
    );
}

/// A cgroup charged for shared memory the attempt left behind (a file in /dev/shm, which
/// nothing can reclaim without swap) is not reused: it would count against the next one's limit.
#[tokio::test]
async fn sandbox_cgroup_holding_shared_memory_is_not_reused() {
    let Some(sandbox) = own_warm_sandbox().await else {
        return;
    };
    let file = format!("/dev/shm/drover-test-shm-{}", std::process::id());
    // 2 MB: under the charge a reused cgroup may keep, so only the shared-memory check stops it.
    let script = format!(
        "grep ':memory:' /proc/self/cgroup | cut -d: -f3; head -c 2000000 /dev/zero > {file}"
    );
    let (left, out) = first_line_of(&sandbox, &script, None).await;
    let (lines, next) = cgroup_view(&sandbox, None, 64).await;
    let _ = std::fs::remove_file(&file);
    assert_eq!(out.outcome.class, ExitClass::Exited(0), "{out:?}");
    assert_ne!(
        left.as_deref(),
        Some(lines[0].as_str()),
        "the next attempt got the cgroup charged for {file}: {next:?}"
    );
}

/// A cgroup the task made a child cgroup in is not reused (the next attempt would find a
/// cgroup no new one has), and goes with its child.
#[tokio::test]
async fn sandbox_cgroup_with_a_child_cgroup_is_not_reused() {
    let Some(sandbox) = own_warm_sandbox().await else {
        return;
    };
    let script = "p=$(grep ':memory:' /proc/self/cgroup | cut -d: -f3); echo $p; \
                  mkdir /sys/fs/cgroup/memory$p/child";
    let (left, out) = first_line_of(&sandbox, script, None).await;
    assert_eq!(out.outcome.class, ExitClass::Exited(0), "{out:?}");
    let left = left.expect("the cgroup path");
    let (lines, next) = cgroup_view(&sandbox, None, 64).await;
    assert_ne!(
        left, lines[0],
        "the next attempt got the cgroup with a child cgroup in it: {next:?}"
    );
    let dir = format!("/sys/fs/cgroup/memory{left}");
    assert!(
        !Path::new(&dir).exists(),
        "{dir} was neither reused nor removed"
    );
}

/// A cgroup whose attempt was OOM-killed is never reused: its `oom_kill` counter cannot be
/// reset, and the next attempt would read it as its own.
#[tokio::test]
async fn sandbox_oom_killed_cgroup_is_not_reused() {
    let Some(sandbox) = own_warm_sandbox().await else {
        return;
    };
    let script = r#"grep ':memory:' /proc/self/cgroup | cut -d: -f3; x=$(head -c 300000000 /dev/zero | tr "\0" a); echo survived"#;
    let (killed, out) = first_line_of(&sandbox, script, Some(64 * MIB)).await;
    assert_eq!(out.outcome.class, ExitClass::OomKilled, "{out:?}");
    let killed = killed.expect("the cgroup path");
    assert!(killed.contains("-warm"), "{out:?}");
    for i in 0..3 {
        let (lines, out) = cgroup_view(&sandbox, Some(64 * MIB), 64).await;
        assert_ne!(
            lines[0], killed,
            "attempt {i} got the OOM-killed cgroup: {out:?}"
        );
    }
}

#[tokio::test]
async fn sandbox_wall_time_limit_times_out() {
    if skip() {
        return;
    }
    for isolation in BOTH {
        let mut job = Job::sh("sleep 1000", isolation);
        job.limits.wall_time_ms = Some(200);
        let out = run(&job).await;
        assert_eq!(out.outcome.class, ExitClass::TimedOut, "{isolation:?}");
    }
}

#[tokio::test]
async fn sandbox_cancel_is_cancelled() {
    if skip() {
        return;
    }
    for isolation in BOTH {
        let ws = tempfile::tempdir().expect("workspace");
        let cancel = CancellationToken::new();
        cancel.cancel();
        let job = Job::sh("sleep 1000", isolation);
        let out = run_with(&sandbox(), &job, ws.path(), cancel).await;
        assert_eq!(out.outcome.class, ExitClass::Cancelled, "{isolation:?}");
    }
}

/// How a daemonizing task is ended.
#[derive(Debug, Clone, Copy)]
enum Ending {
    Cancel,
    MainExits,
}

/// A task whose grandchild escapes its process group and session (setsid + double fork) and
/// is reparented away from it; the grandchild must still be gone when `wait` returns.
async fn daemon_is_gone(sandbox: &Sandbox, isolation: Isolation, ending: Ending) {
    let marker = 900_000 + std::process::id() % 10_000 * 10 + ending as u32 * 2 + isolation as u32;
    let script = format!(
        "setsid sh -c 'sleep {marker} & echo $! > daemon.pid'; echo ready >&3; \
         while [ ! -e go ]; do sleep 0.05; done; exit 0"
    );
    let ws = tempfile::tempdir().expect("workspace");
    let job = Job::sh(&script, isolation);
    let mut attempt = sandbox.spawn(job.spec(ws.path())).await.expect("spawn");
    let events = attempt.events.take().expect("events");
    let mut events = BufReader::new(events).lines();
    let ready = bounded(events.next_line()).await.expect("read events");
    assert_eq!(ready.as_deref(), Some("ready"));
    // Find the daemon among the cgroup's processes by its unique argument.
    let mut daemon = None;
    let found = eventually(|| {
        daemon = attempt.cgroup_pids().into_iter().find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c == format!("sleep\0{marker}\0").as_bytes())
        });
        daemon.is_some()
    })
    .await;
    assert!(found, "the daemonized grandchild never showed up");
    let daemon = daemon.expect("found");
    if matches!(isolation, Isolation::Process) {
        let written = std::fs::read_to_string(ws.path().join("daemon.pid")).expect("daemon.pid");
        assert_eq!(written.trim(), daemon.to_string());
    }
    let cancel = CancellationToken::new();
    match ending {
        Ending::Cancel => cancel.cancel(),
        Ending::MainExits => std::fs::write(ws.path().join("go"), b"").expect("go"),
    }
    let dirs: Vec<PathBuf> = attempt.cgroup_dirs();
    let outcome = bounded(attempt.wait(cancel)).await;
    let expected = match ending {
        Ending::Cancel => ExitClass::Cancelled,
        Ending::MainExits => ExitClass::Exited(0),
    };
    assert_eq!(outcome.class, expected, "{isolation:?} {ending:?}");
    // With process isolation the dead daemon is reparented to the host's pid 1, which may take
    // a while to reap it (here: about 2 s); `gone` waits for that too.
    assert!(
        eventually(|| gone(daemon)).await,
        "{isolation:?} {ending:?}: daemon {daemon} survived the attempt"
    );
    // Removed, or (v1) a warm one, emptied, handed back for a later attempt.
    for dir in dirs {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        assert!(
            !procs.lines().any(|p| p.trim() == daemon.to_string()),
            "the daemon is still in {}",
            dir.display()
        );
        let warm = dir.to_string_lossy().contains("-warm");
        assert!(
            !dir.exists() || warm,
            "cgroup {} not removed",
            dir.display()
        );
    }
}

#[tokio::test]
async fn sandbox_daemonized_grandchild_dies_with_the_attempt() {
    if skip() {
        return;
    }
    for isolation in BOTH {
        for ending in [Ending::Cancel, Ending::MainExits] {
            daemon_is_gone(&sandbox(), isolation, ending).await;
        }
    }
}

#[tokio::test]
async fn sandbox_v1_without_freezer_still_kills_the_tree() {
    if skip() {
        return;
    }
    let detected = sandbox();
    let Hierarchy::V1(bases) = &detected.inner.hierarchy else {
        eprintln!("*** SKIPPED: not a cgroup v1 host ***");
        return;
    };
    let bases = v1::Bases {
        freezer: None,
        ..bases.clone()
    };
    let sandbox = Sandbox::with_parts(Hierarchy::V1(bases), detected.namespaces(), false);
    for isolation in BOTH {
        daemon_is_gone(&sandbox, isolation, Ending::Cancel).await;
    }
}

/// The v2 kill path (cgroup.kill, populated, rmdir) on the cgroup2 mount of a hybrid host,
/// which has no memory controller: limits are off, the tree handling is real.
#[tokio::test]
async fn sandbox_v2_kill_path_on_the_unified_mount() {
    if skip() {
        return;
    }
    let unified = Path::new("/sys/fs/cgroup/unified");
    let own = std::fs::read_to_string("/proc/self/cgroup").expect("own cgroup");
    let rel = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or("/");
    let parent = unified.join(rel.trim_start_matches('/'));
    if !parent.join("cgroup.procs").exists() || rel != "/" {
        eprintln!(
            "*** SKIPPED: no cgroup2 mount at {} to test on ***",
            unified.display()
        );
        return;
    }
    /// Removes the test's base cgroup even when the test fails.
    struct RemoveOnDrop(PathBuf);
    impl Drop for RemoveOnDrop {
        fn drop(&mut self) {
            if let Err(err) = std::fs::remove_dir(&self.0) {
                eprintln!("cannot remove {}: {err}", self.0.display());
            }
        }
    }
    let dir = parent.join(format!("drover-test-v2-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("base");
    let _remove = RemoveOnDrop(dir.clone());
    let base = v2::Base {
        dir: dir.clone(),
        memory: false,
        pids: false,
    };
    let sandbox = Sandbox::with_parts(Hierarchy::V2(base), sandbox().namespaces(), false);
    for isolation in BOTH {
        for ending in [Ending::Cancel, Ending::MainExits] {
            daemon_is_gone(&sandbox, isolation, ending).await;
        }
        let mut job = Job::sh("exit 5", isolation);
        job.limits.pids = None;
        let ws = tempfile::tempdir().expect("workspace");
        let out = run_with(&sandbox, &job, ws.path(), CancellationToken::new()).await;
        assert_eq!(out.outcome.class, ExitClass::Exited(5));
    }
}

#[tokio::test]
async fn sandbox_with_a_user_namespace() {
    if skip() {
        return;
    }
    // The path a non-root worker takes, forced as root (root maps to itself).
    let mut sandbox = Sandbox::detect(None).expect("detect");
    sandbox.set_user_namespace(true);
    for network in [NetworkPolicy::None, NetworkPolicy::Host] {
        let script = "cat /proc/self/uid_map; for p in /proc/[0-9]*; do echo ${p#/proc/}; done; \
                      echo x > /tmp/f && cat /tmp/f; exit 4";
        let mut job = Job::sh(script, Isolation::Sandbox);
        job.network = network;
        let ws = tempfile::tempdir().expect("workspace");
        let out = run_with(&sandbox, &job, ws.path(), CancellationToken::new()).await;
        assert_eq!(
            out.outcome.class,
            ExitClass::Exited(4),
            "{network:?} {out:?}"
        );
        let got = lines(&out.stdout);
        assert_eq!(
            got[0].split_whitespace().collect::<Vec<_>>(),
            ["0", "0", "1"]
        );
        assert_eq!(&got[1..], ["1", "2", "x"], "{out:?}");
    }
}

#[tokio::test]
async fn sandbox_unknown_command_fails_to_spawn_and_cleans_up() {
    if skip() {
        return;
    }
    for isolation in BOTH {
        let mut job = Job::sh("", isolation);
        job.argv = vec!["drover-no-such-command".into()];
        let ws = tempfile::tempdir().expect("workspace");
        let err = sandbox()
            .spawn(job.spec(ws.path()))
            .await
            .expect_err("spawned a missing command");
        match &err {
            SpawnError::Exec {
                errno, searched, ..
            } => {
                assert_eq!(*errno, Errno::ENOENT);
                assert!(
                    searched.contains("/usr/bin/drover-no-such-command"),
                    "{err}"
                );
            }
            other => panic!("{isolation:?}: unexpected {other}"),
        }
        for base in sandbox().cgroup_bases() {
            let left = std::fs::read_dir(&base)
                .expect("base")
                .filter_map(Result::ok)
                .any(|e| e.file_name().to_string_lossy().contains(&job.task));
            assert!(!left, "{isolation:?}: cgroup left in {}", base.display());
        }
    }
    // Other refusals happen before anything runs.
    let mut job = Job::sh("", Isolation::Process);
    job.env.insert("DROVER_TASK_ID".into(), "x".into());
    let ws = tempfile::tempdir().expect("workspace");
    assert!(matches!(
        sandbox().spawn(job.spec(ws.path())).await,
        Err(SpawnError::BadEnv { .. })
    ));
    let job = Job::sh("true", Isolation::Process);
    assert!(matches!(
        sandbox()
            .spawn(job.spec(Path::new("/nonexistent/ws")))
            .await,
        Err(SpawnError::Workspace { .. })
    ));
}

#[tokio::test]
async fn sandbox_dropped_attempt_kills_its_tree() {
    if skip() {
        return;
    }
    let ws = tempfile::tempdir().expect("workspace");
    let job = Job::sh("echo ready >&3; sleep 1000", Isolation::Sandbox);
    let mut attempt = sandbox().spawn(job.spec(ws.path())).await.expect("spawn");
    let mut events = BufReader::new(attempt.events.take().expect("events")).lines();
    assert_eq!(
        bounded(events.next_line())
            .await
            .expect("events")
            .as_deref(),
        Some("ready")
    );
    let pids = attempt.cgroup_pids();
    assert!(!pids.is_empty());
    drop(attempt);
    for pid in pids {
        assert!(
            eventually(|| gone(pid)).await,
            "pid {pid} survived a dropped attempt"
        );
    }
}

#[tokio::test]
async fn sandbox_task_cannot_undo_its_sandbox() {
    if skip() {
        return;
    }
    let script = "grep -E '^Cap(Inh|Bnd|Amb)' /proc/self/status; \
                  cat /proc/1/environ >/dev/null 2>&1 && echo READ-INIT-ENV; \
                  mkdir m && mount -t tmpfs x m 2>/dev/null && echo MOUNTED; \
                  mount -o remount,rw /sys 2>/dev/null && echo REMOUNTED; \
                  echo done";
    let out = run(&Job::sh(script, Isolation::Sandbox)).await;
    assert_eq!(out.outcome.class, ExitClass::Exited(0), "{out:?}");
    let got: Vec<Vec<&str>> = lines(&out.stdout)
        .iter()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        got,
        [
            vec!["CapInh:", "0000000000000000"],
            vec!["CapBnd:", "00000000a80425fb"],
            vec!["CapAmb:", "0000000000000000"],
            vec!["done"],
        ],
        "{out:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sandbox_many_attempts_at_once_on_a_multithreaded_runtime() {
    if skip() {
        return;
    }
    // Concurrent forks from several threads must not leak one attempt's pipes into another
    // (an attempt's output would then not end until an unrelated one did).
    let mut set = tokio::task::JoinSet::new();
    for i in 0..24 {
        set.spawn(async move {
            let job = Job::sh("echo $DROVER_TASK_ID; sleep 0.1", BOTH[i % 2]);
            let out = run(&job).await;
            (job.task, out)
        });
    }
    while let Some(joined) = bounded(set.join_next()).await {
        let (task, out) = joined.expect("join");
        assert_eq!(out.outcome.class, ExitClass::Exited(0), "{out:?}");
        assert_eq!(out.stdout.trim(), task);
    }
}

/// Hundreds of short attempts back to back, a few at a time, while the spawner tops its warm
/// cgroups up on its other threads: no helper may hang on a lock copied held from one of them
/// (a glibc `fork` in a helper once waited forever on malloc's lock this way).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_spawns_in_a_row_never_hang() {
    if skip() {
        return;
    }
    let sandbox = sandbox();
    let ws = tempfile::tempdir_in("/var/tmp").expect("workspace");
    let limits = Limits {
        pids: Some(16),
        ..Limits::default()
    };
    let mut set = tokio::task::JoinSet::new();
    for i in 0..300usize {
        let (sandbox, dir) = (sandbox.clone(), ws.path().to_path_buf());
        let limits = limits.clone();
        set.spawn(async move {
            let argv = vec!["true".to_owned()];
            let env = BTreeMap::new();
            let spec = AttemptSpec {
                task_id: &format!("row{i}"),
                attempt: 1,
                argv: &argv,
                env: &env,
                workspace: &dir,
                limits: &limits,
                network: NetworkPolicy::None,
                isolation: BOTH[i % 2],
                checkpoint_file: None,
                extra_env: &[],
                egress: None,
                confirmation: None,
            };
            let mut attempt = tokio::time::timeout(Duration::from_secs(20), sandbox.spawn(spec))
                .await
                .unwrap_or_else(|_| panic!("spawn {i} hung"))
                .expect("spawn");
            let outcome = tokio::time::timeout(
                Duration::from_secs(20),
                attempt.wait(CancellationToken::new()),
            )
            .await
            .unwrap_or_else(|_| panic!("attempt {i} hung"));
            assert_eq!(outcome.class, ExitClass::Exited(0), "attempt {i}");
        });
        while set.len() >= 4 {
            bounded(set.join_next())
                .await
                .expect("a job")
                .expect("join");
        }
    }
    while let Some(joined) = bounded(set.join_next()).await {
        joined.expect("join");
    }
}

/// A call whose caller goes before the spawner answers retires that spawner: its late reply
/// can never be read as the next call's, and the next call gets a new spawner that answers.
#[tokio::test]
async fn sandbox_call_given_up_before_its_reply_retires_the_spawner() {
    if skip() {
        return;
    }
    use nix::sys::signal::{kill, Signal};
    let sandbox = sandbox();
    let spawner = &sandbox.inner.spawner;
    let stopped = spawner.pid().await.expect("a spawner runs");
    // Stopped, it takes the request into its socket and never answers.
    kill(stopped, Signal::SIGSTOP).expect("stop the spawner");
    let call = spawner.call(&spawner::Request::Status, &[]);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), call)
            .await
            .is_err(),
        "a stopped spawner cannot answer"
    );
    let reply = bounded(spawner.call(&spawner::Request::Status, &[])).await;
    assert!(
        matches!(reply, Ok(spawner::Reply::Status { .. })),
        "{reply:?}"
    );
    let now = spawner.pid().await.expect("a spawner runs");
    assert_ne!(now, stopped, "the spawner that owed a reply was retired");
    // Killed and reaped, not left a zombie: its pid is gone (bounded wait).
    for _ in 0..500 {
        if kill(stopped, None).is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        kill(stopped, None).is_err(),
        "the retired spawner was reaped"
    );
    // And attempts still run.
    let ws = tempfile::tempdir().expect("workspace");
    let out = sandboxed(&sandbox, "echo fine", ws.path()).await;
    assert_eq!(out.outcome.class, ExitClass::Exited(0), "{out:?}");
}

/// Where the spawner cannot fork for the worker (qemu-user refuses `CLONE_PARENT`), the worker
/// forks attempts itself: both isolations still run, exit codes and output come through, and
/// a killed tree is gone.
#[tokio::test]
async fn sandbox_attempts_forked_by_the_worker_itself() {
    if skip() {
        return;
    }
    let sandbox = sandbox().forking_here();
    for isolation in BOTH {
        let job = Job::sh("echo here; exit 7", isolation);
        let ws = tempfile::tempdir().expect("workspace");
        let out = run_with(&sandbox, &job, ws.path(), CancellationToken::new()).await;
        assert_eq!(
            out.outcome.class,
            ExitClass::Exited(7),
            "{isolation:?}: {out:?}"
        );
        assert_eq!(out.stdout, "here\n");
    }
}

/// A task starts with every signal at its default: none ignored (an ignored SIGPIPE or SIGTERM
/// would survive the exec) and none caught — whether the spawner forked it (which ignores a
/// few signals itself, so its children restore only those) or the worker did (whose runtime
/// catches several, so its children reset them all).
#[tokio::test]
async fn sandbox_tasks_start_with_default_signal_dispositions() {
    if skip() {
        return;
    }
    let from_spawner = sandbox();
    let from_worker = from_spawner.forking_here();
    for (which, sandbox) in [("spawner", &from_spawner), ("worker", &from_worker)] {
        for isolation in BOTH {
            let job = Job::sh(
                "cat /proc/self/status | grep -E '^Sig(Ign|Cgt):'",
                isolation,
            );
            let ws = tempfile::tempdir().expect("workspace");
            let out = run_with(sandbox, &job, ws.path(), CancellationToken::new()).await;
            assert_eq!(
                out.outcome.class,
                ExitClass::Exited(0),
                "{which}, {isolation:?}: {out:?}"
            );
            assert_eq!(
                out.stdout, "SigIgn:\t0000000000000000\nSigCgt:\t0000000000000000\n",
                "{which}, {isolation:?}: the task inherited non-default signal dispositions"
            );
        }
    }
}

/// Not a test of anything: prints spawn latency (spawn() returning = the task has exec'd) and
/// the whole round trip for a no-op task. `cargo test -p drover-worker-agent sandbox_latency
/// -- --ignored --nocapture`.
#[tokio::test]
#[ignore]
async fn sandbox_latency() {
    if skip() {
        return;
    }
    let ws = tempfile::tempdir_in("/var/tmp").expect("workspace");
    let runs = [
        (Isolation::Sandbox, NetworkPolicy::None),
        (Isolation::Sandbox, NetworkPolicy::Host),
        (Isolation::Process, NetworkPolicy::Host),
    ];
    // Idle between samples, as between dispatches: a cgroup move after a pause waits for an
    // RCU grace period (see the `warm` module); back to back it rarely does.
    let gap = std::time::Duration::from_millis(30);
    let warm = sandbox();
    let cold = warm.cold();
    for (isolation, network) in runs {
        for (which, sandbox) in [("warm", &warm), ("cold", &cold)] {
            let mut job = Job::sh("", isolation);
            job.network = network;
            job.argv = vec!["/bin/true".into()];
            let (mut spawn, mut total) = (Vec::new(), Vec::new());
            for _ in 0..100 {
                tokio::time::sleep(gap).await;
                let start = std::time::Instant::now();
                let mut attempt = sandbox.spawn(job.spec(ws.path())).await.expect("spawn");
                spawn.push(start.elapsed());
                attempt.wait(CancellationToken::new()).await;
                total.push(start.elapsed());
            }
            spawn.sort();
            total.sort();
            eprintln!(
                "{isolation:?} network {network:?} {which}: \
                 spawn p50 {:?} p99 {:?}; spawn+wait p50 {:?} p99 {:?}",
                spawn[50], spawn[98], total[50], total[98]
            );
        }
    }
}

#[tokio::test]
async fn sandbox_detect_removes_cgroups_of_dead_workers() {
    if skip() {
        return;
    }
    // pid_max is at most 2^22, so this worker is certainly gone.
    let name = "drover-99999999-1-stale-a1";
    let bases = sandbox().cgroup_bases();
    for base in &bases {
        std::fs::create_dir(base.join(name)).expect("a stale cgroup");
    }
    let _detected = Sandbox::detect(None).expect("detect");
    for base in &bases {
        assert!(!base.join(name).exists(), "{} not cleaned", base.display());
    }
}

/// The task's file system view: the worker's private paths hidden (a directory, a file, the
/// other workspaces of the work directory), the host read-only, writable only its workspace,
/// /tmp and /dev/shm, a minimal /dev, no block device even when made with mknod, empty /run.
#[tokio::test]
async fn sandbox_hides_private_paths_and_keeps_the_host_read_only() {
    if skip() {
        return;
    }
    use std::os::unix::fs::MetadataExt as _;
    // Not under /tmp: the private /tmp would hide it anyway and prove nothing.
    let base = tempfile::tempdir_in("/var/tmp").expect("base");
    let base_path = base.path().canonicalize().expect("canonical");
    let b = |p: &str| base_path.join(p);
    std::fs::create_dir_all(b("etc")).expect("private dir");
    std::fs::write(b("etc/secret"), "SECRET-DIR-CANARY").expect("secret");
    std::fs::write(b("worker.key"), "SECRET-KEY-CANARY").expect("key");
    std::fs::create_dir_all(b("work/tasks/mine")).expect("workspace");
    std::fs::create_dir_all(b("work/tasks/other")).expect("other workspace");
    std::fs::write(b("work/tasks/other/out"), "OTHER-WS-CANARY").expect("other");
    std::fs::write(b("etc/public.conf"), "KEPT").expect("kept file");
    let private = vec![b("etc"), b("worker.key"), b("work")];
    let root_dev = std::fs::metadata("/").expect("/").dev();
    let (major, minor) = (libc::major(root_dev), libc::minor(root_dev));
    let script = format!(
        r#"B={base}
cat $B/etc/secret 2>/dev/null; ls -A $B/etc
cat $B/worker.key 2>/dev/null && echo READ-KEY
cat /etc/shadow /etc/ssh/ssh_host_*_key 2>/dev/null | grep -q . && echo READ-HOST-SECRETS
ls -A $B/work/tasks; cat $B/work/tasks/other/out 2>/dev/null
cat $B/etc/public.conf; echo
echo changed > $B/etc/public.conf 2>/dev/null && echo WROTE-KEPT
if [ -x /usr/bin/python3 ]; then python3 -c 'import os; os.openpty(); print("pty-ok")'; else echo pty-ok; fi
for d in / /etc /usr /var/tmp $B $B/work/tasks /sys /proc/sys/kernel; do
  touch $d/drover-probe 2>/dev/null && echo WROTE $d
done
touch ./ws-file /tmp/tmp-file /dev/shm/shm-file && echo writable-ok
echo x > /dev/null && head -c 4 /dev/zero | wc -c
ls -A /dev | tr '\n' ' '; echo
ls -A /run | wc -l
mknod ./disk b {major} {minor} 2>/dev/null; head -c 1 ./disk >/dev/null 2>&1 && echo READ-DISK
echo end"#,
        base = base_path.display()
    );
    for user_namespace in [false, true] {
        let mut sandbox = Sandbox::detect_hiding(None, private.clone()).expect("detect");
        sandbox.set_user_namespace(user_namespace);
        sandbox.keep(vec![b("etc/public.conf")]);
        for network in [NetworkPolicy::None, NetworkPolicy::Host] {
            let mut job = Job::sh(&script, Isolation::Sandbox);
            job.network = network;
            let out = run_with(
                &sandbox,
                &job,
                &b("work/tasks/mine"),
                CancellationToken::new(),
            )
            .await;
            let what = format!("user namespace {user_namespace}, network {network:?}: {out:?}");
            assert_eq!(out.outcome.class, ExitClass::Exited(0), "{what}");
            assert_eq!(
                lines(&out.stdout),
                [
                    "public.conf",
                    "mine",
                    "KEPT",
                    "pty-ok",
                    "writable-ok",
                    "4",
                    "fd full null ptmx pts random shm stderr stdin stdout tty urandom zero ",
                    "0",
                    "end"
                ],
                "{what}"
            );
            assert!(b("work/tasks/mine/ws-file").exists(), "{what}");
            for leftover in ["drover-probe", "tmp-file"] {
                assert!(!b(leftover).exists() && !Path::new("/").join(leftover).exists());
            }
        }
    }
    // The reading part with process isolation sees everything: the probe can fail.
    let reads = script.lines().take(5).collect::<Vec<_>>().join("\n");
    let mut job = Job::sh(&reads, Isolation::Process);
    job.network = NetworkPolicy::Host;
    let sandbox = Sandbox::detect_hiding(None, private.clone()).expect("detect");
    let ws = b("work/tasks/mine");
    let out = run_with(&sandbox, &job, &ws, CancellationToken::new()).await;
    assert!(out.stdout.contains("SECRET-DIR-CANARY"), "{out:?}");
    assert!(out.stdout.contains("READ-KEY"), "{out:?}");
    assert!(out.stdout.contains("READ-HOST-SECRETS"), "{out:?}");
    assert!(out.stdout.contains("OTHER-WS-CANARY"), "{out:?}");
}

/// A spawn request too large to send inline travels in a memfd, and with the most descriptors
/// a spawn has: stdio, setup, events, status, the proxy's socket, the confirm pipe and the
/// memfd (nine). The task gets its whole environment, its proxy and its confirmation.
#[tokio::test]
async fn sandbox_spawn_too_large_to_send_inline_with_every_descriptor() {
    if skip() {
        return;
    }
    let ws = tempfile::tempdir().expect("workspace");
    let mut job = Job::sh(
        "printf %s \"$BIG\" | wc -c; echo \"${HTTPS_PROXY:-no proxy}\"",
        Isolation::Sandbox,
    );
    job.network = NetworkPolicy::Proxy;
    // Well past the 48 KiB sent inline.
    let big = "x".repeat(100 * 1024);
    job.env.insert("BIG".into(), big.clone());
    let spec: drover_protocol::task::TaskSpec =
        serde_json::from_str(r#"{"name":"t","command":["true"],"network":"proxy"}"#).expect("spec");
    let (tx, _events) = tokio::sync::mpsc::channel(64);
    let egress = crate::egress::Egress::new(
        &job.task,
        &spec,
        &[],
        Err("no upstream in this test".into()),
        tx,
        ws.path(),
    )
    .expect("egress");
    // Confirmed already: the spawn returns once the task has exec'd, which waits for it.
    let (_confirm, confirmed) = tokio::sync::watch::channel(true);
    let confirmation = crate::stream::Confirmation::Pending(confirmed);
    let mut attempt_spec = job.spec(ws.path());
    attempt_spec.egress = Some(&egress);
    attempt_spec.confirmation = Some(&confirmation);
    let mut attempt = bounded(sandbox().spawn(attempt_spec)).await.expect("spawn");
    let (stdout, stderr) = (attempt.stdout.take(), attempt.stderr.take());
    let (outcome, stdout, stderr) = bounded(async {
        tokio::join!(
            attempt.wait(CancellationToken::new()),
            read_all(stdout),
            read_all(stderr)
        )
    })
    .await;
    assert_eq!(outcome.class, ExitClass::Exited(0), "{stderr}");
    let got = lines(&stdout);
    assert_eq!(
        got.first().map(|n| n.trim()),
        Some(big.len().to_string().as_str()),
        "{stderr}"
    );
    assert!(
        got.get(1).is_some_and(|p| p.contains("127.0.0.1")),
        "no proxy: {stdout} {stderr}"
    );
}

/// The worker's private paths are each listed once (every sandboxed attempt looks each up):
/// the TLS files' shared directory too, and a file named twice.
#[test]
fn private_paths_are_listed_once() {
    let mut config = crate::config::WorkerConfig::default();
    config.tls.ca = "/etc/drover/tls/ca.crt".into();
    config.tls.cert = "/etc/drover/tls/w.crt".into();
    config.tls.key = "/etc/drover/tls/w.crt".into();
    config.work_dir = "/var/lib/drover-worker".into();
    let paths = super::private_paths(&config);
    let wanted: Vec<PathBuf> = [
        "/etc/drover/tls/ca.crt",
        "/etc/drover/tls",
        "/etc/drover/tls/w.crt",
        "/var/lib/drover-worker",
    ]
    .iter()
    .map(PathBuf::from)
    .collect();
    assert_eq!(paths, wanted);
}
