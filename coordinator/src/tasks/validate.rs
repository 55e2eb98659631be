//! The rules a [`TaskSpec`] must follow, whatever produced it: a spec file, or a client over
//! the wire — so the coordinator re-checks what it receives with the same [`validate_spec`].
//!
//! No I/O: inputs are only checked for shape here; [`resolve_inputs`](super::inputs) finds and
//! sizes them. Field names in errors are those of the spec file (docs/task-spec.md), and each
//! message says what to write instead.

use super::units::format_size;
use drover_protocol::identity::{valid_name, NAME_RULE};
use drover_protocol::task::{OomPolicy, TaskSpec};

/// Most bytes a spec may take on the wire (postcard), leaving room in the 1 MiB frame for the
/// message around it: 256 KiB. Only huge `env` values or argument lists come near it.
pub const MAX_SPEC_BYTES: usize = 256 << 10;

/// Longest task name, in characters.
pub const MAX_NAME_CHARS: usize = 128;

/// Smallest memory figure accepted for `requirements.memory` and `limits.memory`: 1 MiB.
/// Anything less is almost surely a unit forgotten (`memory = 512` is 512 bytes).
pub const MIN_MEMORY_BYTES: u64 = 1 << 20;

/// `retry.memory_factor` bounds, as percentages: 1.1 to 10.
pub const MIN_MEMORY_FACTOR_PERCENT: u32 = 110;
pub const MAX_MEMORY_FACTOR_PERCENT: u32 = 1000;

/// Environment variable prefix reserved for the variables drover sets itself.
pub const RESERVED_ENV_PREFIX: &str = "DROVER_";

/// One field with a value that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct InvalidField {
    /// Dotted path as in the spec file: `requirements.memory`, `env.FOO`, `inputs[2]`.
    pub field: String,
    /// What is wrong and what to write instead.
    pub message: String,
}

pub(super) fn invalid(field: impl Into<String>, message: impl Into<String>) -> InvalidField {
    InvalidField {
        field: field.into(),
        message: message.into(),
    }
}

/// Check a spec's values, whatever produced it: a spec file, or a client over the wire.
/// Stops at the first problem. Field names are those of the spec file (docs/task-spec.md).
pub fn validate_spec(spec: &TaskSpec) -> Result<(), InvalidField> {
    let name = spec.name.trim();
    if name.is_empty() {
        return Err(invalid("name", "must not be empty"));
    }
    if spec.name.chars().count() > MAX_NAME_CHARS {
        return Err(invalid(
            "name",
            format!("is longer than {MAX_NAME_CHARS} characters; keep names short and put detail in env or inputs"),
        ));
    }
    if spec.name.chars().any(char::is_control) {
        return Err(invalid(
            "name",
            "must not contain control characters such as newlines",
        ));
    }

    if spec.command.is_empty() {
        return Err(invalid(
            "command",
            "must name a program: give the program and its arguments as a list, e.g. \
             command = [\"echo\", \"hello\"]",
        ));
    }
    if spec.command[0].trim().is_empty() {
        return Err(invalid("command[0]", "the program name must not be empty"));
    }
    for (i, arg) in spec.command.iter().enumerate() {
        if arg.contains('\0') {
            return Err(invalid(
                format!("command[{i}]"),
                "must not contain NUL bytes",
            ));
        }
    }

    for (key, value) in &spec.env {
        let field = format!("env.{key}");
        if !is_shell_identifier(key) {
            return Err(invalid(
                field,
                "is not a valid variable name: use letters, digits and '_', not starting with a digit",
            ));
        }
        if key.starts_with(RESERVED_ENV_PREFIX) {
            return Err(invalid(
                field,
                format!("names starting with {RESERVED_ENV_PREFIX} are reserved for the variables drover sets; rename it"),
            ));
        }
        if value.contains('\0') {
            return Err(invalid(field, "the value must not contain NUL bytes"));
        }
    }

    for (i, entry) in spec.inputs.iter().enumerate() {
        if entry.trim().is_empty() {
            return Err(invalid(format!("inputs[{i}]"), "must not be empty"));
        }
        if entry.contains('\0') {
            return Err(invalid(
                format!("inputs[{i}]"),
                "must not contain NUL bytes",
            ));
        }
    }

    for (i, glob) in spec.outputs.iter().enumerate() {
        let field = format!("outputs[{i}]");
        if glob.trim().is_empty() {
            return Err(invalid(field, "must not be empty"));
        }
        if glob.starts_with('/') {
            return Err(invalid(
                field,
                format!("{glob:?} is absolute; outputs are globs relative to the workspace, e.g. \"out/*.json\""),
            ));
        }
        if glob.split('/').any(|part| part == "..") {
            return Err(invalid(
                field,
                format!("{glob:?} leaves the workspace with \"..\"; outputs are collected from inside the workspace only"),
            ));
        }
        if glob.contains('\0') {
            return Err(invalid(field, "must not contain NUL bytes"));
        }
    }

    let req = &spec.requirements;
    if let Some(arch) = &req.arch {
        let hint = match arch.as_str() {
            "arm64" => Some("aarch64"),
            "amd64" | "x64" => Some("x86_64"),
            _ => None,
        };
        if let Some(linux) = hint {
            return Err(invalid(
                "requirements.arch",
                format!("{arch:?} is not what Linux calls it; use \"{linux}\" (workers report `uname -m`)"),
            ));
        }
        if !valid_name(arch) {
            return Err(invalid(
                "requirements.arch",
                format!("{arch:?} is not an architecture name; use `uname -m` spelling, e.g. \"x86_64\" or \"aarch64\""),
            ));
        }
    }
    check_memory("requirements.memory", req.memory_bytes)?;
    for (i, label) in req.labels.iter().enumerate() {
        if !valid_name(label) {
            return Err(invalid(
                format!("requirements.labels[{i}]"),
                format!("{label:?} is not a valid label: labels are {NAME_RULE}"),
            ));
        }
    }

    let limits = &spec.limits;
    if let Some(limit) = limits.memory_bytes {
        check_memory("limits.memory", limit)?;
        if limit == 0 {
            return Err(invalid(
                "limits.memory",
                "must be more than 0; leave it out for no limit",
            ));
        }
        if req.memory_bytes > 0 && limit < req.memory_bytes {
            return Err(invalid(
                "limits.memory",
                format!(
                    "{} is less than requirements.memory ({}); the limit must be at least what the task reserves",
                    format_size(limit),
                    format_size(req.memory_bytes)
                ),
            ));
        }
    }
    if limits.pids == Some(0) {
        return Err(invalid(
            "limits.pids",
            "must be at least 1 (the task's own process)",
        ));
    }
    if limits.wall_time_ms == Some(0) {
        return Err(invalid(
            "limits.wall_time",
            "must be more than 0; use e.g. \"30m\" or \"2h\"",
        ));
    }
    if spec.lost_after_ms == Some(0) {
        return Err(invalid(
            "lost_after",
            "must be more than 0; it is how long a keep_running attempt may stay disconnected, \
             e.g. \"5m\"",
        ));
    }
    if spec.retry.max_attempts == 0 {
        return Err(invalid(
            "retry.max_attempts",
            "must be at least 1 (the first attempt counts); use 1 for no retries",
        ));
    }
    check_oom_policy(spec)?;
    check_acceptance(spec)?;
    check_egress(spec)?;

    match drover_protocol::encode_frame(spec, MAX_SPEC_BYTES) {
        Ok(_) => Ok(()),
        Err(e) => Err(invalid(
            "(spec)",
            format!(
                "{e}; the spec may take at most {}: move large env values or arguments into an input file",
                format_size(MAX_SPEC_BYTES as u64)
            ),
        )),
    }
}

/// Most `egress` hosts, and most `secrets` grants, in one spec.
pub const MAX_EGRESS_HOSTS: usize = 64;
pub const MAX_SECRET_GRANTS: usize = 16;

/// `network = "proxy"`, `egress` and `secrets`: hosts the proxy can match, grants of valid
/// names for hosts inside the egress list, in headers that can carry them.
fn check_egress(spec: &TaskSpec) -> Result<(), InvalidField> {
    use drover_protocol::task::{Isolation, NetworkPolicy};
    use drover_protocol::SecretScheme;
    use drover_worker::egress::policy::parse_rule;
    let proxied = spec.network == NetworkPolicy::Proxy;
    if proxied && spec.isolation != Isolation::Sandbox {
        return Err(invalid(
            "network",
            "\"proxy\" needs isolation = \"sandbox\" (a process-isolated task shares the \
             worker's network, so nothing would hold it to the proxy)",
        ));
    }
    if !proxied && !spec.egress.is_empty() {
        return Err(invalid(
            "egress",
            "applies only with network = \"proxy\"; set it, or remove egress",
        ));
    }
    if !proxied && !spec.secrets.is_empty() {
        return Err(invalid(
            "secrets",
            "are used by the egress proxy: set network = \"proxy\" and list the hosts in egress",
        ));
    }
    if spec.egress.len() > MAX_EGRESS_HOSTS {
        return Err(invalid(
            "egress",
            format!(
                "lists {} hosts; at most {MAX_EGRESS_HOSTS}",
                spec.egress.len()
            ),
        ));
    }
    let mut allowed = Vec::new();
    for (i, host) in spec.egress.iter().enumerate() {
        allowed.push(parse_rule(host).map_err(|e| invalid(format!("egress[{i}]"), e))?);
    }
    if spec.secrets.len() > MAX_SECRET_GRANTS {
        return Err(invalid(
            "secrets",
            format!("grants {}; at most {MAX_SECRET_GRANTS}", spec.secrets.len()),
        ));
    }
    for (i, g) in spec.secrets.iter().enumerate() {
        let at = format!("secrets[{i}]");
        drover_protocol::secrets::check_secret_name(&g.name)
            .map_err(|e| invalid(format!("{at}.name"), e))?;
        if g.hosts.is_empty() {
            return Err(invalid(
                format!("{at}.hosts"),
                "is empty: name the hosts whose requests get this secret, e.g. [\"api.github.com\"]",
            ));
        }
        for (j, h) in g.hosts.iter().enumerate() {
            let field = format!("{at}.hosts[{j}]");
            let rule = parse_rule(h).map_err(|e| invalid(field.clone(), e))?;
            if !allowed.iter().any(|a| rule.within(a)) {
                return Err(invalid(
                    field,
                    format!("{h:?} is not covered by egress; add it to egress too"),
                ));
            }
        }
        let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
        if g.header.is_empty() || !g.header.chars().all(token) {
            return Err(invalid(
                format!("{at}.header"),
                format!(
                    "{:?} is not an HTTP header name, e.g. \"Authorization\"",
                    g.header
                ),
            ));
        }
        if let SecretScheme::Basic { username } = &g.scheme {
            if username.contains(':') || username.chars().any(char::is_control) {
                return Err(invalid(
                    format!("{at}.username"),
                    "must not contain ':' or control characters",
                ));
            }
        }
    }
    Ok(())
}

/// Most acceptance (or verdict) criteria in one spec.
pub const MAX_CRITERIA: usize = 32;
/// Most iterations of the acceptance loop.
pub const MAX_ITERATIONS: u32 = 100;

/// `acceptance`, `max_iterations` and `verdict`: named, unique, runnable criteria; a loop
/// bound that allows a first iteration; a verdict with criteria and outputs to check.
fn check_acceptance(spec: &TaskSpec) -> Result<(), InvalidField> {
    check_criteria("acceptance", &spec.acceptance)?;
    if !(1..=MAX_ITERATIONS).contains(&spec.max_iterations) {
        return Err(invalid(
            "max_iterations",
            format!(
                "{} is out of range: use 1 (check once, no retry of the command) to {MAX_ITERATIONS}",
                spec.max_iterations
            ),
        ));
    }
    let Some(verdict) = &spec.verdict else {
        return Ok(());
    };
    check_criteria("verdict.criteria", &verdict.criteria)?;
    if spec.acceptance.is_empty() && verdict.criteria.is_empty() {
        return Err(invalid(
            "verdict",
            "has no criteria to run: add [[acceptance]] criteria (the verdict re-runs them)              or [[verdict.criteria]]",
        ));
    }
    if spec.outputs.is_empty() {
        return Err(invalid(
            "verdict",
            "checks the task's declared outputs, but the spec declares none: add `outputs`              globs for the files the verdict must see",
        ));
    }
    Ok(())
}

fn check_criteria(
    field: &str,
    list: &[drover_protocol::task::Criterion],
) -> Result<(), InvalidField> {
    if list.len() > MAX_CRITERIA {
        return Err(invalid(
            field,
            format!(
                "has {} criteria; at most {MAX_CRITERIA} are allowed",
                list.len()
            ),
        ));
    }
    for (i, c) in list.iter().enumerate() {
        let at = format!("{field}[{i}]");
        let name = c.name.trim();
        if name.is_empty() || name.chars().count() > 64 || name.chars().any(char::is_control) {
            return Err(invalid(
                format!("{at}.name"),
                "must be 1 to 64 characters without control characters, e.g. \"tests\"",
            ));
        }
        if list[..i].iter().any(|o| o.name == c.name) {
            return Err(invalid(
                format!("{at}.name"),
                format!("{:?} is used twice; criterion names must be unique", c.name),
            ));
        }
        if c.command.is_empty() || c.command[0].trim().is_empty() {
            return Err(invalid(
                format!("{at}.command"),
                "must name a program, e.g. command = [\"cargo\", \"test\"]",
            ));
        }
        if c.command.iter().any(|a| a.contains('\0')) {
            return Err(invalid(
                format!("{at}.command"),
                "must not contain NUL bytes",
            ));
        }
        if c.timeout_ms == 0 {
            return Err(invalid(
                format!("{at}.timeout"),
                "must be more than 0; use e.g. \"5m\"",
            ));
        }
    }
    Ok(())
}

/// `retry.on_oom` and its knobs: a factor that grows, a ceiling that leaves room to grow,
/// and a memory to start from.
fn check_oom_policy(spec: &TaskSpec) -> Result<(), InvalidField> {
    let r = &spec.retry;
    if !(MIN_MEMORY_FACTOR_PERCENT..=MAX_MEMORY_FACTOR_PERCENT).contains(&r.memory_factor_percent) {
        return Err(invalid(
            "retry.memory_factor",
            format!(
                "{:.2} is out of range: the next attempt's memory is multiplied by it, so use a \
                 number from 1.1 to 10, e.g. 2.0",
                f64::from(r.memory_factor_percent) / 100.0
            ),
        ));
    }
    let grows = r.on_oom == OomPolicy::RetryWithMoreMemory;
    if let Some(ceiling) = r.memory_ceiling_bytes {
        if !grows {
            return Err(invalid(
                "retry.memory_ceiling",
                "applies only with on_oom = \"retry_with_more_memory\"; remove it or set that policy",
            ));
        }
        check_memory("retry.memory_ceiling", ceiling)?;
        if let Some(start) = super::oom::spec_memory(spec) {
            if ceiling <= start {
                return Err(invalid(
                    "retry.memory_ceiling",
                    format!(
                        "{} leaves no room to grow from the task's memory of {}; set it higher",
                        format_size(ceiling),
                        format_size(start)
                    ),
                ));
            }
        }
    }
    if grows && super::oom::spec_memory(spec).is_none() {
        return Err(invalid(
            "retry.on_oom",
            "\"retry_with_more_memory\" needs a memory to grow: set limits.memory or \
             requirements.memory",
        ));
    }
    Ok(())
}

fn check_memory(field: &str, bytes: u64) -> Result<(), InvalidField> {
    if bytes > 0 && bytes < MIN_MEMORY_BYTES {
        return Err(invalid(
            field,
            format!(
                "{bytes} bytes is too little to run anything; a plain number is bytes, so write \
                 the unit, e.g. \"{bytes}MiB\""
            ),
        ));
    }
    Ok(())
}

fn is_shell_identifier(key: &str) -> bool {
    let mut bytes = key.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}
