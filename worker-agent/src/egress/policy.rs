//! Which hosts an attempt may reach through the egress proxy, and which requests get which
//! credential. Pure functions over the spec's strings; the coordinator validates specs with
//! [`parse_rule`] too, so a rule the worker would refuse never gets queued.
//!
//! A rule is `host` (ports 443 and 80), `host:port`, `*.domain` (any name under `domain`, not
//! `domain` itself) or `*.domain:port`; hosts are DNS names or IP addresses, compared
//! case-insensitively (rules are stored lowercase).

use drover_protocol::SecretGrant;
use std::net::IpAddr;

/// Ports a rule without one allows.
pub const DEFAULT_PORTS: [u16; 2] = [443, 80];

/// One parsed rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    host: HostPattern,
    port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    Exact(String),
    /// `*.domain`: names ending in `.domain`.
    Under(String),
}

/// Parse one rule; the error says what is wrong with it.
pub fn parse_rule(rule: &str) -> Result<Rule, String> {
    let text = rule.trim();
    if text.is_empty() {
        return Err("is empty; write a host name such as api.github.com".into());
    }
    if text.contains("://") || text.contains('/') {
        return Err(format!(
            "{text:?} is a URL; write only the host (and :port), e.g. api.github.com or example.com:8443"
        ));
    }
    let (host, port) = split_host_port(text)?;
    let host = host.to_ascii_lowercase();
    let pattern = match host.strip_prefix("*.") {
        Some(domain) => {
            check_name(domain, text)?;
            HostPattern::Under(domain.to_owned())
        }
        None => {
            if host.parse::<IpAddr>().is_err() {
                check_name(&host, text)?;
            }
            HostPattern::Exact(host)
        }
    };
    Ok(Rule {
        host: pattern,
        port,
    })
}

fn split_host_port(text: &str) -> Result<(&str, Option<u16>), String> {
    // [v6]:port or [v6]
    if let Some(rest) = text.strip_prefix('[') {
        let (addr, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("{text:?} has an unclosed '['"))?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(parse_port(p, text)?),
            None if after.is_empty() => None,
            None => return Err(format!("{text:?}: unexpected text after ']'")),
        };
        return Ok((addr, port));
    }
    match text.rsplit_once(':') {
        // A bare IPv6 address has several colons and no port.
        Some((host, _)) if host.contains(':') => Ok((text, None)),
        Some((host, port)) => Ok((host, Some(parse_port(port, text)?))),
        None => Ok((text, None)),
    }
}

fn parse_port(p: &str, text: &str) -> Result<u16, String> {
    match p.parse::<u16>() {
        Ok(0) | Err(_) => Err(format!("{text:?}: {p:?} is not a port (1-65535)")),
        Ok(n) => Ok(n),
    }
}

fn check_name(name: &str, text: &str) -> Result<(), String> {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
        return Err(format!(
            "{text:?} is not a host name: use letters, digits, '-' and '.', or '*.' before a domain"
        ));
    }
    Ok(())
}

impl Rule {
    /// Whether this rule lets a request reach `host:port` (`host` lowercase, without brackets).
    pub fn matches(&self, host: &str, port: u16) -> bool {
        let port_ok = match self.port {
            Some(p) => p == port,
            None => DEFAULT_PORTS.contains(&port),
        };
        port_ok && self.host_matches(host)
    }

    /// Whether every `host:port` this rule matches is also matched by `other` (a grant's host
    /// must be inside the egress list).
    pub fn within(&self, other: &Rule) -> bool {
        let ports_ok = match (self.port, other.port) {
            (mine, None) => mine.is_none_or(|p| DEFAULT_PORTS.contains(&p)),
            (Some(a), Some(b)) => a == b,
            (None, Some(_)) => false,
        };
        let hosts_ok = match (&self.host, &other.host) {
            (HostPattern::Exact(h), _) => other.host_matches(h),
            (HostPattern::Under(a), HostPattern::Under(b)) => {
                a == b || a.ends_with(&format!(".{b}"))
            }
            (HostPattern::Under(_), HostPattern::Exact(_)) => false,
        };
        ports_ok && hosts_ok
    }

    fn host_matches(&self, host: &str) -> bool {
        match &self.host {
            HostPattern::Exact(h) => h == host,
            HostPattern::Under(d) => host
                .strip_suffix(d.as_str())
                .is_some_and(|rest| rest.len() > 1 && rest.ends_with('.')),
        }
    }
}

/// The hosts an attempt may reach.
#[derive(Debug, Clone, Default)]
pub struct Allowlist(Vec<Rule>);

impl Allowlist {
    /// From the spec's `egress` list (already validated by the coordinator; a rule that does
    /// not parse is skipped, so it allows nothing).
    pub fn new(rules: &[String]) -> Self {
        Allowlist(rules.iter().filter_map(|r| parse_rule(r).ok()).collect())
    }

    pub fn allows(&self, host: &str, port: u16) -> bool {
        let host = host.to_ascii_lowercase();
        self.0.iter().any(|r| r.matches(&host, port))
    }
}

/// Whether `grant` applies to requests for `host:port`.
pub fn grant_applies(grant: &SecretGrant, host: &str, port: u16) -> bool {
    let host = host.to_ascii_lowercase();
    grant
        .hosts
        .iter()
        .filter_map(|h| parse_rule(h).ok())
        .any(|r| r.matches(&host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_and_match() {
        let r = parse_rule("API.GitHub.com").unwrap();
        assert!(r.matches("api.github.com", 443));
        assert!(r.matches("api.github.com", 80));
        assert!(!r.matches("api.github.com", 8443));
        assert!(!r.matches("github.com", 443));
        let r = parse_rule("localhost:8443").unwrap();
        assert!(r.matches("localhost", 8443));
        assert!(!r.matches("localhost", 443));
        let r = parse_rule("*.example.com").unwrap();
        assert!(r.matches("a.example.com", 443));
        assert!(r.matches("a.b.example.com", 443));
        assert!(!r.matches("example.com", 443));
        assert!(!r.matches("badexample.com", 443));
        let r = parse_rule("[::1]:9000").unwrap();
        assert!(r.matches("::1", 9000));
        assert!(parse_rule("10.1.2.3").unwrap().matches("10.1.2.3", 443));
    }

    #[test]
    fn bad_rules_say_why() {
        for (rule, needle) in [
            ("", "empty"),
            ("https://github.com", "URL"),
            ("git hub.com", "not a host name"),
            ("github.com:0", "not a port"),
            ("github.com:99999", "not a port"),
            ("*.", "not a host name"),
        ] {
            let err = parse_rule(rule).unwrap_err();
            assert!(err.contains(needle), "{rule}: {err}");
        }
    }

    #[test]
    fn grant_hosts_within_the_egress_list() {
        let within = |a: &str, b: &str| parse_rule(a).unwrap().within(&parse_rule(b).unwrap());
        assert!(within("github.com", "github.com"));
        assert!(within("github.com:443", "github.com"));
        assert!(!within("github.com:8443", "github.com"));
        assert!(within("localhost:8443", "localhost:8443"));
        assert!(!within("github.com", "github.com:8443"));
        assert!(within("api.github.com", "*.github.com"));
        assert!(!within("github.com", "*.github.com"));
        assert!(within("*.api.github.com", "*.github.com"));
        assert!(!within("*.github.com", "api.github.com"));
    }
}
