//! A local HTTPS server that stands for a credentialed upstream (an API, a git host) in the
//! secrets tests: it answers only requests that carry `Authorization: Bearer <secret>`, and
//! serves git's smart HTTP protocol from bare repositories by running the real
//! `git http-backend` as a CGI program (clone and push).
//!
//! Routes: `/hello` (200 `welcome, agent`), `/echo-auth` (200 with the request's
//! Authorization header in the body — a careless upstream that reflects the credential, to
//! test redaction), anything under `/git/` (git http-backend with `GIT_PROJECT_ROOT` =
//! [`Upstream::repos`]). Every request without the right credential gets 401. Each request
//! is recorded (method, path, whether it was authorized) for the test to check.
//!
//! Blocking std threads with rustls; one request per connection (`Connection: close`).

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// One request the upstream saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub authorized: bool,
}

/// The running server; it stops with the test process.
#[derive(Debug)]
pub struct Upstream {
    pub port: u16,
    /// PEM of the CA that signed the server's certificate (for `egress.upstream_ca`).
    pub ca_file: PathBuf,
    /// Where bare repositories are served from (`/git/<name>.git`).
    pub repos: PathBuf,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Upstream {
    /// Start on 127.0.0.1 (a free port), certificate for `localhost`, accepting `secret`.
    pub fn start(dir: &Path, secret: &str) -> Upstream {
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca.self_signed(&ca_key).expect("CA cert");
        let key = KeyPair::generate().expect("server key");
        let leaf = CertificateParams::new(vec!["localhost".to_owned()])
            .expect("leaf params")
            .signed_by(&key, &ca, &ca_key)
            .expect("leaf cert");
        let ca_file = dir.join("upstream-ca.pem");
        std::fs::write(&ca_file, ca.pem()).expect("write upstream CA");
        let repos = dir.join("repos");
        std::fs::create_dir_all(&repos).expect("repos dir");
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(leaf.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .expect("server config");
        let config = Arc::new(config);
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind upstream");
        let port = listener.local_addr().expect("addr").port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let expected = format!("Bearer {secret}");
        {
            let (seen, repos) = (seen.clone(), repos.clone());
            std::thread::spawn(move || {
                for sock in listener.incoming().flatten() {
                    let (config, seen, repos, expected) = (
                        config.clone(),
                        seen.clone(),
                        repos.clone(),
                        expected.clone(),
                    );
                    std::thread::spawn(move || {
                        let Ok(conn) = rustls::ServerConnection::new(config) else {
                            return;
                        };
                        let mut tls = rustls::StreamOwned::new(conn, sock);
                        if let Some(r) = serve(&mut tls, &repos, &expected) {
                            seen.lock().unwrap().push(r);
                        }
                        tls.conn.send_close_notify();
                        let _ = tls.flush();
                    });
                }
            });
        }
        Upstream {
            port,
            ca_file,
            repos,
            seen,
        }
    }

    /// Every request so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// `localhost:<port>`, as egress lists and grants name it.
    pub fn host(&self) -> String {
        format!("localhost:{}", self.port)
    }
}

/// Answer one request; `None` when the client sent no complete head.
fn serve(stream: &mut (impl Read + Write), repos: &Path, expected: &str) -> Option<Seen> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next()?.to_owned(), parts.next()?.to_owned());
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).ok()? == 0 {
            return None;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (n, v) = h.split_once(':')?;
        headers.push((n.trim().to_ascii_lowercase(), v.trim().to_owned()));
    }
    let header = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    let body = read_body(&mut reader, &header)?;
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let authorization = header("authorization").unwrap_or_default();
    let authorized = authorization == expected;
    let seen = Seen {
        method: method.clone(),
        path: path.to_owned(),
        authorized,
    };
    let out = reader.into_inner();
    let reply = if !authorized {
        response(
            "401 Unauthorized",
            &[("WWW-Authenticate", "Bearer")],
            b"no or wrong credential\n",
        )
    } else if path == "/hello" {
        response(
            "200 OK",
            &[("Content-Type", "text/plain")],
            b"welcome, agent\n",
        )
    } else if path == "/echo-auth" {
        let body = format!("you sent: {authorization}\n");
        response("200 OK", &[("Content-Type", "text/plain")], body.as_bytes())
    } else if let Some(rest) = path.strip_prefix("/git") {
        git_backend(repos, &method, rest, query, &header, &body)
    } else {
        response("404 Not Found", &[], b"not found\n")
    };
    let _ = out.write_all(&reply);
    let _ = out.flush();
    Some(seen)
}

fn read_body(
    reader: &mut impl BufRead,
    header: &dyn Fn(&str) -> Option<String>,
) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    if header("transfer-encoding").is_some_and(|t| t.eq_ignore_ascii_case("chunked")) {
        loop {
            let mut size = String::new();
            reader.read_line(&mut size).ok()?;
            let n = usize::from_str_radix(size.trim().split(';').next()?, 16).ok()?;
            if n == 0 {
                let mut end = String::new();
                reader.read_line(&mut end).ok()?;
                break;
            }
            let start = body.len();
            body.resize(start + n, 0);
            reader.read_exact(&mut body[start..]).ok()?;
            let mut crlf = [0u8; 2];
            reader.read_exact(&mut crlf).ok()?;
        }
    } else if let Some(n) = header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        body.resize(n, 0);
        reader.read_exact(&mut body).ok()?;
    }
    Some(body)
}

fn response(status: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {status}\r\n");
    for (n, v) in headers {
        out.push_str(&format!("{n}: {v}\r\n"));
    }
    out.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    ));
    let mut out = out.into_bytes();
    out.extend_from_slice(body);
    out
}

/// Run `git http-backend` for one request (CGI), and turn its answer into an HTTP response.
fn git_backend(
    repos: &Path,
    method: &str,
    path_info: &str,
    query: &str,
    header: &dyn Fn(&str) -> Option<String>,
    body: &[u8],
) -> Vec<u8> {
    let mut cmd = std::process::Command::new("git");
    cmd.arg("http-backend")
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("GIT_PROJECT_ROOT", repos)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("REMOTE_USER", "agent")
        .env("REMOTE_ADDR", "127.0.0.1")
        .env("REQUEST_METHOD", method)
        .env("PATH_INFO", path_info)
        .env("QUERY_STRING", query)
        .env("CONTENT_LENGTH", body.len().to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    for (h, env) in [
        ("content-type", "CONTENT_TYPE"),
        ("content-encoding", "HTTP_CONTENT_ENCODING"),
        ("git-protocol", "GIT_PROTOCOL"),
    ] {
        if let Some(v) = header(h) {
            cmd.env(env, v);
        }
    }
    let Ok(mut child) = cmd.spawn() else {
        return response("500 Internal Server Error", &[], b"cannot run git\n");
    };
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(body);
    }
    let Ok(out) = child.wait_with_output() else {
        return response("500 Internal Server Error", &[], b"git failed\n");
    };
    let text = out.stdout;
    let split = text
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, 4))
        .or_else(|| text.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2)));
    let Some((at, sep)) = split else {
        return response("500 Internal Server Error", &[], b"bad CGI output\n");
    };
    let head = String::from_utf8_lossy(&text[..at]).into_owned();
    let mut status = "200 OK".to_owned();
    let mut headers = Vec::new();
    for line in head.lines() {
        if let Some((n, v)) = line.split_once(':') {
            if n.eq_ignore_ascii_case("status") {
                status = v.trim().to_owned();
            } else {
                headers.push((n.trim().to_owned(), v.trim().to_owned()));
            }
        }
    }
    let headers: Vec<(&str, &str)> = headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    response(&status, &headers, &text[at + sep..])
}
