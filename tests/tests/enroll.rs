//! Enrollment with join tokens and the certificate lifecycle, with the real binaries: a worker
//! given only the address, the CA fingerprint and a token enrolls and registers (key 0600,
//! token gone from its config); a used-up or expired token and a wrong CA fingerprint are
//! refused; `drover worker revoke` cuts a worker off and it cannot come back; certificates
//! are renewed before they expire and the worker keeps working across the swap.

use drover_protocol::WorkerState;
use drover_tests::{bin, command, run_bounded, wait_for, TestFleet, DEADLINE};
use nix::sys::signal::Signal;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

/// A fleet with no configured workers whose coordinator holds the CA key and signs worker
/// certificates valid for `ttl_s` seconds.
fn fleet(ttl_s: u64) -> TestFleet {
    let mut fleet = TestFleet::builder().build();
    let toml = format!(
        "worker_cert_ttl_s = {ttl_s}\n{}ca_key = \"tls/ca.key\"\n",
        fleet.coordinator_toml()
    );
    std::fs::write(fleet.coordinator_config(), toml).expect("write coordinator.toml");
    fleet.start_coordinator_and_wait();
    fleet
}

/// `drover token create` → (token, CA fingerprint).
fn token(fleet: &TestFleet, extra: &[&str]) -> (String, String) {
    let mut args = vec!["token", "create", "--json"];
    args.extend_from_slice(extra);
    let v: serde_json::Value = fleet.cli_json(&args);
    (
        v["token"].as_str().expect("token").to_owned(),
        v["ca_fingerprint"]
            .as_str()
            .expect("fingerprint")
            .to_owned(),
    )
}

/// Write `<name>.toml` for a worker that enrolls with `token`.
fn enrolling_config(fleet: &TestFleet, name: &str, token: &str, fp: &str) {
    let toml = format!(
        "coordinator = \"{addr}\"\nwork_dir = \"work/{name}\"\nname = \"{name}\"\n\
         reconnect_initial_ms = 100\nreconnect_max_ms = 1000\njoin_token = \"{token}\"\n\
         ca_fingerprint = \"{fp}\"\n\n[tls]\nca = \"enrolled/{name}/ca.crt\"\n\
         cert = \"enrolled/{name}/worker.crt\"\nkey = \"enrolled/{name}/worker.key\"\n",
        addr = fleet.addr()
    );
    std::fs::write(fleet.worker_config(name), toml).expect("write worker config");
}

/// `drover-worker join` for `name` (config at `<name>.toml`, written here without a token).
fn join(fleet: &TestFleet, name: &str, token: &str, fp: &str) -> std::process::Output {
    enrolling_config(fleet, name, "unused", fp);
    let text = std::fs::read_to_string(fleet.worker_config(name)).unwrap();
    std::fs::write(
        fleet.worker_config(name),
        text.replace("join_token = \"unused\"\n", ""),
    )
    .unwrap();
    run_bounded(
        command(&bin("drover-worker"), fleet.dir())
            .arg("--config")
            .arg(fleet.worker_config(name))
            .args([
                "join",
                "--ca-fingerprint",
                fp,
                "--token",
                token,
                "--name",
                name,
            ]),
        DEADLINE,
    )
}

fn cert_path(fleet: &TestFleet, name: &str, file: &str) -> std::path::PathBuf {
    fleet.dir().join("enrolled").join(name).join(file)
}

#[test]
fn enrollment_with_a_token_and_its_refusals() {
    let mut fleet = fleet(3600);
    let (tok, fp) = token(&fleet, &["--ttl", "10m", "--uses", "1", "--label", "e2e"]);
    enrolling_config(&fleet, "joiner", &tok, &fp);
    fleet.start_worker("joiner");
    let w = fleet.wait_worker_state("joiner", WorkerState::Ready);
    assert!(w.connected);
    let key = cert_path(&fleet, "joiner", "worker.key");
    let mode = std::fs::metadata(&key)
        .expect("key file")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "{}", key.display());
    let config = std::fs::read_to_string(fleet.worker_config("joiner")).unwrap();
    let secret = tok.split_once('.').unwrap().1;
    assert!(
        !config.contains(secret),
        "the token stayed in the config:\n{config}"
    );
    fleet.wait_log("enrolled a worker");

    // The same single-use token again: refused.
    let out = join(&fleet, "second", &tok, &fp);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(77), "{err}");
    assert!(err.contains("used up"), "{err}");
    assert!(!cert_path(&fleet, "second", "worker.crt").exists());

    // An expired token: refused.
    let (short, _) = token(&fleet, &["--ttl", "1s"]);
    let id = short.split_once('.').unwrap().0.to_owned();
    wait_for(DEADLINE, "the short token to expire", || {
        let list: Vec<serde_json::Value> = fleet.cli_json(&["token", "list", "--json"]);
        match list.iter().any(|t| t["id"] == id.as_str()) {
            true => Err("still listed"),
            false => Ok(()),
        }
    });
    let out = join(&fleet, "late", &short, &fp);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(77), "{err}");
    assert!(err.contains("expired"), "{err}");

    // A wrong CA fingerprint: the worker refuses the coordinator and sends nothing.
    let (fresh, _) = token(&fleet, &[]);
    let wrong = "ab".repeat(32);
    let out = join(&fleet, "pinned", &fresh, &wrong);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("pinned fingerprint"), "{err}");
    assert!(!cert_path(&fleet, "pinned", "worker.crt").exists());
    // The token was never presented, so it still works.
    let out = join(&fleet, "pinned", &fresh, &fp);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn revocation_cuts_a_worker_off_for_good() {
    let mut fleet = fleet(3600);
    let (tok, fp) = token(&fleet, &[]);
    enrolling_config(&fleet, "doomed", &tok, &fp);
    fleet.start_worker("doomed");
    fleet.wait_worker_state("doomed", WorkerState::Ready);
    let out = fleet.cli(&["worker", "revoke", "doomed"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Cut off within seconds (DEADLINE is a generous bound).
    wait_for(
        DEADLINE,
        "the revoked worker to be disconnected",
        || match fleet.worker("doomed") {
            Ok(w) if !w.connected => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    // It keeps trying and is refused at the handshake.
    fleet.wait_log("refused a revoked certificate");
    let w = fleet.worker("doomed").expect("worker");
    assert!(!w.connected, "{w:?}");
    // The worker says why, instead of a bare "connection lost".
    wait_for(
        DEADLINE,
        "the worker to log that it was revoked",
        || match fleet
            .worker_log("doomed")
            .contains("revoked this worker's certificate")
        {
            true => Ok(()),
            false => Err(fleet.worker_log("doomed")),
        },
    );
    // Re-enrolling the name needs the operator: a token for it is refused until reinstated.
    let (again, _) = token(&fleet, &["--name", "doomed"]);
    let out = join(&fleet, "doomed-2", &again, &fp);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(77), "{err}");
    assert!(err.contains("revoked"), "{err}");
}

fn window(path: &Path) -> (time::OffsetDateTime, time::OffsetDateTime) {
    drover::pki::cert_window(path).expect("certificate window")
}

#[test]
fn certificates_are_renewed_before_expiry() {
    let ttl = 20;
    let mut fleet = fleet(ttl);
    let (tok, fp) = token(&fleet, &[]);
    enrolling_config(&fleet, "renewer", &tok, &fp);
    fleet.start_worker("renewer");
    fleet.wait_worker_state("renewer", WorkerState::Ready);
    let cert = cert_path(&fleet, "renewer", "worker.crt");
    let (_, first_expiry) = window(&cert);
    let (renewed_nb, renewed_na) = wait_for(
        Duration::from_secs(ttl * 2),
        "a renewed certificate",
        || {
            let (nb, na) = window(&cert);
            if na > first_expiry {
                Ok((nb, na))
            } else {
                Err(na)
            }
        },
    );
    // Issued (notBefore + a quarter of the lifetime) before the first one expired.
    let issued = renewed_nb + time::Duration::seconds(ttl as i64 / 4);
    assert!(
        issued < first_expiry,
        "renewed at {issued}, first expired {first_expiry}"
    );
    assert!(renewed_na > first_expiry);
    fleet.wait_log("renewed a worker certificate");
    // Past the first certificate's expiry, a fresh connection works with the new one.
    wait_for(
        Duration::from_secs(ttl * 2),
        "the first certificate to expire",
        || {
            if time::OffsetDateTime::now_utc() > first_expiry {
                Ok(())
            } else {
                Err("not yet")
            }
        },
    );
    let before = fleet.worker("renewer").expect("worker").registered_ms;
    fleet.stop_coordinator(Signal::SIGTERM);
    fleet.start_coordinator_and_wait();
    // The registry comes back with the worker as it was; wait for a new registration.
    let w = wait_for(
        DEADLINE,
        "the worker to register again with the renewed certificate",
        || match fleet.worker("renewer") {
            Ok(w) if w.connected && w.registered_ms > before => Ok(w),
            other => Err(format!("{other:?}")),
        },
    );
    assert_eq!(w.state, WorkerState::Ready);
}

/// The enrollment certificate opens the enrollment exchange and nothing else: on the normal
/// ALPN it is refused before any message is read.
#[test]
fn the_enrollment_certificate_reaches_nothing_else() {
    let fleet = fleet(3600);
    let (_, fp) = token(&fleet, &[]);
    let material = drover::pki::make_csr("sneaky").expect("key");
    let mut tls = drover::pki::enroll_client_config(&material.key_pem, &fp).expect("tls");
    tls.alpn_protocols = vec![drover::pki::ALPN.to_vec()];
    let result = drover_tests::raw_hello(
        fleet.socket_addr(),
        tls,
        &drover_tests::hello(drover_protocol::Role::Worker),
    );
    match result {
        Err(e) => assert_eq!(
            e.app_close_code(),
            Some(u64::from(drover_protocol::close_code::REFUSED)),
            "{e:?}"
        ),
        Ok(reply) => panic!("a peer without a fleet certificate got a hello reply: {reply:?}"),
    }
    fleet.wait_log("bad certificate identity");
    assert!(fleet.workers().expect("workers").is_empty());
}
