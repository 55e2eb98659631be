//! The HTTP/1.1 the egress proxy speaks with the sandbox, as pure functions over bytes: parse
//! a request head (bounded), work out where it goes, and write the head sent upstream with
//! the credentials added and hop-by-hop headers removed. Input comes from an untrusted task:
//! every function here is total (errors, never panics) and fuzzed
//! (`fuzz/fuzz_targets/proxy_head.rs`).

/// Longest request head accepted (request line and headers).
pub const MAX_HEAD: usize = 64 * 1024;
/// Most headers in one request.
pub const MAX_HEADERS: usize = 128;

/// A parsed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    pub target: String,
    /// Header names as sent, values as bytes.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Bytes of the head, through the blank line; what follows in the buffer is body.
    pub len: usize,
}

/// Why a head cannot be used (answered with `400` or `431`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("request head larger than {MAX_HEAD} bytes")]
    TooLarge,
    #[error("malformed request: {0}")]
    Malformed(String),
    #[error("only HTTP/1.x is spoken here")]
    Version,
}

/// Parse the head at the start of `buf`: `Ok(None)` when more bytes are needed.
pub fn parse_head(buf: &[u8]) -> Result<Option<RequestHead>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => {
            if req.version != Some(1) && req.version != Some(0) {
                return Err(HeadError::Version);
            }
            Ok(Some(RequestHead {
                method: req.method.unwrap_or_default().to_owned(),
                target: req.path.unwrap_or_default().to_owned(),
                headers: req
                    .headers
                    .iter()
                    .map(|h| (h.name.to_owned(), h.value.to_vec()))
                    .collect(),
                len,
            }))
        }
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => Err(HeadError::TooLarge),
        Err(e) => Err(HeadError::Malformed(e.to_string())),
    }
}

/// Where a request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `CONNECT host:port`: a TLS tunnel, which the proxy terminates to add credentials.
    Connect { host: String, port: u16 },
    /// A request for an origin: `GET http://host/path` (plain HTTP, never given credentials),
    /// or `GET /https/host[:port]/path` — the form git's URL rewrite produces — for HTTPS.
    Forward {
        tls: bool,
        host: String,
        port: u16,
        /// Origin-form path with query, starting with `/`.
        path: String,
    },
}

/// Work out the target of `head`; the error is the reason for a `400`.
pub fn target(head: &RequestHead) -> Result<Target, String> {
    if head.method.eq_ignore_ascii_case("CONNECT") {
        let (host, port) = host_port(&head.target, None)?;
        return Ok(Target::Connect { host, port });
    }
    if let Some(rest) = strip_prefix_ci(&head.target, "http://") {
        let (authority, path) = split_path(rest);
        // A client told to use this proxy may still send the rewritten git URL through it.
        if let Some(inner) = path.strip_prefix("/https/") {
            if authority_is_proxy(authority) {
                return https_path(inner);
            }
        }
        let (host, port) = host_port(authority, Some(80))?;
        return Ok(Target::Forward {
            tls: false,
            host,
            port,
            path: path.to_owned(),
        });
    }
    if strip_prefix_ci(&head.target, "https://").is_some() {
        return Err(
            "send https:// requests with CONNECT (set HTTPS_PROXY), or as /https/<host>/<path>"
                .into(),
        );
    }
    if let Some(inner) = head.target.strip_prefix("/https/") {
        return https_path(inner);
    }
    Err(format!(
        "{:?} is not a request this proxy can forward: use an absolute http:// URL, CONNECT, \
         or /https/<host>/<path>",
        head.target
    ))
}

fn authority_is_proxy(authority: &str) -> bool {
    authority == super::PROXY_ADDR || authority == format!("localhost:{}", super::PROXY_PORT)
}

fn https_path(inner: &str) -> Result<Target, String> {
    let (authority, path) = split_path(inner);
    let (host, port) = host_port(authority, Some(443))?;
    Ok(Target::Forward {
        tls: true,
        host,
        port,
        path: path.to_owned(),
    })
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

/// `host[:port]/rest` → (`host[:port]`, `/rest`).
fn split_path(s: &str) -> (&str, &str) {
    match s.find(['/', '?']) {
        Some(i) if s.as_bytes()[i] == b'/' => (&s[..i], &s[i..]),
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "/"),
    }
}

/// `host:port` (or `[v6]:port`), lowercase host; `default` when no port is given.
fn host_port(authority: &str, default: Option<u16>) -> Result<(String, u16), String> {
    if authority.contains('@') {
        return Err("credentials in the URL are not forwarded; the proxy adds them".into());
    }
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (h, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("{authority:?}: unclosed '['"))?;
        (h, after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => (h, Some(p)),
            _ => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(format!("{authority:?} names no host"));
    }
    let port = match (port, default) {
        (Some(p), _) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("{authority:?}: bad port"))?,
        (None, Some(d)) => d,
        (None, None) => return Err(format!("{authority:?}: CONNECT needs host:port")),
    };
    Ok((host.to_ascii_lowercase(), port))
}

/// Headers that belong to one hop and are not forwarded (RFC 9110 §7.6.1), plus the proxy's.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "upgrade",
];

/// The head to send upstream: `METHOD path HTTP/1.1`, the client's headers without hop-by-hop
/// ones, without `Host` and without any header in `inject` (the credential replaces what the
/// task sent), then `Host`, the injected headers and `Connection: close` (one request per
/// upstream connection, so every request passes through here and gets its credential).
/// `Transfer-Encoding` is kept: the body is copied as it comes.
pub fn upstream_head(
    head: &RequestHead,
    host: &str,
    port: u16,
    default_port: u16,
    path: &str,
    inject: &[(&str, &[u8])],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(head.len + 128);
    out.extend_from_slice(head.method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    // Headers the client listed in Connection are hop-by-hop too.
    let listed: Vec<String> = head
        .headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("connection"))
        .flat_map(|(_, v)| {
            String::from_utf8_lossy(v)
                .split(',')
                .map(|t| t.trim().to_ascii_lowercase())
                .collect::<Vec<_>>()
        })
        .collect();
    for (name, value) in &head.headers {
        let lower = name.to_ascii_lowercase();
        if HOP_BY_HOP.contains(&lower.as_str())
            || lower == "host"
            || listed.contains(&lower)
            || inject.iter().any(|(n, _)| n.eq_ignore_ascii_case(name))
        {
            continue;
        }
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"Host: ");
    if host.contains(':') {
        out.extend_from_slice(format!("[{host}]").as_bytes());
    } else {
        out.extend_from_slice(host.as_bytes());
    }
    if port != default_port {
        out.extend_from_slice(format!(":{port}").as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    for (name, value) in inject {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"Connection: close\r\n\r\n");
    out
}

/// A complete response from the proxy itself (errors, refusals), with a text body.
pub fn response(status: u16, reason: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> RequestHead {
        parse_head(text.as_bytes()).unwrap().unwrap()
    }

    #[test]
    fn partial_and_too_large() {
        assert_eq!(parse_head(b"GET / HTTP/1.1\r\nHost: a\r\n"), Ok(None));
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(MAX_HEAD));
        assert_eq!(parse_head(big.as_bytes()), Err(HeadError::TooLarge));
        assert!(matches!(
            parse_head(b"\x00\x01 garbage\r\n\r\n"),
            Err(HeadError::Malformed(_))
        ));
    }

    #[test]
    fn targets() {
        let h = head("CONNECT Example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n");
        assert_eq!(
            target(&h),
            Ok(Target::Connect {
                host: "example.com".into(),
                port: 443
            })
        );
        let h = head("GET http://example.com/a?b=1 HTTP/1.1\r\n\r\n");
        assert_eq!(
            target(&h),
            Ok(Target::Forward {
                tls: false,
                host: "example.com".into(),
                port: 80,
                path: "/a?b=1".into()
            })
        );
        let h = head("GET /https/git.example.com:8443/o/r.git/info/refs?service=git-upload-pack HTTP/1.1\r\n\r\n");
        assert_eq!(
            target(&h),
            Ok(Target::Forward {
                tls: true,
                host: "git.example.com".into(),
                port: 8443,
                path: "/o/r.git/info/refs?service=git-upload-pack".into()
            })
        );
        let h = head("GET http://127.0.0.1:3128/https/h.example/x HTTP/1.1\r\n\r\n");
        assert!(matches!(target(&h), Ok(Target::Forward { tls: true, .. })));
        let h = head("GET http://user:pw@h.example/ HTTP/1.1\r\n\r\n");
        assert!(target(&h).unwrap_err().contains("credentials"));
        let h = head("CONNECT h.example HTTP/1.1\r\n\r\n");
        assert!(target(&h).is_err());
        let h = head("GET /plain HTTP/1.1\r\n\r\n");
        assert!(target(&h).is_err());
    }

    #[test]
    fn upstream_head_replaces_credentials_and_hop_headers() {
        let h = head(
            "POST /https/h.example/p HTTP/1.1\r\nHost: 127.0.0.1:3128\r\nAuthorization: forged\r\n\
             Proxy-Authorization: x\r\nConnection: keep-alive, X-Drop\r\nX-Drop: 1\r\n\
             Content-Length: 3\r\nUser-Agent: t\r\n\r\nabc",
        );
        let out = upstream_head(
            &h,
            "h.example",
            443,
            443,
            "/p",
            &[("Authorization", b"Bearer s")],
        );
        let out = String::from_utf8(out).unwrap();
        assert!(out.starts_with("POST /p HTTP/1.1\r\n"), "{out}");
        assert!(out.contains("Host: h.example\r\n"));
        assert!(out.contains("Authorization: Bearer s\r\n"));
        assert!(!out.contains("forged"));
        assert!(!out.contains("Proxy-Authorization"));
        assert!(!out.contains("X-Drop"));
        assert!(out.contains("Content-Length: 3\r\n"));
        assert!(out.ends_with("Connection: close\r\n\r\n"));
        let with_port = upstream_head(&h, "h.example", 8443, 443, "/p", &[]);
        assert!(String::from_utf8(with_port)
            .unwrap()
            .contains("Host: h.example:8443\r\n"));
    }
}
