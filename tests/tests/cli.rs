//! `drover dev` as a new user runs it: it starts a coordinator and two workers, prints the
//! environment and commands to try (which work as printed), and on SIGTERM stops everything it
//! started and exits 0.

use drover_protocol::{FleetSummary, WorkerInfo, WorkerState};
use drover_tests::{
    bin, command, free_udp_port, pid_exists, run_bounded, signal, tail, wait_exit, Guard, DEADLINE,
    RUN_DEADLINE,
};
use nix::sys::signal::Signal;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// `drover dev` waits up to 15 s for its coordinator and 20 s for its workers; allow both.
const DEV_START_DEADLINE: Duration = Duration::from_secs(60);

/// A CLI command with only `DROVER_CONFIG` set, as the banner tells the user to do.
fn with_dev_env(cmd: &mut Command, home: &Path, cli_config: &Path) {
    let program = PathBuf::from(cmd.get_program());
    let args: Vec<_> = cmd.get_args().map(|a| a.to_owned()).collect();
    *cmd = command(&program, home);
    cmd.args(args).env("DROVER_CONFIG", cli_config);
}

#[test]
fn drover_dev_runs_a_fleet_and_stops_it_on_sigterm() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let home = tmp.path();
    let state_dir = home.join("dev");
    let port = free_udp_port();
    let stderr_path = home.join("dev.stderr");
    let stderr = std::fs::File::create(&stderr_path).expect("create stderr file");
    let mut cmd = command(&bin("drover"), home);
    cmd.args(["dev", "--workers", "2", "--state-dir"])
        .arg(&state_dir)
        .args(["--port", &port.to_string()])
        .stdout(Stdio::piped())
        .stderr(stderr);
    let mut dev = Guard::spawn(&mut cmd);
    let dev_log = || {
        format!(
            "--- drover dev stderr ---\n{}\n--- coordinator log ---\n{}",
            std::fs::read_to_string(&stderr_path).unwrap_or_default(),
            tail(
                &std::fs::read_to_string(state_dir.join("logs/coordinator.log"))
                    .unwrap_or_default(),
                30
            )
        )
    };

    // Read the banner up to "Press Ctrl-C" (bounded).
    let (tx, rx) = mpsc::channel();
    let out = dev.child.stdout.take().expect("piped stdout");
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let start = Instant::now();
    let mut banner = Vec::new();
    loop {
        let left = DEV_START_DEADLINE.saturating_sub(start.elapsed());
        match rx.recv_timeout(left) {
            Ok(Ok(line)) => {
                let done = line.contains("Press Ctrl-C");
                banner.push(line);
                if done {
                    break;
                }
            }
            Ok(Err(e)) => panic!("reading drover dev's stdout: {e}"),
            Err(e) => panic!(
                "no \"Press Ctrl-C\" from drover dev ({e:?}); printed so far:\n{}\n{}",
                banner.join("\n"),
                dev_log()
            ),
        }
    }
    let banner_text = banner.join("\n");

    // The environment to use, and the processes it started.
    let cli_config = banner
        .iter()
        .find_map(|l| l.trim().strip_prefix("export DROVER_CONFIG="))
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("no `export DROVER_CONFIG=` line in:\n{banner_text}"));
    assert!(cli_config.is_file(), "{}", cli_config.display());
    let pids: Vec<i32> = banner
        .iter()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            words.find(|w| *w == "pid")?;
            words.next()?.parse().ok()
        })
        .collect();
    assert_eq!(pids.len(), 3, "coordinator + 2 workers in:\n{banner_text}");
    assert!(
        banner_text.contains(&format!("127.0.0.1:{port}")),
        "{banner_text}"
    );
    for pid in &pids {
        assert!(pid_exists(*pid), "pid {pid} from the banner is not running");
    }

    // The fleet is up, seen through the CLI with only DROVER_CONFIG set.
    let mut status = command(&bin("drover"), home);
    status.args(["status", "--json"]);
    with_dev_env(&mut status, home, &cli_config);
    let out = run_bounded(&mut status, RUN_DEADLINE);
    assert!(out.status.success(), "{out:?}\n{}", dev_log());
    let summary: FleetSummary = serde_json::from_slice(&out.stdout).expect("status JSON");
    assert_eq!(summary.workers.ready, 2, "{summary:?}");

    let mut workers = command(&bin("drover"), home);
    workers.args(["workers", "--json"]);
    with_dev_env(&mut workers, home, &cli_config);
    let out = run_bounded(&mut workers, RUN_DEADLINE);
    assert!(out.status.success(), "{out:?}");
    let list: Vec<WorkerInfo> = serde_json::from_slice(&out.stdout).expect("workers JSON");
    let names: Vec<&str> = list.iter().map(|w| w.name.as_str()).collect();
    assert_eq!(names, ["dev-worker-1", "dev-worker-2"]);
    assert!(list.iter().all(|w| w.state == WorkerState::Ready));

    // Every command the banner suggests works as printed.
    let suggested: Vec<Vec<String>> = banner
        .iter()
        .skip_while(|l| !l.starts_with("Try"))
        .skip(1)
        .map(|l| l.trim())
        .filter(|l| !l.is_empty() && !l.starts_with("export ") && !l.starts_with("Press"))
        .map(|l| l.split_whitespace().map(str::to_owned).collect())
        .collect();
    assert!(suggested.len() >= 3, "{banner_text}");
    for words in &suggested {
        let mut cmd = Command::new(&words[0]);
        cmd.args(&words[1..]);
        with_dev_env(&mut cmd, home, &cli_config);
        let out = run_bounded(&mut cmd, RUN_DEADLINE);
        assert!(
            out.status.success(),
            "suggested command {words:?} failed: {out:?}"
        );
        assert!(!out.stdout.is_empty(), "{words:?} printed nothing");
    }

    // SIGTERM: everything stops, dev exits 0, no child is left.
    signal(&dev.child, Signal::SIGTERM);
    let exit = wait_exit(&mut dev.child, DEADLINE)
        .unwrap_or_else(|| panic!("drover dev still running after SIGTERM\n{}", dev_log()));
    assert!(
        exit.success(),
        "drover dev exited with {exit}\n{}",
        dev_log()
    );
    for pid in &pids {
        assert!(
            !pid_exists(*pid),
            "pid {pid} started by drover dev is still running after it exited"
        );
    }
    let _ = reader.join();
    let err = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    assert!(err.contains("stopped"), "{err}");
}
