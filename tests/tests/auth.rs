//! Who may connect: a peer with no client certificate, a certificate from another CA, an
//! expired certificate or the wrong role is refused with the reason in the coordinator's log,
//! and nothing is registered; a peer with an unsupported protocol version is refused with a
//! message naming both versions. The real CLI and worker refuse to start with a certificate of
//! the wrong role, naming the file.

use drover::pki::Validity;
use drover_protocol::{HelloReply, Refusal, Role, VersionRange, WorkerState, SUPPORTED_VERSIONS};
use drover_tests::{
    bin, command, foreign_cert, hello, raw_hello, raw_tls, run_bounded, RawError, TestFleet,
    DEADLINE,
};

/// The registry still lists exactly the three real workers, all ready.
fn assert_unchanged(fleet: &TestFleet, refused: &str) {
    let list = fleet.workers().expect("drover workers");
    let names: Vec<&str> = list.iter().map(|w| w.name.as_str()).collect();
    assert_eq!(
        names,
        ["w1", "w2", "w3"],
        "{refused} must not be registered"
    );
    for w in &list {
        assert!(
            w.state == WorkerState::Ready && w.connected,
            "{}: {} connected={}",
            w.name,
            w.state,
            w.connected
        );
    }
}

/// A refused TLS handshake: the raw client sees a transport (crypto) error, never an accepted
/// hello, and never an application-level close.
fn assert_tls_refused(result: Result<HelloReply, RawError>, what: &str) {
    match result {
        Err(RawError::Connection(
            quinn::ConnectionError::TransportError(_) | quinn::ConnectionError::ConnectionClosed(_),
        )) => {}
        other => panic!("{what}: expected the TLS handshake to fail, got {other:?}"),
    }
}

#[test]
fn no_client_certificate_is_refused() {
    let fleet = TestFleet::started(3);
    let result = raw_hello(
        fleet.socket_addr(),
        raw_tls(&fleet.ca_cert(), None),
        &hello(Role::Worker),
    );
    assert_tls_refused(result, "no client certificate");
    let line = fleet.wait_log_line(&["refused connection", "TLS handshake failed", "reason="]);
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains("no certificates"), "{line}");
    assert_unchanged(&fleet, "a peer without a certificate");
}

#[test]
fn certificate_from_another_ca_is_refused() {
    let fleet = TestFleet::started(3);
    let other = tempfile::tempdir().expect("temp dir");
    let (_, foreign) = foreign_cert(other.path(), Role::Worker, "intruder");
    // Trusts the real fleet CA (so it would accept the coordinator) but presents a certificate
    // the fleet CA never issued.
    let tls = raw_tls(&fleet.ca_cert(), Some((&foreign.cert, &foreign.key)));
    let result = raw_hello(fleet.socket_addr(), tls, &hello(Role::Worker));
    assert_tls_refused(result, "certificate from another CA");
    let line = fleet.wait_log_line(&["refused connection", "TLS handshake failed", "reason="]);
    assert!(line.contains("UnknownIssuer"), "{line}");
    assert_unchanged(&fleet, "intruder");

    // The real worker binary with that certificate refuses to start, naming the file.
    let config = fleet.dir().join("intruder.toml");
    std::fs::write(
        &config,
        format!(
            "coordinator = \"{}\"\nwork_dir = \"work/intruder\"\n[tls]\nca = \"tls/ca.crt\"\n\
             cert = \"{}\"\nkey = \"{}\"\n",
            fleet.addr(),
            foreign.cert.display(),
            foreign.key.display()
        ),
    )
    .expect("write config");
    let out = run_bounded(
        command(&bin("drover-worker"), fleet.dir())
            .arg("--config")
            .arg(&config),
        DEADLINE,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains(&*foreign.cert.to_string_lossy()), "{err}");
    assert!(err.contains("not issued by the fleet CA"), "{err}");
    assert_unchanged(&fleet, "intruder");
}

#[test]
fn expired_certificate_is_refused() {
    let fleet = TestFleet::started(3);
    let now = time::OffsetDateTime::now_utc();
    // Inside the CA's lifetime (it starts 5 minutes back), but over a minute ago.
    let expired = fleet.issue(
        Role::Worker,
        "expired-worker",
        Validity::Window {
            not_before: now - time::Duration::minutes(4),
            not_after: now - time::Duration::minutes(1),
        },
    );
    let tls = raw_tls(&fleet.ca_cert(), Some((&expired.cert, &expired.key)));
    let result = raw_hello(fleet.socket_addr(), tls, &hello(Role::Worker));
    assert_tls_refused(result, "expired certificate");
    let line = fleet.wait_log_line(&["refused connection", "TLS handshake failed", "reason="]);
    assert!(line.contains("certificate expired"), "{line}");
    assert_unchanged(&fleet, "expired-worker");
}

#[test]
fn wrong_role_is_refused() {
    let fleet = TestFleet::started(3);

    // An operator certificate registering as a worker.
    let reply = raw_hello(
        fleet.socket_addr(),
        fleet.raw_tls_as("operator"),
        &hello(Role::Worker),
    )
    .expect("a hello reply");
    assert_eq!(
        reply,
        HelloReply::Refused(Refusal::RoleMismatch {
            certificate: Role::Operator,
            claimed: Role::Worker
        })
    );
    fleet.wait_log_line(&[
        "refused connection",
        "peer=operator",
        "reason=role mismatch",
    ]);
    assert_unchanged(&fleet, "the operator certificate");

    // A worker certificate asking for operator commands.
    fleet.issue(Role::Worker, "w-raw", Validity::Days(1));
    let reply = raw_hello(
        fleet.socket_addr(),
        fleet.raw_tls_as("w-raw"),
        &hello(Role::Operator),
    )
    .expect("a hello reply");
    assert_eq!(
        reply,
        HelloReply::Refused(Refusal::RoleMismatch {
            certificate: Role::Worker,
            claimed: Role::Operator
        })
    );
    fleet.wait_log_line(&["refused connection", "peer=w-raw", "reason=role mismatch"]);

    // A coordinator certificate may not register as anything.
    let reply = raw_hello(
        fleet.socket_addr(),
        fleet.raw_tls_as("coordinator"),
        &hello(Role::Coordinator),
    )
    .expect("a hello reply");
    assert_eq!(
        reply,
        HelloReply::Refused(Refusal::RoleNotAllowed {
            role: Role::Coordinator
        })
    );
    fleet.wait_log_line(&["refused connection", "peer=coordinator", "reason="]);
    assert_unchanged(&fleet, "w-raw or the coordinator certificate");

    // The real CLI with a worker certificate: refused, with a message about the role.
    let out = fleet.cli_as("w1", &["status", "--json"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        matches!(out.status.code(), Some(64 | 77)),
        "exit {:?}: {err}",
        out.status.code()
    );
    assert!(err.contains("role"), "{err}");
    assert!(out.stdout.is_empty(), "{out:?}");

    // The real worker with an operator certificate: exit 64 naming the certificate file.
    let config = fleet.dir().join("as-operator.toml");
    std::fs::write(
        &config,
        format!(
            "coordinator = \"{}\"\nwork_dir = \"work/as-operator\"\n[tls]\nca = \"tls/ca.crt\"\n\
             cert = \"tls/operator.crt\"\nkey = \"tls/operator.key\"\n",
            fleet.addr()
        ),
    )
    .expect("write config");
    let out = run_bounded(
        command(&bin("drover-worker"), fleet.dir())
            .arg("--config")
            .arg(&config),
        DEADLINE,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("operator.crt"), "{err}");
    assert!(err.contains("role operator"), "{err}");
    assert_unchanged(&fleet, "the operator certificate");
}

#[test]
fn unsupported_protocol_version_is_refused_naming_both() {
    let fleet = TestFleet::started(3);
    fleet.issue(Role::Worker, "w-future", Validity::Days(1));
    let mut future = hello(Role::Worker);
    future.versions = VersionRange { min: 99, max: 99 };
    let reply = raw_hello(fleet.socket_addr(), fleet.raw_tls_as("w-future"), &future)
        .expect("a hello reply");
    let HelloReply::Refused(refusal) = reply else {
        panic!("expected a refusal, got {reply:?}");
    };
    assert_eq!(
        refusal,
        Refusal::UnsupportedVersion {
            coordinator: SUPPORTED_VERSIONS,
            peer: VersionRange { min: 99, max: 99 }
        }
    );
    let ours = SUPPORTED_VERSIONS.to_string();
    let text = refusal.to_string();
    assert!(text.contains(&ours) && text.contains("v99"), "{text}");
    let line = fleet.wait_log_line(&["refused connection", "peer=w-future", "reason="]);
    let reason = &line[line.find("reason=").expect("reason field")..];
    assert!(reason.contains(&ours) && reason.contains("v99"), "{line}");
    assert_unchanged(&fleet, "w-future");
}
