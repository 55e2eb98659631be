//! Faults on a live fleet of three real workers: malformed and oversized frames close only the
//! offending connection; a worker killed with SIGKILL turns lost and comes back; one stopped
//! with SIGTERM turns down; a coordinator killed with SIGKILL and restarted gets every worker
//! back by itself with the registry intact; workers started before the coordinator keep
//! retrying until it is up.

use drover::pki::Validity;
use drover_protocol::{close_code, FleetSummary, HelloReply, Role, WorkerInfo, WorkerState};
use drover_tests::{hello, RawError, TestFleet, DEADLINE};
use nix::sys::signal::Signal;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// name -> record, from `drover workers --json`.
fn by_name(list: Vec<WorkerInfo>) -> BTreeMap<String, WorkerInfo> {
    list.into_iter().map(|w| (w.name.clone(), w)).collect()
}

fn status(fleet: &TestFleet) -> FleetSummary {
    fleet
        .status()
        .unwrap_or_else(|e| panic!("{e}\n{}", fleet.log_tail()))
}

#[test]
fn malformed_and_oversized_frames_close_only_that_connection() {
    let fleet = TestFleet::started(3);
    let before = by_name(fleet.workers().expect("workers"));
    fleet.issue(Role::Worker, "w-raw", Validity::Days(1));

    let garbage: Vec<u8> = [&8u32.to_be_bytes()[..], &[0xFF; 8]].concat();
    let oversized: Vec<u8> = [&u32::MAX.to_be_bytes()[..], &[0u8; 16]].concat();
    let cases = [
        ("garbage in place of the hello", false, &garbage),
        ("garbage in place of the registration", true, &garbage),
        (
            "an oversized frame in place of the hello",
            false,
            &oversized,
        ),
        (
            "an oversized frame in place of the registration",
            true,
            &oversized,
        ),
    ];
    for (i, (what, after_hello, bytes)) in cases.into_iter().enumerate() {
        let mut raw = fleet
            .raw_connect(fleet.raw_tls_as("w-raw"))
            .unwrap_or_else(|e| panic!("{what}: connect: {e:?}"));
        if after_hello {
            let reply = raw.hello(&hello(Role::Worker));
            assert!(
                matches!(reply, Ok(HelloReply::Accepted { .. })),
                "{what}: {reply:?}"
            );
        }
        raw.send_bytes(bytes)
            .unwrap_or_else(|e| panic!("{what}: send: {e:?}"));
        let closed = raw
            .closed()
            .unwrap_or_else(|e| panic!("{what}: {e:?}\n{}", fleet.log_tail()));
        assert_eq!(
            RawError::Connection(closed.clone()).app_close_code(),
            Some(u64::from(close_code::PROTOCOL_ERROR)),
            "{what}: closed with {closed:?}"
        );
        let logged = i + 1;
        fleet.wait_for(
            DEADLINE,
            &format!("{logged} protocol violations logged ({what})"),
            || {
                let log = fleet.coordinator_log();
                let n = log
                    .lines()
                    .filter(|l| {
                        l.contains("closing connection: protocol violation")
                            && l.contains("peer=w-raw")
                    })
                    .count();
                if n >= logged {
                    Ok(())
                } else {
                    Err(n)
                }
            },
        );
    }

    // The real workers never noticed: same connections (not re-registered), still ready.
    let after = by_name(fleet.workers().expect("workers"));
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        ["w1", "w2", "w3"],
        "w-raw must not be registered"
    );
    for (name, w) in &after {
        assert_eq!(w.state, WorkerState::Ready, "{name}");
        assert!(w.connected, "{name}");
        assert_eq!(w.registered_ms, before[name].registered_ms, "{name}");
    }
    let s = status(&fleet);
    assert_eq!(s.workers.ready, 3, "{s:?}");
}

#[test]
fn sigkilled_worker_turns_lost_then_returns_with_its_identity() {
    let mut fleet = TestFleet::started(3);
    let before = fleet.worker("w2").expect("show w2");

    let exit = fleet.stop_worker("w2", Signal::SIGKILL);
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&exit),
        Some(9)
    );
    let lost = fleet.wait_worker_state("w2", WorkerState::Lost);
    assert_eq!(lost.first_seen_ms, before.first_seen_ms);
    let list = by_name(fleet.workers().expect("workers"));
    for name in ["w1", "w3"] {
        assert_eq!(list[name].state, WorkerState::Ready, "{name}");
    }
    let s = status(&fleet);
    assert_eq!((s.workers.ready, s.workers.lost), (2, 1), "{s:?}");

    // Restarted with the same certificate and config, it is the same worker again.
    fleet.start_worker("w2");
    let back = fleet.wait_for(
        DEADLINE,
        "w2 to be ready and connected again",
        || match fleet.worker("w2") {
            Ok(w) if w.state == WorkerState::Ready && w.connected => Ok(w),
            Ok(w) => Err(format!("{} connected={}", w.state, w.connected)),
            Err(e) => Err(e),
        },
    );
    assert_eq!(back.name, "w2");
    assert_eq!(back.first_seen_ms, before.first_seen_ms);
    assert!(back.registered_ms > before.registered_ms);
    let list = fleet.wait_all_ready();
    assert_eq!(list.len(), 3);
}

#[test]
fn sigtermed_worker_says_goodbye_and_turns_down() {
    let mut fleet = TestFleet::started(3);
    let exit = fleet.stop_worker("w3", Signal::SIGTERM);
    assert!(exit.success(), "drover-worker exited with {exit}");
    let down = fleet.wait_worker_state("w3", WorkerState::Down);
    assert!(!down.connected);
    fleet.wait_log_line(&["worker said goodbye", "worker=w3"]);

    // Checking that something does not happen: after two lease periods it is still down
    // (a clean stop is never mistaken for a lost worker).
    std::thread::sleep(Duration::from_millis(2 * fleet.lease_ms));
    let w3 = fleet.worker("w3").expect("show w3");
    assert_eq!(w3.state, WorkerState::Down);
    let s = status(&fleet);
    assert_eq!(
        (s.workers.ready, s.workers.down, s.workers.lost),
        (2, 1, 0),
        "{s:?}"
    );
}

#[test]
fn sigkilled_coordinator_restarts_and_every_worker_comes_back() {
    let mut fleet = TestFleet::started(3);
    let before = by_name(fleet.workers().expect("workers"));

    let exit = fleet.stop_coordinator(Signal::SIGKILL);
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&exit),
        Some(9)
    );
    fleet.start_coordinator();

    // No worker is touched: each notices on its own and registers again.
    let list = fleet.wait_for(
        Duration::from_secs(60),
        "all three workers to register with the restarted coordinator",
        || {
            let list = fleet.workers()?;
            let back = list.len() == 3
                && list.iter().all(|w| {
                    w.state == WorkerState::Ready
                        && w.connected
                        && before
                            .get(&w.name)
                            .is_some_and(|b| w.registered_ms > b.registered_ms)
                });
            if back {
                Ok(list)
            } else {
                Err(drover_tests::summarize(&list).join("; "))
            }
        },
    );
    for w in &list {
        let b = &before[&w.name];
        assert_eq!(w.first_seen_ms, b.first_seen_ms, "{}", w.name);
        assert_eq!(w.resources.cpu_count, b.resources.cpu_count, "{}", w.name);
    }
    for name in ["w1", "w2", "w3"] {
        let running = fleet.worker_process(name).try_wait().expect("try_wait");
        assert!(running.is_none(), "{name} exited: {running:?}");
    }
    let s = status(&fleet);
    assert_eq!(s.workers.ready, 3, "{s:?}");
}

#[test]
fn workers_keep_retrying_until_the_coordinator_starts() {
    let mut fleet = TestFleet::new(3);
    let started = Instant::now();
    fleet.start_all_workers();

    // With nothing listening, the CLI reports the coordinator unreachable (exit 69).
    let out = fleet.cli(&["status", "--json"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{err}");
    assert!(err.contains(&fleet.addr()), "{err}");

    // Checking that something does not happen: no worker gives up while the coordinator is
    // away (the CLI above usually took longer than this already).
    let min_wait = Duration::from_secs(2);
    if let Some(rest) = min_wait.checked_sub(started.elapsed()) {
        std::thread::sleep(rest);
    }
    for name in ["w1", "w2", "w3"] {
        let exited = fleet.worker_process(name).try_wait().expect("try_wait");
        assert!(
            exited.is_none(),
            "{name} exited with {exited:?} while the coordinator was down:\n{}",
            fleet.worker_log(name)
        );
    }

    fleet.start_coordinator();
    let list = fleet.wait_all_ready();
    assert_eq!(list.len(), 3);
}
