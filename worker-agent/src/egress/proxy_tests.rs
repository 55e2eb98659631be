//! The proxy end to end on loopback, without a sandbox: a TLS upstream that records what it
//! is sent, the proxy serving an ordinary listening socket, and a client that speaks to it as
//! curl and git do.

use super::*;
use drover_protocol::{Secret, SecretGrant};
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::sync::mpsc;

const SECRET: &str = "s3cr3t-token-value-9f8e7d";

/// A TLS server for `localhost` that answers every request with 200 and sends the request
/// heads it got on `seen`.
async fn upstream() -> (u16, Arc<rustls::ClientConfig>, mpsc::Receiver<String>) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let server = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![CertificateDer::from(leaf.der().to_vec())],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    )
    .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(ca.der().to_vec())).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (seen_tx, seen) = mpsc::channel(16);
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    tokio::spawn(async move {
        loop {
            let (sock, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            let seen_tx = seen_tx.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(sock).await else {
                    return;
                };
                let Ok(Some((head, _))) = read_head(&mut tls).await else {
                    return;
                };
                let text = format!(
                    "{} {}\n{}",
                    head.method,
                    head.target,
                    head.headers
                        .iter()
                        .map(|(n, v)| format!("{n}: {}", String::from_utf8_lossy(v)))
                        .collect::<Vec<_>>()
                        .join("\n")
                );
                let _ = seen_tx.send(text).await;
                let _ = tls
                    .write_all(&http::response(200, "OK", "upstream ok\n"))
                    .await;
                let _ = tls.shutdown().await;
            });
        }
    });
    (port, Arc::new(client), seen)
}

struct Fixture {
    proxy: u16,
    upstream_port: u16,
    seen: mpsc::Receiver<String>,
    events: mpsc::Receiver<(String, String)>,
    ca_pem: String,
    _egress: Egress,
    _dir: tempfile::TempDir,
}

async fn fixture() -> Fixture {
    let (upstream_port, client, seen) = upstream().await;
    let host = format!("localhost:{upstream_port}");
    let mut spec: TaskSpec =
        serde_json::from_str(r#"{"name":"t","command":["true"],"network":"proxy"}"#).unwrap();
    spec.egress = vec![host.clone()];
    spec.secrets = vec![SecretGrant {
        name: "tok".into(),
        hosts: vec![host],
        header: "Authorization".into(),
        scheme: SecretScheme::Bearer,
    }];
    let values = [SecretValue {
        name: "tok".into(),
        value: Secret(SECRET.into()),
    }];
    let dir = tempfile::tempdir().unwrap();
    let (tx, events) = mpsc::channel(64);
    let egress = Egress::new("t1", &spec, &values, Ok(client), tx, dir.path()).unwrap();
    let ca_pem = std::fs::read_to_string(dir.path().join(CA_FILE)).unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy = listener.local_addr().unwrap().port();
    egress.serve(listener).unwrap();
    Fixture {
        proxy,
        upstream_port,
        seen,
        events,
        ca_pem,
        _egress: egress,
        _dir: dir,
    }
}

async fn read_to_end<S: AsyncRead + Unpin>(s: &mut S) -> String {
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn trusting(ca_pem: &str) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

async fn next_event(events: &mut mpsc::Receiver<(String, String)>) -> (String, String) {
    tokio::time::timeout(Duration::from_secs(10), events.recv())
        .await
        .expect("an event in time")
        .expect("channel open")
}

#[tokio::test]
async fn connect_tunnel_adds_the_credential_and_replaces_a_forged_one() {
    let mut f = fixture().await;
    let mut sock = TcpStream::connect(("127.0.0.1", f.proxy)).await.unwrap();
    let connect = format!(
        "CONNECT localhost:{p} HTTP/1.1\r\nHost: localhost:{p}\r\n\r\n",
        p = f.upstream_port
    );
    sock.write_all(connect.as_bytes()).await.unwrap();
    let mut reply = [0u8; 39];
    sock.read_exact(&mut reply).await.unwrap();
    assert!(reply.starts_with(b"HTTP/1.1 200"), "{reply:?}");
    let name = ServerName::try_from("localhost").unwrap();
    let mut tls = trusting(&f.ca_pem).connect(name, sock).await.unwrap();
    tls.write_all(b"GET /repos?x=1 HTTP/1.1\r\nHost: localhost\r\nAuthorization: forged\r\n\r\n")
        .await
        .unwrap();
    let response = read_to_end(&mut tls).await;
    assert!(response.contains("upstream ok"), "{response}");
    let seen = f.seen.recv().await.unwrap();
    assert!(seen.starts_with("GET /repos?x=1"), "{seen}");
    assert!(
        seen.contains(&format!("Authorization: Bearer {SECRET}")),
        "{seen}"
    );
    assert!(!seen.contains("forged"), "{seen}");
    let (kind, payload) = next_event(&mut f.events).await;
    assert_eq!(kind, "secret_used");
    assert!(
        payload.contains("\"name\":\"tok\"") && !payload.contains(SECRET),
        "{payload}"
    );
}

#[tokio::test]
async fn the_git_rewrite_form_goes_out_over_tls_with_the_credential() {
    let mut f = fixture().await;
    let mut sock = TcpStream::connect(("127.0.0.1", f.proxy)).await.unwrap();
    let req = format!(
        "GET /https/localhost:{}/o/r.git/info/refs?service=git-upload-pack HTTP/1.1\r\nHost: 127.0.0.1:3128\r\n\r\n",
        f.upstream_port
    );
    sock.write_all(req.as_bytes()).await.unwrap();
    let response = read_to_end(&mut sock).await;
    assert!(response.contains("upstream ok"), "{response}");
    let seen = f.seen.recv().await.unwrap();
    assert!(
        seen.starts_with("GET /o/r.git/info/refs?service=git-upload-pack"),
        "{seen}"
    );
    assert!(
        seen.contains(&format!("Authorization: Bearer {SECRET}")),
        "{seen}"
    );
    assert!(
        seen.contains(&format!("Host: localhost:{}", f.upstream_port)),
        "{seen}"
    );
}

#[tokio::test]
async fn hosts_outside_the_list_are_refused_and_recorded() {
    let mut f = fixture().await;
    for req in [
        "CONNECT example.com:443 HTTP/1.1\r\n\r\n".to_owned(),
        format!("CONNECT localhost:{} HTTP/1.1\r\n\r\n", f.upstream_port + 1),
        "GET http://example.com/ HTTP/1.1\r\n\r\n".to_owned(),
    ] {
        let mut sock = TcpStream::connect(("127.0.0.1", f.proxy)).await.unwrap();
        sock.write_all(req.as_bytes()).await.unwrap();
        let response = read_to_end(&mut sock).await;
        assert!(response.starts_with("HTTP/1.1 403"), "{req}: {response}");
        let (kind, payload) = next_event(&mut f.events).await;
        assert_eq!(kind, "egress_denied", "{payload}");
    }
    let mut sock = TcpStream::connect(("127.0.0.1", f.proxy)).await.unwrap();
    sock.write_all(b"BREW /pot HTTP/1.1\r\n\r\n").await.unwrap();
    assert!(read_to_end(&mut sock).await.starts_with("HTTP/1.1 400"));
    assert!(f.seen.try_recv().is_err(), "nothing reached the upstream");
}

#[tokio::test]
async fn a_grant_without_its_value_is_refused() {
    let mut spec: TaskSpec = serde_json::from_str(r#"{"name":"t","command":["true"]}"#).unwrap();
    spec.secrets = vec![SecretGrant {
        name: "gone".into(),
        hosts: vec!["h.example".into()],
        header: "Authorization".into(),
        scheme: SecretScheme::Raw,
    }];
    let dir = tempfile::tempdir().unwrap();
    let (tx, _rx) = mpsc::channel(1);
    let err = Egress::new("t", &spec, &[], Err("none".into()), tx, dir.path()).unwrap_err();
    assert!(
        err.contains("\"gone\"") && err.contains("drover secret set gone"),
        "{err}"
    );
}
