//! Standby helpers (see `sandbox::standby`) with the real worker binary: the library's own
//! tests cannot exec their test binary as a helper, so they cover the fork path, and this
//! test the hand-off to a helper started ahead — its plan, descriptors, network namespace made
//! ahead and pids limit — the sandbox a helper makes ahead (its view: namespaces, mounts,
//! the workspace bound in when the plan comes), a helper whose view is not the attempt's, and
//! the fall-back to a fork when a helper has died.
//!
//! Needs root and cgroup v1 (warm cgroups, which hold the helpers); otherwise it prints a loud
//! SKIPPED line and passes. No timing is asserted; every wait is bounded.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use drover_protocol::task::{ExitClass, Isolation, Limits, NetworkPolicy};
use drover_worker::sandbox::{standby, AttemptSpec, Sandbox};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio_util::sync::CancellationToken;

struct Run {
    class: ExitClass,
    stdout: String,
    stderr: String,
}

async fn read_all(reader: Option<impl AsyncRead + Unpin>) -> String {
    let mut text = String::new();
    if let Some(mut r) = reader {
        r.read_to_string(&mut text).await.expect("read a pipe");
    }
    text
}

async fn run(sandbox: &Sandbox, script: &str, isolation: Isolation, pids: u32) -> Run {
    run_in(sandbox, script, isolation, pids, NetworkPolicy::None).await
}

async fn run_in(
    sandbox: &Sandbox,
    script: &str,
    isolation: Isolation,
    pids: u32,
    network: NetworkPolicy,
) -> Run {
    let argv = vec!["sh".to_owned(), "-c".to_owned(), script.to_owned()];
    let env = BTreeMap::new();
    let limits = Limits {
        memory_bytes: None,
        pids: Some(pids),
        wall_time_ms: Some(120_000),
    };
    let ws = tempfile::tempdir().expect("workspace");
    let spec = AttemptSpec {
        task_id: "standby-test",
        attempt: 1,
        argv: &argv,
        env: &env,
        workspace: ws.path(),
        limits: &limits,
        network,
        isolation,
        checkpoint_file: None,
        extra_env: &[],
        egress: None,
        confirmation: None,
    };
    let ran = async {
        let mut attempt = sandbox.spawn(spec).await.expect("spawn");
        let (stdout, stderr) = (attempt.stdout.take(), attempt.stderr.take());
        let (outcome, stdout, stderr) = tokio::join!(
            attempt.wait(CancellationToken::new()),
            read_all(stdout),
            read_all(stderr)
        );
        Run {
            class: outcome.class,
            stdout,
            stderr,
        }
    };
    tokio::time::timeout(Duration::from_secs(120), ran)
        .await
        .expect("the attempt did not end within its bound")
}

/// This process's children named like a standby helper: (pid, state letter).
fn standby_children() -> Vec<(i32, char)> {
    let me = std::process::id().to_string();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let Some((head, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        let mut fields = rest.split(' ');
        let (Some(state), Some(ppid)) = (fields.next(), fields.next()) else {
            continue;
        };
        if ppid == me && head.ends_with(&format!("({}", standby::COMM)) {
            if let (Ok(pid), Some(state)) = (
                head.split(' ').next().unwrap_or("").parse(),
                state.chars().next(),
            ) {
                found.push((pid, state));
            }
        }
    }
    found
}

/// Standby helpers that wait for a plan: still in this process's mount namespace, or with a
/// sandbox made ahead whose init has started nothing (one that runs an attempt has made its
/// own namespace, and its init has started the task).
fn idle_helpers() -> Vec<i32> {
    let ours = std::fs::read_link("/proc/self/ns/mnt").expect("own mount namespace");
    let children = |pid: i32| {
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
            .collect::<Vec<_>>()
    };
    let waiting_init = |pid: i32| {
        std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .is_ok_and(|c| c.trim() == standby::READY_COMM)
            && children(pid).is_empty()
    };
    standby_children()
        .into_iter()
        .filter(|&(pid, state)| {
            state != 'Z'
                && (std::fs::read_link(format!("/proc/{pid}/ns/mnt")).is_ok_and(|ns| ns == ours)
                    || matches!(children(pid)[..], [init] if waiting_init(init)))
        })
        .map(|(pid, _)| pid)
        .collect()
}

fn zombies() -> Vec<i32> {
    standby_children()
        .into_iter()
        .filter(|&(_, state)| state == 'Z')
        .map(|(pid, _)| pid)
        .collect()
}

#[tokio::test]
async fn attempts_start_from_standby_helpers_and_fall_back_when_one_died() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("\n*** SKIPPED: needs root (namespaces, cgroups) ***\n");
        return;
    }
    if !Path::new("/sys/fs/cgroup/memory").is_dir() {
        eprintln!(
            "\n*** SKIPPED: no cgroup v1 here, so no warm cgroups to hold standby helpers ***\n"
        );
        return;
    }
    let exe = std::ffi::CString::new(env!("CARGO_BIN_EXE_drover-worker")).expect("no NUL");
    standby::enable_with(&exe);
    let sandbox = Sandbox::detect(None).expect("detect");
    let comm = "cat /proc/1/comm";

    // Warm cgroups and their helpers get ready in the background; the sandbox's init (pid 1)
    // has its outer helper's name.
    let mut from_standby = false;
    for _ in 0..100 {
        let r = run(&sandbox, comm, Isolation::Sandbox, 64).await;
        assert_eq!(r.class, ExitClass::Exited(0), "{}", r.stderr);
        if [standby::COMM, standby::READY_COMM].contains(&r.stdout.trim()) {
            from_standby = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(from_standby, "no attempt started from a standby helper");

    // Attempts closer together than 10 ms get forks (a flood: see `warm::wants_standby`).
    let apart = || tokio::time::sleep(Duration::from_millis(30));

    // Helpers started after that attempt make its sandbox ahead; the attempt that meets one
    // finds its init named for it. What such a helper was handed works as in one it made
    // at the attempt: its own network namespace (only `lo`), the hostname, the environment,
    // the workspace writable and the host's tree not, a private /tmp, the pids limit written
    // before the hand-off (a fork bomb stops at it). Each run is checked; they go on, apart,
    // until one came from a helper that made its sandbox ahead.
    let checks = "cat /proc/1/comm; ls /sys/class/net; hostname; echo \"$DROVER_TASK_ID\"; \
                  echo written > \"$DROVER_WORKSPACE/f\" && cat \"$DROVER_WORKSPACE/f\"; \
                  touch /usr/drover-x 2>/dev/null || echo read-only; \
                  touch \"$(dirname \"$DROVER_WORKSPACE\")/drover-x\" && echo tmp-writable; \
                  ls -A \"$(dirname \"$DROVER_WORKSPACE\")\" | wc -l; \
                  sh -c 'for i in 1 2 3 4 5 6 7 8; do sleep 100 >/dev/null 2>&1 & done'; exit 0";
    let mut prepared = false;
    for _ in 0..100 {
        apart().await;
        let r = run(&sandbox, checks, Isolation::Sandbox, 5).await;
        assert_eq!(r.class, ExitClass::Exited(0), "{}", r.stderr);
        let lines: Vec<&str> = r.stdout.lines().collect();
        assert_eq!(
            lines[1..],
            [
                "lo",
                "drover-standby-test",
                "standby-test",
                "written",
                "read-only",
                "tmp-writable",
                // The private /tmp holds the workspace and the file just made, nothing of the
                // host's /tmp.
                "2"
            ],
            "{}",
            r.stderr
        );
        assert!(
            r.stderr.to_lowercase().contains("fork"),
            "the pids limit did not stop the bomb: {}",
            r.stderr
        );
        if lines[0] == standby::READY_COMM {
            prepared = true;
            break;
        }
        assert_eq!(lines[0], standby::COMM, "{}", r.stderr);
    }
    assert!(prepared, "no attempt met a sandbox made ahead");

    // The host's network is another sandbox than the one made ahead (no network namespace of
    // its own, the host's /sys): a helper that made that one is not handed the attempt (it is
    // let go and the attempt forked, unless a helper that made nothing is ready); the helpers
    // after it make the host's ahead.
    let host_net = "cat /proc/1/comm; ls /sys/class/net | grep -cvx lo";
    let mut prepared = false;
    for _ in 0..100 {
        apart().await;
        let r = run_in(
            &sandbox,
            host_net,
            Isolation::Sandbox,
            64,
            NetworkPolicy::Host,
        )
        .await;
        assert_eq!(r.class, ExitClass::Exited(0), "{}", r.stderr);
        let lines: Vec<&str> = r.stdout.lines().collect();
        assert_ne!(lines.get(1), Some(&"0"), "only lo: {}", r.stdout);
        if lines[0] == standby::READY_COMM {
            prepared = true;
            break;
        }
    }
    assert!(
        prepared,
        "no sandbox with the host's network was made ahead"
    );
    // And back: a sandbox without network is not started from one made for the host's.
    apart().await;
    let r = run(&sandbox, "ls /sys/class/net", Isolation::Sandbox, 64).await;
    assert_eq!(
        (r.class, r.stdout.as_str()),
        (ExitClass::Exited(0), "lo\n"),
        "{}",
        r.stderr
    );
    // A process-isolation attempt may take a cgroup with a helper too: it execs the task.
    apart().await;
    let r = run(&sandbox, "echo ok", Isolation::Process, 64).await;
    assert_eq!(
        (r.class, r.stdout.as_str()),
        (ExitClass::Exited(0), "ok\n"),
        "{}",
        r.stderr
    );
    // Sandboxed again, so the pool starts helpers again.
    apart().await;
    run(&sandbox, "true", Isolation::Sandbox, 64).await;

    // Once the pool is quiet (every warm cgroup ready), kill its idle helpers: the next
    // attempt's hand-off fails, it is forked instead, and the dead helper is reaped.
    let mut last = Vec::new();
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = idle_helpers();
        if !now.is_empty() && now == last {
            break;
        }
        last = now;
    }
    assert!(!last.is_empty(), "no idle standby helpers to kill");
    for pid in &last {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), nix::sys::signal::SIGKILL);
    }
    for _ in 0..100 {
        if zombies().len() >= last.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Cgroups readied since without helpers (after the process attempt) are taken first:
    // attempts go on, apart, until one meets a dead helper.
    let dead = zombies();
    let mut met = false;
    for _ in 0..20 {
        apart().await;
        let r = run(&sandbox, comm, Isolation::Sandbox, 64).await;
        assert_eq!(r.class, ExitClass::Exited(0), "{}", r.stderr);
        if zombies().len() < dead.len() {
            assert!(
                ![standby::COMM, standby::READY_COMM].contains(&r.stdout.trim()),
                "started from a dead helper? {}",
                r.stdout
            );
            met = true;
            break;
        }
    }
    assert!(
        met,
        "no dead helper was reaped: {dead:?} before, {:?} after",
        zombies()
    );
}
