//! Fuzz the egress proxy's request-head parser and rewriter (worker-agent/src/egress/http.rs,
//! included by path): the bytes come from an untrusted task in the sandbox.
//!
//! Checks, besides "no panic, no runaway allocation":
//! - a parsed head never claims more bytes than it was given;
//! - the head sent upstream starts with the method and one origin-form path, has exactly one
//!   `Host` and one `Connection: close`, never carries a header the proxy replaces (the
//!   credential) more than once, and never carries `Proxy-Authorization`;
//! - the injected credential appears exactly where the proxy put it.

#![no_main]

// What http.rs reads from its parent module (worker-agent/src/egress/mod.rs).
const PROXY_PORT: u16 = 3128;
const PROXY_ADDR: &str = "127.0.0.1:3128";

#[allow(dead_code)]
#[path = "../../worker-agent/src/egress/http.rs"]
mod http;

use http::{parse_head, target, upstream_head, Target};
use libfuzzer_sys::fuzz_target;

const CREDENTIAL: &[u8] = b"Bearer fuzz-credential";

fuzz_target!(|data: &[u8]| {
    let Ok(Some(head)) = parse_head(data) else {
        return;
    };
    assert!(head.len <= data.len());
    let (host, port, path) = match target(&head) {
        Ok(Target::Connect { host, port }) => (host, port, "/".to_owned()),
        Ok(Target::Forward {
            host, port, path, ..
        }) => {
            assert!(path.starts_with('/') || path.starts_with('?'), "{path:?}");
            (host, port, path)
        }
        Err(_) => return,
    };
    let out = upstream_head(&head, &host, port, 443, &path, &[("Authorization", CREDENTIAL)]);
    let text = String::from_utf8_lossy(&out).into_owned();
    assert!(text.starts_with(&format!("{} {path} HTTP/1.1\r\n", head.method)));
    assert!(text.ends_with("Connection: close\r\n\r\n"));
    let lines: Vec<String> = text.lines().map(|l| l.to_ascii_lowercase()).collect();
    let count = |prefix: &str| lines.iter().filter(|l| l.starts_with(prefix)).count();
    // Header values from the task may hold CR or LF bytes only if httparse let them through;
    // it does not, so every line is one header.
    assert_eq!(count("host:"), 1, "{text}");
    assert_eq!(count("authorization:"), 1, "{text}");
    assert_eq!(count("proxy-authorization:"), 0, "{text}");
    assert_eq!(count("connection:"), 1, "{text}");
    let injected = format!("Authorization: {}", String::from_utf8_lossy(CREDENTIAL));
    assert_eq!(text.split("\r\n").filter(|l| *l == injected).count(), 1, "{text}");
});
