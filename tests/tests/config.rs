//! Bad configuration: `drover serve`, `drover-worker` and the CLI exit 64 with one message
//! naming the file and the key (or the missing path), and the coordinator binds no port.

use drover_tests::{bin, command, free_udp_port, run_bounded, udp_port_is_free, TestFleet};
use std::path::Path;
use std::process::Output;
use std::time::Duration;

/// Config errors are found before anything slow happens; this only bounds a hang.
const EXIT_DEADLINE: Duration = Duration::from_secs(30);

fn serve(fleet: &TestFleet, config: &Path) -> Output {
    run_bounded(
        command(&bin("drover"), fleet.dir())
            .arg("serve")
            .arg("--config")
            .arg(config),
        EXIT_DEADLINE,
    )
}

fn worker(fleet: &TestFleet, config: &Path) -> Output {
    run_bounded(
        command(&bin("drover-worker"), fleet.dir())
            .arg("--config")
            .arg(config),
        EXIT_DEADLINE,
    )
}

/// Exit 64 with a stderr naming every string in `names`.
fn assert_config_error(what: &str, out: &Output, names: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{what}: {out:?}");
    for n in names {
        assert!(
            err.contains(n),
            "{what}: stderr does not name {n:?}:\n{err}"
        );
    }
}

fn coordinator_toml(port: u16, extra: &str, cert: &str) -> String {
    format!(
        "listen = \"127.0.0.1:{port}\"\nstate_dir = \"state\"\n{extra}\n[tls]\n\
         ca = \"tls/ca.crt\"\ncert = \"{cert}\"\nkey = \"tls/coordinator.key\"\n"
    )
}

#[test]
fn bad_coordinator_config_exits_64_before_binding() {
    let fleet = TestFleet::new(0);
    let cases = [
        (
            "unknown key",
            "heartbeat_intervall_ms = 200",
            "tls/coordinator.crt",
            "heartbeat_intervall_ms",
        ),
        (
            "lease shorter than two heartbeats",
            "heartbeat_interval_ms = 500\nlease_ms = 600",
            "tls/coordinator.crt",
            "lease_ms",
        ),
        ("missing certificate file", "", "tls/nope.crt", "nope.crt"),
    ];
    for (i, (what, extra, cert, key)) in cases.into_iter().enumerate() {
        let port = free_udp_port();
        let path = fleet.dir().join(format!("coordinator-{i}.toml"));
        std::fs::write(&path, coordinator_toml(port, extra, cert)).expect("write config");
        let out = serve(&fleet, &path);
        let named = if what == "missing certificate file" {
            // The message names the resolved path of the missing file.
            fleet.dir().join(cert).display().to_string()
        } else {
            path.display().to_string()
        };
        assert_config_error(what, &out, &[&named, key]);
        assert!(
            udp_port_is_free(port),
            "{what}: port {port} from `listen` is not free after exit"
        );
    }

    // No config file at all.
    let missing = fleet.dir().join("no-such.toml");
    let out = serve(&fleet, &missing);
    assert_config_error(
        "missing config file",
        &out,
        &[&missing.display().to_string()],
    );
}

#[test]
fn bad_worker_config_exits_64() {
    let fleet = TestFleet::new(1);
    let good = std::fs::read_to_string(fleet.worker_config("w1")).expect("read w1.toml");
    let cases = [
        (
            "unknown key",
            format!("{good}\nlabell = [\"x\"]\n"),
            "labell",
        ),
        (
            "unknown key in [tls]",
            good.replace("[tls]", "[tls]\ncertificate = \"x\""),
            "certificate",
        ),
        (
            "missing certificate file",
            good.replace("tls/w1.crt", "tls/nope.crt"),
            "nope.crt",
        ),
        (
            "bad label",
            good.replace("labels = [\"test\"]", "labels = [\"has space\"]"),
            "labels",
        ),
    ];
    for (i, (what, text, key)) in cases.into_iter().enumerate() {
        let path = fleet.dir().join(format!("worker-{i}.toml"));
        std::fs::write(&path, text).expect("write config");
        let out = worker(&fleet, &path);
        let named = if what == "missing certificate file" {
            fleet.dir().join("tls/nope.crt").display().to_string()
        } else {
            path.display().to_string()
        };
        assert_config_error(what, &out, &[&named, key]);
    }
}

#[test]
fn bad_cli_config_exits_64() {
    let fleet = TestFleet::new(0);
    let path = fleet.dir().join("cli.toml");
    std::fs::write(
        &path,
        format!(
            "coordinatr = \"{}\"\nca = \"tls/ca.crt\"\ncert = \"tls/operator.crt\"\n\
             key = \"tls/operator.key\"\n",
            fleet.addr()
        ),
    )
    .expect("write cli.toml");
    let out = run_bounded(
        command(&bin("drover"), fleet.dir())
            .env("DROVER_CONFIG", &path)
            .args(["status", "--json"]),
        EXIT_DEADLINE,
    );
    assert_config_error(
        "CLI config with an unknown key",
        &out,
        &[&path.display().to_string(), "coordinatr"],
    );

    // Bad command line: exit 2.
    let out = run_bounded(
        command(&bin("drover"), fleet.dir()).args(["workers", "--state", "sleepy"]),
        EXIT_DEADLINE,
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("sleepy"));
}
