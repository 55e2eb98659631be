//! A healthy fleet, seen through the operator CLI: three real workers register with their
//! resources, and `status`, `workers` (with filters) and `worker show` report them, as JSON and
//! as tables that fit in 100 columns.

use drover_protocol::{FleetSummary, WorkerInfo, WorkerState};
use drover_tests::TestFleet;

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn assert_fits(what: &str, text: &str) {
    assert!(!text.trim().is_empty(), "{what}: printed nothing");
    for line in text.lines() {
        let width = line.chars().count();
        assert!(
            width <= 100,
            "{what}: a line of {width} columns:\n{line}\n(full output:\n{text})"
        );
    }
}

/// The longest name a certificate may carry (63 characters), to stress the tables.
const LONG: &str = "w3-with-the-longest-name-a-certificate-may-carry-0123456789abcd";

/// Many long labels, for the same reason.
const LONG_LABELS: [&str; 5] = [
    "zone-b",
    "a-rather-long-label-number-one",
    "a-rather-long-label-number-two",
    "a-rather-long-label-number-three",
    "a-rather-long-label-number-four",
];

#[test]
fn three_workers_register_and_the_cli_shows_them() {
    assert_eq!(LONG.len(), 63);
    let mut fleet = TestFleet::builder()
        .worker("w1", &["zone-a", "fast"])
        .worker("w2", &["zone-b"])
        .worker(LONG, &LONG_LABELS)
        .build();
    fleet.start_coordinator();
    fleet.start_all_workers();
    let list = fleet.wait_all_ready();

    // Resources as each worker reported them.
    let names: Vec<&str> = list.iter().map(|w| w.name.as_str()).collect();
    assert_eq!(names, ["w1", "w2", LONG]);
    for (w, labels) in list
        .iter()
        .zip([&["fast", "zone-a"][..], &["zone-b"], &LONG_LABELS])
    {
        let r = &w.resources;
        assert_eq!(r.arch, std::env::consts::ARCH, "{}", w.name);
        assert!(r.cpu_count > 0, "{}: cpu_count {}", w.name, r.cpu_count);
        assert!(r.memory_total_bytes > 0, "{}", w.name);
        assert!(!r.kernel.is_empty() && !r.hostname.is_empty(), "{}", w.name);
        for l in labels {
            assert!(
                r.labels.iter().any(|x| x == l),
                "{}: label {l} missing from {:?}",
                w.name,
                r.labels
            );
        }
        assert!(
            r.work_dir.ends_with(&format!("work/{}", w.name)),
            "{}: work_dir {}",
            w.name,
            r.work_dir
        );
    }

    // The summary counts them and adds up their capacity.
    let summary: FleetSummary = fleet.cli_json(&["status", "--json"]);
    assert_eq!(summary.workers.ready, 3, "{summary:?}");
    assert_eq!(
        (
            summary.workers.lost,
            summary.workers.down,
            summary.workers.draining
        ),
        (0, 0, 0)
    );
    let cpus: u64 = list.iter().map(|w| u64::from(w.resources.cpu_count)).sum();
    assert_eq!(summary.total.cpus, cpus);
    let memory: u64 = list.iter().map(|w| w.resources.memory_total_bytes).sum();
    assert_eq!(summary.total.memory_bytes, memory);
    assert!(summary.coordinator_version.starts_with("drover "));

    // Filters.
    let ready: Vec<WorkerInfo> = fleet.cli_json(&["workers", "--state", "ready", "--json"]);
    assert_eq!(ready.len(), 3);
    let lost: Vec<WorkerInfo> = fleet.cli_json(&["workers", "--state", "lost", "--json"]);
    assert!(lost.is_empty(), "{lost:?}");
    let zone_a: Vec<WorkerInfo> = fleet.cli_json(&["workers", "--label", "zone-a", "--json"]);
    assert_eq!(
        zone_a.iter().map(|w| w.name.as_str()).collect::<Vec<_>>(),
        ["w1"]
    );
    let zone_b: Vec<WorkerInfo> =
        fleet.cli_json(&["workers", "--label", "zone-b", "--state", "ready", "--json"]);
    assert_eq!(
        zone_b.iter().map(|w| w.name.as_str()).collect::<Vec<_>>(),
        ["w2", LONG]
    );
    let none: Vec<WorkerInfo> = fleet.cli_json(&["workers", "--label", "no-such", "--json"]);
    assert!(none.is_empty());

    // One worker in detail.
    let w2: WorkerInfo = fleet.cli_json(&["worker", "show", "w2", "--json"]);
    assert_eq!(w2.name, "w2");
    assert_eq!(w2.state, WorkerState::Ready);
    assert!(w2.connected);
    assert_eq!(w2.version, "drover-worker 0.1.0");
    assert_eq!(w2.protocol_version, drover_protocol::PROTOCOL_VERSION);
    assert!(w2.address.starts_with("127.0.0.1:"), "{}", w2.address);
    // A ready worker's heartbeat is younger than its lease (plus the coordinator's lease
    // check period); this is a bound on a reported value, not a timing of the test.
    assert!(
        w2.last_heartbeat_age_ms < 2 * fleet.lease_ms,
        "last heartbeat {} ms ago, lease {} ms",
        w2.last_heartbeat_age_ms,
        fleet.lease_ms
    );
    assert!(w2.first_seen_ms <= w2.registered_ms);

    // Unknown worker: exit 1, naming it.
    let out = fleet.cli(&["worker", "show", "nosuch"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nosuch"), "{err}");

    // Human output: aligned tables within 100 columns.
    let status = fleet.cli(&["status"]);
    assert!(status.status.success(), "{status:?}");
    assert_fits("drover status", &stdout(&status));
    let workers = fleet.cli(&["workers"]);
    assert!(workers.status.success(), "{workers:?}");
    let table = stdout(&workers);
    assert_fits("drover workers", &table);
    for name in ["w1", "w2", LONG] {
        assert!(
            table.lines().any(|l| l.starts_with(name)),
            "no row for {name}:\n{table}"
        );
    }
    for name in ["w1", LONG] {
        let show = fleet.cli(&["worker", "show", name]);
        assert!(show.status.success(), "{show:?}");
        let text = stdout(&show);
        assert_fits("drover worker show", &text);
        assert!(text.contains(name), "{text}");
    }
}
