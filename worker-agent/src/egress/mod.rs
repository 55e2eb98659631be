//! The egress proxy: the only way out of a `network = "proxy"` sandbox, and the place where
//! a task's secrets are used without ever entering the sandbox.
//!
//! Per attempt, an [`Egress`] runs in the worker (outside the sandbox) and serves the
//! listening socket each of the attempt's sandboxes creates on `127.0.0.1:3128` inside its own
//! network namespace (see the sandbox's `child` module: the socket is made there and passed
//! back, so the namespace has no route anywhere, and the proxy's own connections leave from
//! the worker's network). The task finds it through `HTTP_PROXY`/`HTTPS_PROXY`; its
//! certificate authority through `SSL_CERT_FILE` and friends; git's HTTPS remotes are
//! rewritten to it (`GIT_CONFIG_*`).
//!
//! For each connection the proxy reads one request head ([`http`]) and:
//! - `CONNECT host:port` to an allowed host: answers `200`, terminates the task's TLS with a
//!   certificate for `host` from the attempt's own CA ([`tls::AttemptCa`]), reads the request
//!   inside and forwards it over a verified TLS connection to the real host;
//! - `GET /https/host/path` (what the git rewrite sends): forwards it the same way;
//! - `GET http://host/path` (plain HTTP): forwarded as is, never with a credential;
//! - anything else, or a host not allowed: refused (`403`/`400`), and the session records an
//!   `egress_denied` event.
//!
//! On the way out, each grant of the spec whose hosts match adds its header (the value
//! replaces any the task sent) and the session records `secret_used` (name, host, method,
//! path — never the value). One request per upstream connection (`Connection: close`), so
//! every request is seen and credentialed here.
//!
//! Lifetime: the accept loops and their connections are owned by the [`Egress`] (a
//! `JoinSet` each), so they end with it when the attempt ends.

pub mod http;
pub mod policy;
pub mod tls;

use crate::workspace::Emit;
use drover_protocol::task::TaskSpec;
use drover_protocol::{SecretScheme, SecretValue};
use http::{RequestHead, Target};
use policy::Allowlist;
use serde_json::json;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// The proxy's port inside each sandbox's network namespace (on 127.0.0.1).
pub const PROXY_PORT: u16 = 3128;
/// `127.0.0.1:3128`.
pub const PROXY_ADDR: &str = "127.0.0.1:3128";
/// The proxy's URL, as the task's `HTTP_PROXY` and `HTTPS_PROXY` give it.
pub const PROXY_URL: &str = "http://127.0.0.1:3128";
/// The attempt CA's certificate, in the workspace.
pub const CA_FILE: &str = ".drover-proxy-ca.pem";
/// Most connections through one attempt's proxy at once; more wait for one to end.
pub const MAX_CONNECTIONS: usize = 64;
/// How long a client may take to send a request head, and the proxy to reach an upstream.
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest path recorded in a `secret_used` or `egress_denied` event.
const MAX_AUDIT_PATH: usize = 200;

/// The worker-wide part: how upstream hosts are verified (`Err`: why they cannot be).
pub type Upstream = Result<Arc<rustls::ClientConfig>, String>;

/// One attempt's egress proxy.
#[derive(Debug)]
pub struct Egress {
    shared: Arc<Shared>,
    loops: Mutex<JoinSet<()>>,
    /// What the task's environment gets ([`task_env`]).
    env: Vec<(String, String)>,
}

#[derive(Debug)]
struct Shared {
    task_id: String,
    allow: Allowlist,
    grants: Vec<ActiveGrant>,
    ca: tls::AttemptCa,
    upstream: Upstream,
    tx: Emit,
    slots: Semaphore,
}

/// A grant with its header value made.
#[derive(Debug)]
struct ActiveGrant {
    grant: drover_protocol::SecretGrant,
    /// The header's value (`Bearer …`, `Basic …`, raw); `Debug` shows nothing of it.
    value: drover_protocol::Secret,
}

impl Egress {
    /// The proxy for an attempt of `spec`, with the values the coordinator sent for its
    /// grants; writes the attempt CA's certificate to [`CA_FILE`] in `workspace`. `Err` names
    /// what is wrong, e.g. a granted secret that came without a value.
    pub fn new(
        task_id: &str,
        spec: &TaskSpec,
        secrets: &[SecretValue],
        upstream: Upstream,
        tx: Emit,
        workspace: &std::path::Path,
    ) -> Result<Egress, String> {
        let mut grants = Vec::new();
        for grant in &spec.secrets {
            let Some(v) = secrets.iter().find(|s| s.name == grant.name) else {
                return Err(format!(
                    "the spec grants secret {:?}, but the coordinator sent no value for it \
                     (removed with `drover secret rm`?); set it again with `drover secret set {}`",
                    grant.name, grant.name
                ));
            };
            let value = header_value(&grant.scheme, v.value.expose());
            grants.push(ActiveGrant {
                grant: grant.clone(),
                value: drover_protocol::Secret(value),
            });
        }
        let ca = tls::AttemptCa::new(task_id).map_err(|e| e.to_string())?;
        let ca_file = workspace.join(CA_FILE);
        std::fs::write(&ca_file, ca.cert_pem())
            .map_err(|e| format!("cannot write {}: {e}", ca_file.display()))?;
        let ca_file = ca_file
            .to_str()
            .ok_or_else(|| format!("{} is not UTF-8", ca_file.display()))?;
        let env = task_env(spec, ca_file);
        Ok(Egress {
            env,
            shared: Arc::new(Shared {
                task_id: task_id.to_owned(),
                allow: Allowlist::new(&spec.egress),
                grants,
                ca,
                upstream,
                tx,
                slots: Semaphore::new(MAX_CONNECTIONS),
            }),
            loops: Mutex::new(JoinSet::new()),
        })
    }

    /// The variables a proxied task gets (the proxy's URL, the CA file, git's rewrites).
    pub fn env(&self) -> &[(String, String)] {
        &self.env
    }

    /// Serve one sandbox's listening socket until this [`Egress`] is dropped.
    pub fn serve(&self, listener: std::net::TcpListener) -> std::io::Result<()> {
        listener.set_nonblocking(true)?;
        let listener = TcpListener::from_std(listener)?;
        let shared = self.shared.clone();
        self.loops
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .spawn(accept_loop(shared, listener));
        Ok(())
    }
}

fn header_value(scheme: &SecretScheme, secret: &str) -> String {
    use base64::Engine;
    match scheme {
        SecretScheme::Bearer => format!("Bearer {secret}"),
        SecretScheme::Basic { username } => format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{username}:{secret}"))
        ),
        SecretScheme::Raw => secret.to_owned(),
    }
}

/// The environment a proxied task gets (besides its own): where the proxy is, the CA to
/// trust (`ca_file`), and git's HTTPS remotes for the allowed hosts rewritten through it.
pub fn task_env(spec: &TaskSpec, ca_file: &str) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"]
        .iter()
        .map(|k| ((*k).to_owned(), PROXY_URL.to_owned()))
        .collect();
    for k in [
        "SSL_CERT_FILE",
        "CURL_CA_BUNDLE",
        "REQUESTS_CA_BUNDLE",
        "NODE_EXTRA_CA_CERTS",
        "GIT_SSL_CAINFO",
    ] {
        env.push((k.to_owned(), ca_file.to_owned()));
    }
    // git: https://host/ → http://127.0.0.1:3128/https/host/ for every exact allowed host, so
    // clone and push go through the proxy as plain requests it credentials.
    let hosts: Vec<&str> = spec
        .egress
        .iter()
        .map(|h| h.trim())
        .filter(|h| !h.starts_with("*."))
        .collect();
    env.push(("GIT_CONFIG_COUNT".to_owned(), hosts.len().to_string()));
    for (i, host) in hosts.iter().enumerate() {
        let public = host.strip_suffix(":443").unwrap_or(host);
        env.push((
            format!("GIT_CONFIG_KEY_{i}"),
            format!("url.{PROXY_URL}/https/{host}/.insteadOf"),
        ));
        env.push((
            format!("GIT_CONFIG_VALUE_{i}"),
            format!("https://{public}/"),
        ));
    }
    env
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((sock, _)) => {
                    let shared = shared.clone();
                    conns.spawn(async move {
                        // Past the bound, a connection waits here (the task's connect already
                        // succeeded; its request is read once a slot frees).
                        let Ok(_slot) = shared.slots.acquire().await else { return };
                        handle(&shared, sock).await;
                    });
                }
                Err(e) => {
                    tracing::warn!(task = %shared.task_id, error = %e, "egress proxy: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// Anything a request can be read from and forwarded to.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

async fn handle(shared: &Shared, mut sock: TcpStream) {
    let (head, rest) = match read_head(&mut sock).await {
        Ok(Some(x)) => x,
        Ok(None) => return,
        Err(reply) => {
            let _ = sock.write_all(&reply).await;
            return;
        }
    };
    match http::target(&head) {
        Err(why) => {
            let _ = sock
                .write_all(&http::response(
                    400,
                    "Bad Request",
                    &format!("drover egress proxy: {why}\n"),
                ))
                .await;
        }
        Ok(Target::Connect { host, port }) => {
            if !shared.allowed(&host, port, &head, &mut sock).await {
                return;
            }
            if !rest.is_empty() {
                let reply = http::response(
                    400,
                    "Bad Request",
                    "drover egress proxy: send nothing after CONNECT before its answer\n",
                );
                let _ = sock.write_all(&reply).await;
                return;
            }
            let config = match shared.ca.server_config(&host) {
                Ok(c) => c,
                Err(e) => {
                    let reply =
                        http::response(502, "Bad Gateway", &format!("drover egress proxy: {e}\n"));
                    let _ = sock.write_all(&reply).await;
                    return;
                }
            };
            if sock
                .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
                .await
                .is_err()
            {
                return;
            }
            let accepted = tokio::time::timeout(
                HEAD_TIMEOUT,
                tokio_rustls::TlsAcceptor::from(config).accept(sock),
            )
            .await;
            let Ok(Ok(mut tunnel)) = accepted else {
                tracing::debug!(task = %shared.task_id, %host, "egress proxy: TLS from the task failed");
                return;
            };
            let (inner, rest) = match read_head(&mut tunnel).await {
                Ok(Some(x)) => x,
                Ok(None) => return,
                Err(reply) => {
                    let _ = tunnel.write_all(&reply).await;
                    return;
                }
            };
            let path = inner_path(&inner.target);
            shared
                .forward(Box::new(tunnel), &inner, &rest, true, &host, port, &path)
                .await;
        }
        Ok(Target::Forward {
            tls,
            host,
            port,
            path,
        }) => {
            if !shared.allowed(&host, port, &head, &mut sock).await {
                return;
            }
            shared
                .forward(Box::new(sock), &head, &rest, tls, &host, port, &path)
                .await;
        }
    }
}

/// The origin-form path of a request inside a CONNECT tunnel (clients send `/path`, some
/// the absolute `https://host/path`).
fn inner_path(target: &str) -> String {
    if target.starts_with('/') {
        return target.to_owned();
    }
    let after_scheme = target.split_once("://").map_or(target, |(_, r)| r);
    match after_scheme.find('/') {
        Some(i) => after_scheme[i..].to_owned(),
        None => "/".to_owned(),
    }
}

/// Read one request head: `Ok(None)` when the client went away first; `Err` holds the reply
/// for a head that cannot be used.
async fn read_head<S: AsyncRead + Unpin>(
    sock: &mut S,
) -> Result<Option<(RequestHead, Vec<u8>)>, Vec<u8>> {
    let mut buf = Vec::with_capacity(4096);
    let read = async {
        loop {
            match http::parse_head(&buf) {
                Ok(Some(head)) => {
                    let rest = buf[head.len..].to_vec();
                    return Ok(Some((head, rest)));
                }
                Ok(None) => {}
                Err(e) => {
                    let status = if e == http::HeadError::TooLarge {
                        431
                    } else {
                        400
                    };
                    return Err(http::response(
                        status,
                        "Bad Request",
                        &format!("drover egress proxy: {e}\n"),
                    ));
                }
            }
            let mut chunk = [0u8; 4096];
            match sock.read(&mut chunk).await {
                Ok(0) | Err(_) => return Ok(None),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    match tokio::time::timeout(HEAD_TIMEOUT, read).await {
        Ok(r) => r,
        Err(_) => Err(http::response(
            408,
            "Request Timeout",
            "drover egress proxy: no request head in time\n",
        )),
    }
}

fn audit_path(path: &str) -> String {
    let mut end = path.len().min(MAX_AUDIT_PATH);
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    path[..end].to_owned()
}

impl Shared {
    /// Whether `host:port` is allowed; if not, answers `403` and records `egress_denied`.
    async fn allowed(
        &self,
        host: &str,
        port: u16,
        head: &RequestHead,
        sock: &mut TcpStream,
    ) -> bool {
        if self.allow.allows(host, port) {
            return true;
        }
        tracing::info!(task = %self.task_id, %host, port, "egress proxy: refused a host not in the allowlist");
        let payload = json!({
            "host": host, "port": port, "method": head.method,
            "reason": "not in the task's egress list",
        });
        let _ = self
            .tx
            .send(("egress_denied".into(), payload.to_string()))
            .await;
        let body = format!(
            "drover egress proxy: {host}:{port} is not in this task's egress list; add it to \
             `egress` in the task spec\n"
        );
        let _ = sock
            .write_all(&http::response(403, "Forbidden", &body))
            .await;
        false
    }

    #[allow(clippy::too_many_arguments)]
    async fn forward(
        &self,
        mut client: Box<dyn Io>,
        head: &RequestHead,
        body_start: &[u8],
        tls: bool,
        host: &str,
        port: u16,
        path: &str,
    ) {
        // Credentials only ever go over verified TLS.
        let used: Vec<&ActiveGrant> = if tls {
            self.grants
                .iter()
                .filter(|g| policy::grant_applies(&g.grant, host, port))
                .collect()
        } else {
            Vec::new()
        };
        let inject: Vec<(&str, &[u8])> = used
            .iter()
            .map(|g| (g.grant.header.as_str(), g.value.expose().as_bytes()))
            .collect();
        let upstream_head =
            http::upstream_head(head, host, port, if tls { 443 } else { 80 }, path, &inject);
        let mut upstream = match self.connect(tls, host, port).await {
            Ok(u) => u,
            Err(why) => {
                tracing::info!(task = %self.task_id, %host, port, %why, "egress proxy: upstream unreachable");
                let body = format!("drover egress proxy: {why}\n");
                let _ = client
                    .write_all(&http::response(502, "Bad Gateway", &body))
                    .await;
                return;
            }
        };
        if upstream.write_all(&upstream_head).await.is_err()
            || upstream.write_all(body_start).await.is_err()
        {
            return;
        }
        for g in &used {
            tracing::info!(task = %self.task_id, secret = %g.grant.name, %host, "egress proxy: credential added");
            let payload = json!({
                "name": g.grant.name, "host": host, "port": port,
                "method": head.method, "path": audit_path(path),
            });
            let _ = self
                .tx
                .send(("secret_used".into(), payload.to_string()))
                .await;
        }
        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
    }

    async fn connect(&self, tls: bool, host: &str, port: u16) -> Result<Box<dyn Io>, String> {
        let tcp =
            match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((host, port))).await {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => return Err(format!("cannot reach {host}:{port}: {e}")),
                Err(_) => return Err(format!("cannot reach {host}:{port}: timed out")),
            };
        let _ = tcp.set_nodelay(true);
        if !tls {
            return Ok(Box::new(tcp));
        }
        let config = self
            .upstream
            .clone()
            .map_err(|e| format!("cannot verify {host}: {e}"))?;
        let name = rustls::pki_types::ServerName::try_from(host.to_owned())
            .map_err(|e| format!("{host:?} is not a TLS server name: {e}"))?;
        let connector = tokio_rustls::TlsConnector::from(config);
        match tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name, tcp)).await {
            Ok(Ok(s)) => Ok(Box::new(s)),
            Ok(Err(e)) => Err(format!(
                "TLS with {host}:{port} failed: {e} (is its CA in the worker's egress.upstream_ca?)"
            )),
            Err(_) => Err(format!("TLS with {host}:{port} timed out")),
        }
    }
}

/// The `secret_granted` payloads for an attempt of `spec` (name and hosts, never a value).
pub fn granted_events(spec: &TaskSpec) -> Vec<(String, String)> {
    spec.secrets
        .iter()
        .map(|g| {
            let payload = json!({ "name": g.name, "hosts": g.hosts, "header": g.header });
            ("secret_granted".to_owned(), payload.to_string())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_values() {
        assert_eq!(header_value(&SecretScheme::Bearer, "t0k"), "Bearer t0k");
        assert_eq!(header_value(&SecretScheme::Raw, "t0k"), "t0k");
        assert_eq!(
            header_value(
                &SecretScheme::Basic {
                    username: "x-access-token".into()
                },
                "t0k"
            ),
            "Basic eC1hY2Nlc3MtdG9rZW46dDBr"
        );
    }

    #[test]
    fn inner_paths() {
        assert_eq!(inner_path("/a?b"), "/a?b");
        assert_eq!(inner_path("https://h.example/x/y"), "/x/y");
        assert_eq!(inner_path("https://h.example"), "/");
    }

    #[test]
    fn git_rewrites_cover_exact_hosts() {
        let mut spec: TaskSpec =
            serde_json::from_str(r#"{"name":"t","command":["true"]}"#).unwrap();
        spec.egress = vec![
            "github.com".into(),
            "*.example.com".into(),
            "localhost:8443".into(),
        ];
        let env = task_env(&spec, "/w/.drover-proxy-ca.pem");
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        assert_eq!(get("HTTPS_PROXY").as_deref(), Some(PROXY_URL));
        assert_eq!(get("GIT_CONFIG_COUNT").as_deref(), Some("2"));
        assert_eq!(
            get("GIT_CONFIG_KEY_0").as_deref(),
            Some("url.http://127.0.0.1:3128/https/github.com/.insteadOf")
        );
        assert_eq!(
            get("GIT_CONFIG_VALUE_0").as_deref(),
            Some("https://github.com/")
        );
        assert_eq!(
            get("GIT_CONFIG_VALUE_1").as_deref(),
            Some("https://localhost:8443/")
        );
    }
}

#[cfg(test)]
mod proxy_tests;
