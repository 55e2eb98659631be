//! Tests for the fleet PKI: files and modes, certificate contents, load-time checks, and real
//! in-memory TLS handshakes.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use drover_protocol::identity::{parse_identity, COORDINATOR_SERVER_NAME, NAME_RULE};
use drover_protocol::Role;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConnection, ServerConnection};
use tempfile::TempDir;
use time::{Duration, OffsetDateTime};

use super::tls::Material;
use super::*;

fn req(role: Role, name: &str) -> CertRequest {
    CertRequest {
        role,
        name: name.into(),
        validity: Validity::Days(30),
        extra_sans: Vec::new(),
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn der(path: &Path) -> CertificateDer<'static> {
    load_certs(path).unwrap().remove(0)
}

/// A CA in `<tmp>/ca` plus certificates in `<tmp>/certs`.
struct Fleet {
    dir: TempDir,
}

impl Fleet {
    fn new(name: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        create_ca(&dir.path().join("ca"), name).unwrap();
        Fleet { dir }
    }

    fn ca_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("ca")
    }

    fn issue(&self, req: &CertRequest) -> TlsFiles {
        let paths = issue_cert(&self.ca_dir(), &self.dir.path().join("certs"), req, false).unwrap();
        TlsFiles {
            ca: self.ca_dir().join(CA_CERT_FILE),
            cert: paths.cert,
            key: paths.key,
        }
    }
}

#[test]
fn ca_and_each_role_are_created_with_right_modes_and_identity() {
    let fleet = Fleet::new("test");
    let ca = fleet.ca_dir();
    assert_eq!(mode(&ca.join(CA_KEY_FILE)), 0o600);
    assert_eq!(mode(&ca.join(CA_CERT_FILE)), 0o644);
    assert_eq!(mode(&ca), 0o700);

    use x509_parser::prelude::*;
    let ca_der = der(&ca.join(CA_CERT_FILE));
    let (_, ca_cert) = X509Certificate::from_der(&ca_der).unwrap();
    assert!(ca_cert.is_ca());
    assert_eq!(
        ca_cert
            .subject()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap(),
        "drover fleet CA test"
    );
    assert!(ca_cert.key_usage().unwrap().unwrap().value.key_cert_sign());
    let lifetime = ca_cert.validity().not_after.to_datetime() - OffsetDateTime::now_utc();
    assert!(lifetime > Duration::days(3640) && lifetime <= Duration::days(3650));

    for (role, name) in [
        (Role::Coordinator, "coord-1"),
        (Role::Worker, "worker_7"),
        (Role::Operator, "alice"),
    ] {
        let files = fleet.issue(&req(role, name));
        assert_eq!(
            files.cert.file_name().unwrap(),
            format!("{name}.crt").as_str()
        );
        assert_eq!(mode(&files.key), 0o600, "{role} key");
        assert_eq!(mode(&files.cert), 0o644, "{role} cert");
        let leaf = der(&files.cert);
        let id = parse_identity(&leaf).unwrap();
        assert_eq!((id.name.as_str(), id.role), (name, role));

        let (_, cert) = X509Certificate::from_der(&leaf).unwrap();
        assert!(!cert.is_ca());
        assert!(cert.key_usage().unwrap().unwrap().value.digital_signature());
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth);
        assert_eq!(eku.server_auth, role == Role::Coordinator);
        assert_eq!(cert.issuer().as_raw(), ca_cert.subject().as_raw());
        load_key(&files.key).unwrap();
    }
}

#[test]
fn coordinator_cert_has_default_and_extra_sans() {
    let fleet = Fleet::new("test");
    let mut r = req(Role::Coordinator, "coord.example");
    r.extra_sans = vec!["10.1.2.3".into(), "drover.lan".into()];
    let files = fleet.issue(&r);

    use x509_parser::prelude::*;
    let leaf = der(&files.cert);
    let (_, cert) = X509Certificate::from_der(&leaf).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap().value;
    let mut dns = Vec::new();
    let mut ips = Vec::new();
    for gn in &san.general_names {
        match gn {
            GeneralName::DNSName(d) => dns.push(d.to_string()),
            GeneralName::IPAddress(ip) => ips.push(ip.to_vec()),
            _ => {}
        }
    }
    for name in [
        COORDINATOR_SERVER_NAME,
        "localhost",
        "coord.example",
        "drover.lan",
    ] {
        assert!(dns.iter().any(|d| d == name), "{name} missing from {dns:?}");
    }
    assert!(ips.contains(&vec![127, 0, 0, 1]));
    assert!(ips.contains(&std::net::Ipv6Addr::LOCALHOST.octets().to_vec()));
    assert!(ips.contains(&vec![10, 1, 2, 3]));

    // A name that is not a DNS name is simply not added as one.
    let files = fleet.issue(&req(Role::Coordinator, "coord_1"));
    assert_eq!(parse_identity(&der(&files.cert)).unwrap().name, "coord_1");
}

#[test]
fn existing_ca_is_never_overwritten() {
    let fleet = Fleet::new("test");
    let before = std::fs::read(fleet.ca_dir().join(CA_KEY_FILE)).unwrap();
    let err = create_ca(&fleet.ca_dir(), "again").unwrap_err();
    assert!(matches!(err, PkiError::CaExists { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("ca.key") && msg.contains("another directory"),
        "{msg}"
    );
    assert_eq!(
        std::fs::read(fleet.ca_dir().join(CA_KEY_FILE)).unwrap(),
        before
    );
}

#[test]
fn issuing_refuses_to_overwrite_unless_asked() {
    let fleet = Fleet::new("test");
    let r = req(Role::Worker, "w1");
    let files = fleet.issue(&r);
    let old_key = std::fs::read(&files.key).unwrap();

    let err = issue_cert(&fleet.ca_dir(), &fleet.dir.path().join("certs"), &r, false).unwrap_err();
    assert!(matches!(err, PkiError::FileExists { .. }), "{err:?}");
    assert!(err.to_string().contains("w1.key"), "{err}");
    assert_eq!(std::fs::read(&files.key).unwrap(), old_key);

    // Loosen the old key's mode: the replacement must still come out 0600.
    std::fs::set_permissions(&files.key, std::fs::Permissions::from_mode(0o644)).unwrap();
    issue_cert(&fleet.ca_dir(), &fleet.dir.path().join("certs"), &r, true).unwrap();
    assert_ne!(std::fs::read(&files.key).unwrap(), old_key);
    assert_eq!(mode(&files.key), 0o600);
    assert_eq!(mode(&files.cert), 0o644);
    client_config(&files, Role::Worker).unwrap();
    // No temporary files are left behind.
    assert_eq!(
        std::fs::read_dir(fleet.dir.path().join("certs"))
            .unwrap()
            .count(),
        2
    );
}

#[test]
fn invalid_names_are_refused_with_the_rule() {
    let fleet = Fleet::new("test");
    for bad in ["", "has space", "-dash", "../evil", &"x".repeat(64)] {
        let err = issue_cert(
            &fleet.ca_dir(),
            fleet.dir.path(),
            &req(Role::Worker, bad),
            false,
        )
        .unwrap_err();
        assert!(
            matches!(err, PkiError::InvalidName { .. }),
            "{bad}: {err:?}"
        );
        assert!(err.to_string().contains(NAME_RULE), "{err}");
    }
    let err = create_ca(&fleet.dir.path().join("ca2"), "a/b").unwrap_err();
    assert!(matches!(err, PkiError::InvalidName { .. }), "{err:?}");
    assert!(!fleet.dir.path().join("ca2").exists());
}

#[test]
fn configs_check_own_role() {
    let fleet = Fleet::new("test");
    let worker = fleet.issue(&req(Role::Worker, "w1"));
    let err = server_config(&worker).unwrap_err();
    match &err {
        PkiError::WrongRole {
            path,
            expected: Role::Coordinator,
            found: Role::Worker,
        } => assert_eq!(path, &worker.cert),
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("w1.crt"), "{err}");

    let err = client_config(&worker, Role::Operator).unwrap_err();
    assert!(
        matches!(
            err,
            PkiError::WrongRole {
                expected: Role::Operator,
                found: Role::Worker,
                ..
            }
        ),
        "{err:?}"
    );

    let coord = fleet.issue(&req(Role::Coordinator, "coord"));
    let server = server_config(&coord).unwrap();
    assert_eq!(server.alpn_protocols, vec![ALPN.to_vec()]);
    let client = client_config(&worker, Role::Worker).unwrap();
    assert_eq!(client.alpn_protocols, vec![ALPN.to_vec()]);
    // quinn accepts both (it needs TLS 1.3 with its initial cipher suite).
    quinn::crypto::rustls::QuicServerConfig::try_from(server).unwrap();
    quinn::crypto::rustls::QuicClientConfig::try_from(client).unwrap();
    client_config(&fleet.issue(&req(Role::Operator, "op")), Role::Operator).unwrap();
}

#[test]
fn configs_check_chain_and_key() {
    let fleet = Fleet::new("test");
    let other = Fleet::new("other");
    let mut foreign = other.issue(&req(Role::Worker, "w1"));
    foreign.ca = fleet.ca_dir().join(CA_CERT_FILE);
    let err = client_config(&foreign, Role::Worker).unwrap_err();
    assert!(matches!(err, PkiError::NotIssuedByCa { .. }), "{err:?}");

    let mut mismatched = fleet.issue(&req(Role::Worker, "w1"));
    mismatched.key = other.dir.path().join("certs/w1.key");
    let err = client_config(&mismatched, Role::Worker).unwrap_err();
    assert!(matches!(err, PkiError::KeyMismatch { .. }), "{err:?}");

    let mut not_ca = fleet.issue(&req(Role::Worker, "w2"));
    not_ca.ca = not_ca.cert.clone();
    let err = client_config(&not_ca, Role::Worker).unwrap_err();
    assert!(matches!(err, PkiError::NotACa { .. }), "{err:?}");

    let missing = TlsFiles {
        ca: fleet.dir.path().join("nope.crt"),
        ..not_ca
    };
    let err = client_config(&missing, Role::Worker).unwrap_err();
    assert!(err.to_string().contains("nope.crt"), "{err}");
}

#[test]
fn expired_cert_can_be_issued_but_not_used() {
    let fleet = Fleet::new("test");
    let now = OffsetDateTime::now_utc();
    let mut r = req(Role::Worker, "old");
    r.validity = Validity::Window {
        not_before: now - Duration::days(10),
        not_after: now - Duration::days(1),
    };
    let files = fleet.issue(&r);
    let not_after = cert_not_after(&files.cert).unwrap();
    assert!(not_after < now);
    assert_eq!(
        not_after.unix_timestamp(),
        (now - Duration::days(1)).unix_timestamp()
    );

    // Its lifetime predates the CA, so the load-time check cannot even verify the chain.
    let err = client_config(&files, Role::Worker).unwrap_err();
    assert!(matches!(err, PkiError::OutsideCaLifetime { .. }), "{err:?}");

    // One that overlaps the CA's lifetime chains fine and, once past its end, is reported as
    // expired (the check takes the time as a parameter, so no sleeping).
    r.name = "recent".into();
    r.validity = Validity::Days(1);
    let files = fleet.issue(&r);
    let material = Material::load(&files).unwrap();
    material.check(Role::Worker, now).unwrap();
    let err = material
        .check(Role::Worker, now + Duration::days(2))
        .unwrap_err();
    assert!(matches!(err, PkiError::Expired { .. }), "{err:?}");
    assert!(err.to_string().contains("recent.crt"), "{err}");
}

#[test]
fn exposed_key_loads_with_a_warning() {
    let fleet = Fleet::new("test");
    let files = fleet.issue(&req(Role::Worker, "w1"));
    std::fs::set_permissions(&files.key, std::fs::Permissions::from_mode(0o640)).unwrap();

    let logs = Arc::new(Mutex::new(Vec::<u8>::new()));
    let sink = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || CaptureWriter(sink.clone()))
        .with_ansi(false)
        .finish();
    tracing::subscriber::with_default(subscriber, || load_key(&files.key)).unwrap();
    let logs = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("WARN"), "{logs}");
    assert!(
        logs.contains("w1.key") && logs.contains("chmod 600"),
        "{logs}"
    );
}

struct CaptureWriter(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for CaptureWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Which end of a handshake failed.
#[derive(Debug, PartialEq)]
enum Side {
    Client,
    Server,
}

/// What each end saw of the other after a completed handshake.
struct Established {
    server_cert_seen_by_client: Vec<CertificateDer<'static>>,
    client_cert_seen_by_server: Vec<CertificateDer<'static>>,
    alpn: Option<Vec<u8>>,
}

/// Run a TLS handshake in memory, pumping records between the two ends.
fn handshake(
    server: rustls::ServerConfig,
    client: rustls::ClientConfig,
) -> Result<Established, (Side, rustls::Error)> {
    let name = ServerName::try_from(COORDINATOR_SERVER_NAME).unwrap();
    let mut c = ClientConnection::new(Arc::new(client), name).map_err(|e| (Side::Client, e))?;
    let mut s = ServerConnection::new(Arc::new(server)).map_err(|e| (Side::Server, e))?;
    for _ in 0..32 {
        let mut buf = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut buf).unwrap();
        }
        let mut rd = &buf[..];
        while !rd.is_empty() {
            s.read_tls(&mut rd).unwrap();
        }
        s.process_new_packets().map_err(|e| (Side::Server, e))?;

        let mut buf = Vec::new();
        while s.wants_write() {
            s.write_tls(&mut buf).unwrap();
        }
        let mut rd = &buf[..];
        while !rd.is_empty() {
            c.read_tls(&mut rd).unwrap();
        }
        c.process_new_packets().map_err(|e| (Side::Client, e))?;

        if !c.is_handshaking() && !s.is_handshaking() && !c.wants_write() && !s.wants_write() {
            return Ok(Established {
                server_cert_seen_by_client: c.peer_certificates().unwrap().to_vec(),
                client_cert_seen_by_server: s.peer_certificates().unwrap().to_vec(),
                alpn: c.alpn_protocol().map(<[u8]>::to_vec),
            });
        }
    }
    panic!("handshake did not finish");
}

#[test]
fn mutual_tls_handshakes() {
    let fleet = Fleet::new("test");
    let coord = fleet.issue(&req(Role::Coordinator, "coord"));
    let server = || server_config(&coord).unwrap();

    // Same CA: succeeds, and each end sees the other's identity.
    let worker = fleet.issue(&req(Role::Worker, "w1"));
    let ok = handshake(server(), client_config(&worker, Role::Worker).unwrap()).unwrap();
    assert_eq!(ok.alpn.as_deref(), Some(ALPN));
    let coordinator = peer_role_is_coordinator(&ok.server_cert_seen_by_client).unwrap();
    assert_eq!(
        (coordinator.name.as_str(), coordinator.role),
        ("coord", Role::Coordinator)
    );
    let client = peer_identity(&ok.client_cert_seen_by_server).unwrap();
    assert_eq!((client.name.as_str(), client.role), ("w1", Role::Worker));
    let err = peer_role_is_coordinator(&ok.client_cert_seen_by_server).unwrap_err();
    assert!(
        matches!(
            err,
            PkiError::PeerNotCoordinator {
                role: Role::Worker,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(matches!(
        peer_identity(&[]),
        Err(PkiError::NoPeerCertificate)
    ));

    // A client certificate from another CA (while trusting ours) is refused by the server.
    // client_config itself refuses such material, so build the config without its checks.
    let other = Fleet::new("other");
    let mut foreign = other.issue(&req(Role::Worker, "w1"));
    foreign.ca = coord.ca.clone();
    let client = Material::load(&foreign).unwrap().client_config().unwrap();
    let (side, err) = handshake(server(), client)
        .err()
        .expect("foreign client accepted");
    assert_eq!(side, Side::Server);
    assert!(
        matches!(
            err,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)
        ),
        "{err:?}"
    );

    // An expired client certificate from our CA is refused by the server.
    let now = OffsetDateTime::now_utc();
    let mut r = req(Role::Worker, "expired");
    r.validity = Validity::Window {
        not_before: now - Duration::days(10),
        not_after: now - Duration::days(1),
    };
    let expired = fleet.issue(&r);
    let client = Material::load(&expired).unwrap().client_config().unwrap();
    let (side, err) = handshake(server(), client)
        .err()
        .expect("expired client accepted");
    assert_eq!(side, Side::Server);
    assert!(
        matches!(
            err,
            rustls::Error::InvalidCertificate(
                rustls::CertificateError::Expired | rustls::CertificateError::ExpiredContext { .. }
            )
        ),
        "{err:?}"
    );

    // No client certificate at all is refused.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der(&coord.ca)).unwrap();
    let anonymous = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let (side, _) = handshake(server(), anonymous)
        .err()
        .expect("anonymous client accepted");
    assert_eq!(side, Side::Server);

    // A client trusting only another CA refuses our coordinator.
    let other_worker = other.issue(&req(Role::Worker, "w9"));
    let (side, _) = handshake(
        server(),
        client_config(&other_worker, Role::Worker).unwrap(),
    )
    .err()
    .expect("client trusted a foreign coordinator");
    assert_eq!(side, Side::Client);
}
