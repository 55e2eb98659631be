//! The task spec *file*: what `drover submit SPEC` reads, friendlier than the wire type.
//!
//! A spec file is TOML (`.toml`) or JSON (`.json`) with human units (`memory = "2GiB"`,
//! `wall_time = "30m"`); docs/task-spec.md documents every field and examples/ holds runnable
//! ones. This module owns the file format and the way from a file to a [`TaskSpec`]:
//!
//! 1. [`parse_spec`] (no I/O): deserialize with unknown keys refused (TOML and JSON errors
//!    carry the line), convert units, fill defaults, then [`validate_spec`];
//! 2. [`resolve_inputs`]: find every input beside the spec file and size it against
//!    [`MAX_INPUT_BYTES`](super::inputs::MAX_INPUT_BYTES);
//! 3. [`load_spec`] does both for a file on disk.
//!
//! Every error names the file, the field (`requirements.memory`, `env.FOO`, `inputs[2]`) and
//! what to do; nothing is queued from a spec that fails here.

use super::inputs::{resolve_inputs, InputFile};
use super::units;
use super::validate::{invalid, validate_spec, InvalidField};
use drover_protocol::task::{
    Criterion, Isolation, Limits, NetworkPolicy, OnDisconnect, Requirements, RetryPolicy, TaskSpec,
    VerdictSpec, DEFAULT_CRITERION_TIMEOUT_MS, DEFAULT_MAX_ITERATIONS,
};
use drover_protocol::{SecretGrant, SecretScheme};
use serde::de::{self, Deserializer, SeqAccess, Unexpected, Visitor};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// CPUs reserved when a spec file does not say (the wire default is 0).
pub const DEFAULT_CPUS: u32 = 1;

/// The syntax of a spec file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpecFormat {
    Toml,
    Json,
}

impl SpecFormat {
    /// The format a file name promises: `.toml` or `.json` (case-insensitive).
    pub fn from_path(path: &Path) -> Option<Self> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "toml" => Some(SpecFormat::Toml),
            "json" => Some(SpecFormat::Json),
            _ => None,
        }
    }

    /// Guess from content: a JSON spec is an object, and no TOML document starts with `{`.
    pub fn sniff(text: &str) -> Self {
        if text.trim_start().starts_with('{') {
            SpecFormat::Json
        } else {
            SpecFormat::Toml
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SpecFormat::Toml => "TOML",
            SpecFormat::Json => "JSON",
        }
    }
}

impl fmt::Display for SpecFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A spec read from disk: the wire spec plus the inputs to pack and ship.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedSpec {
    pub spec: TaskSpec,
    /// One per `spec.inputs` entry, in the same order.
    pub inputs: Vec<InputFile>,
}

impl LoadedSpec {
    /// Bytes of all inputs together (at most [`MAX_INPUT_BYTES`](super::inputs::MAX_INPUT_BYTES)).
    pub fn input_bytes(&self) -> u64 {
        self.inputs.iter().map(|i| i.bytes).sum()
    }
}

/// A spec file that cannot be submitted. Nothing is queued.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("cannot read task spec {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Not valid TOML/JSON, a wrong type, an unknown key or a missing one.
    #[error(
        "{}: invalid {format} task spec: {message}{}",
        location(path, *line, *column),
        guess_note(path, *format, *guessed)
    )]
    Parse {
        path: PathBuf,
        format: SpecFormat,
        /// 1-based, when the parser knows it.
        line: Option<usize>,
        column: Option<usize>,
        message: String,
        /// The format was guessed from content because the file name ends in neither
        /// `.toml` nor `.json`.
        guessed: bool,
    },
    /// Well-formed, but a value cannot be used.
    #[error("{}: {source}", path.display())]
    Invalid { path: PathBuf, source: InvalidField },
}

fn location(path: &Path, line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!("{}:{l}:{c}", path.display()),
        (Some(l), None) => format!("{}:{l}", path.display()),
        _ => path.display().to_string(),
    }
}

fn guess_note(path: &Path, format: SpecFormat, guessed: bool) -> String {
    if guessed {
        format!(
            " (read as {format} because {} ends in neither .toml nor .json; task specs are \
             TOML or JSON)",
            path.display()
        )
    } else {
        String::new()
    }
}

/// Read, check and size the spec at `path`: TOML for `.toml`, JSON for `.json`, otherwise
/// guessed from the content. Inputs are resolved relative to the spec file's directory.
pub fn load_spec(path: &Path) -> Result<LoadedSpec, SpecError> {
    let text = std::fs::read_to_string(path).map_err(|source| SpecError::Read {
        path: path.into(),
        source,
    })?;
    let spec = parse_spec(&text, SpecFormat::from_path(path), path)?;
    let base = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let inputs = resolve_inputs(&spec, base).map_err(|source| SpecError::Invalid {
        path: path.into(),
        source,
    })?;
    Ok(LoadedSpec { spec, inputs })
}

/// Parse and validate spec text without touching the filesystem. `format: None` guesses from
/// the content. `path` is used in messages and, when the spec has no `name`, for its stem.
pub fn parse_spec(
    text: &str,
    format: Option<SpecFormat>,
    path: &Path,
) -> Result<TaskSpec, SpecError> {
    let guessed = format.is_none();
    let format = format.unwrap_or_else(|| SpecFormat::sniff(text));
    let parse_error = |line, column, message| SpecError::Parse {
        path: path.into(),
        format,
        line,
        column,
        message,
        guessed,
    };
    let file: SpecFile = match format {
        SpecFormat::Toml => toml::from_str(text).map_err(|e| {
            let (line, column) = match e.span() {
                Some(span) => {
                    let (l, c) = line_column(text, span.start);
                    (Some(l), Some(c))
                }
                None => (None, None),
            };
            // Syntax messages come on several lines ("invalid string\nexpected `\"`"); keep one.
            let message = e
                .message()
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join("; ");
            parse_error(line, column, message)
        })?,
        SpecFormat::Json => serde_json::from_str(text).map_err(|e| {
            let full = e.to_string();
            let suffix = format!(" at line {} column {}", e.line(), e.column());
            let message = full.strip_suffix(&suffix).unwrap_or(&full).to_owned();
            let known = e.line() > 0;
            parse_error(
                known.then_some(e.line()),
                known.then_some(e.column()),
                message,
            )
        })?,
    };
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let to_invalid = |source| SpecError::Invalid {
        path: path.into(),
        source,
    };
    let spec = file.into_task_spec(&stem).map_err(to_invalid)?;
    validate_spec(&spec).map_err(to_invalid)?;
    Ok(spec)
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    // toml spans start on character boundaries; `get` keeps a surprise from panicking.
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

// ---- the file format -------------------------------------------------------------------

/// The top level of a spec file. Field docs live in docs/task-spec.md.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SpecFile {
    name: Option<String>,
    command: Option<Argv>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    inputs: Vec<String>,
    #[serde(default)]
    outputs: Vec<String>,
    #[serde(default)]
    requirements: RequirementsFile,
    #[serde(default)]
    limits: LimitsFile,
    #[serde(default)]
    network: NetworkPolicy,
    #[serde(default)]
    isolation: Isolation,
    #[serde(default)]
    retry: RetryFile,
    #[serde(default)]
    priority: i32,
    #[serde(default)]
    on_disconnect: Option<OnDisconnect>,
    lost_after: Option<Human>,
    #[serde(default)]
    acceptance: Vec<CriterionFile>,
    max_iterations: Option<u32>,
    verdict: Option<VerdictFile>,
    #[serde(default)]
    egress: Vec<String>,
    #[serde(default)]
    secrets: Vec<SecretFile>,
}

/// One `[[secrets]]` grant.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretFile {
    name: String,
    hosts: Vec<String>,
    header: Option<String>,
    #[serde(default)]
    scheme: SchemeFile,
    username: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
enum SchemeFile {
    #[default]
    Bearer,
    Basic,
    Raw,
}

impl SecretFile {
    fn into_grant(self, field: &str) -> Result<SecretGrant, InvalidField> {
        let scheme =
            match (self.scheme, self.username) {
                (SchemeFile::Basic, Some(username)) => SecretScheme::Basic { username },
                (SchemeFile::Basic, None) => return Err(invalid(
                    format!("{field}.username"),
                    "is needed with scheme = \"basic\" (git hosts take e.g. \"x-access-token\")",
                )),
                (_, Some(_)) => {
                    return Err(invalid(
                        format!("{field}.username"),
                        "applies only with scheme = \"basic\"; remove it or set that scheme",
                    ))
                }
                (SchemeFile::Bearer, None) => SecretScheme::Bearer,
                (SchemeFile::Raw, None) => SecretScheme::Raw,
            };
        Ok(SecretGrant {
            name: self.name,
            hosts: self
                .hosts
                .iter()
                .map(|h| h.trim().to_ascii_lowercase())
                .collect(),
            header: self.header.unwrap_or_else(|| "Authorization".to_owned()),
            scheme,
        })
    }
}

/// One `[[acceptance]]` (or `[[verdict.criteria]]`) entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CriterionFile {
    name: String,
    command: Argv,
    timeout: Option<Human>,
}

impl CriterionFile {
    fn into_criterion(self, field: &str) -> Result<Criterion, InvalidField> {
        Ok(Criterion {
            name: self.name,
            command: self.command.0,
            timeout_ms: match self.timeout {
                Some(t) => t.duration(&format!("{field}.timeout"))?,
                None => DEFAULT_CRITERION_TIMEOUT_MS,
            },
        })
    }
}

/// `[verdict]`: present (even empty) means "run a verdict".
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct VerdictFile {
    criteria: Vec<CriterionFile>,
}

fn criteria(list: Vec<CriterionFile>, field: &str) -> Result<Vec<Criterion>, InvalidField> {
    list.into_iter()
        .enumerate()
        .map(|(i, c)| c.into_criterion(&format!("{field}[{i}]")))
        .collect()
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RequirementsFile {
    arch: Option<String>,
    cpus: Option<u32>,
    memory: Option<Human>,
    gpus: u32,
    labels: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct LimitsFile {
    memory: Option<Human>,
    pids: Option<u32>,
    wall_time: Option<Human>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RetryFile {
    max_attempts: Option<u32>,
    backoff: Option<Human>,
    on_oom: Option<drover_protocol::task::OomPolicy>,
    memory_factor: Option<f64>,
    memory_ceiling: Option<Human>,
}

impl RetryFile {
    /// `memory_factor = 2.0` as the wire's percentage (200), refused when it is not a number
    /// the policy can use or is given without the policy that reads it.
    fn factor_percent(&self, default: u32) -> Result<u32, InvalidField> {
        let Some(f) = self.memory_factor else {
            return Ok(default);
        };
        if self.on_oom != Some(drover_protocol::task::OomPolicy::RetryWithMoreMemory) {
            return Err(invalid(
                "retry.memory_factor",
                "applies only with on_oom = \"retry_with_more_memory\"; remove it or set that policy",
            ));
        }
        if !f.is_finite() || !(1.1..=10.0).contains(&f) {
            return Err(invalid(
                "retry.memory_factor",
                format!("{f} is out of range: use a number from 1.1 to 10, e.g. 2.0"),
            ));
        }
        Ok((f * 100.0).round() as u32)
    }
}

impl SpecFile {
    fn into_task_spec(self, default_name: &str) -> Result<TaskSpec, InvalidField> {
        if self.max_iterations.is_some() && self.acceptance.is_empty() {
            return Err(invalid(
                "max_iterations",
                "applies only with [[acceptance]] criteria; add some or remove it",
            ));
        }
        let limit_defaults = Limits::default();
        let retry_defaults = RetryPolicy::default();
        let r = self.requirements;
        let l = self.limits;
        Ok(TaskSpec {
            name: self.name.unwrap_or_else(|| default_name.to_owned()),
            command: match self.command {
                Some(argv) => argv.0,
                None => {
                    return Err(invalid(
                        "command",
                        "is missing: give the program and its arguments as a list, e.g. \
                         command = [\"echo\", \"hello\"]",
                    ))
                }
            },
            env: self.env,
            inputs: self.inputs,
            outputs: self.outputs,
            requirements: Requirements {
                arch: r.arch,
                cpus: r.cpus.unwrap_or(DEFAULT_CPUS),
                memory_bytes: r
                    .memory
                    .map(|m| m.size("requirements.memory"))
                    .transpose()?
                    .unwrap_or(0),
                gpus: r.gpus,
                labels: r.labels,
            },
            limits: Limits {
                memory_bytes: l.memory.map(|m| m.size("limits.memory")).transpose()?,
                pids: l.pids.or(limit_defaults.pids),
                wall_time_ms: match l.wall_time {
                    Some(w) => Some(w.duration("limits.wall_time")?),
                    None => limit_defaults.wall_time_ms,
                },
            },
            network: self.network,
            isolation: self.isolation,
            retry: RetryPolicy {
                max_attempts: self
                    .retry
                    .max_attempts
                    .unwrap_or(retry_defaults.max_attempts),
                backoff_ms: match self.retry.backoff.clone() {
                    Some(b) => b.duration("retry.backoff")?,
                    None => retry_defaults.backoff_ms,
                },
                on_oom: self.retry.on_oom.unwrap_or(retry_defaults.on_oom),
                memory_factor_percent: self
                    .retry
                    .factor_percent(retry_defaults.memory_factor_percent)?,
                memory_ceiling_bytes: self
                    .retry
                    .memory_ceiling
                    .clone()
                    .map(|c| c.size("retry.memory_ceiling"))
                    .transpose()?,
            },
            priority: self.priority,
            on_disconnect: self.on_disconnect,
            lost_after_ms: self
                .lost_after
                .map(|d| d.duration("lost_after"))
                .transpose()?,
            acceptance: criteria(self.acceptance, "acceptance")?,
            max_iterations: self.max_iterations.unwrap_or(DEFAULT_MAX_ITERATIONS),
            verdict: match self.verdict {
                Some(v) => Some(VerdictSpec {
                    criteria: criteria(v.criteria, "verdict.criteria")?,
                }),
                None => None,
            },
            egress: self
                .egress
                .iter()
                .map(|h| h.trim().to_ascii_lowercase())
                .collect(),
            secrets: self
                .secrets
                .into_iter()
                .enumerate()
                .map(|(i, s)| s.into_grant(&format!("secrets[{i}]")))
                .collect::<Result<_, _>>()?,
        })
    }
}

/// `command`: a list of strings. A single string is refused with a hint rather than split,
/// because no splitting rule is obvious to everyone.
#[derive(Debug)]
struct Argv(Vec<String>);

impl<'de> Deserialize<'de> for Argv {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ArgvVisitor;
        impl<'de> Visitor<'de> for ArgvVisitor {
            type Value = Argv;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of strings (the program and its arguments)")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Argv, E> {
                Err(E::custom(format!(
                    "command is a list of strings, not one string; write command = [\"sh\", \"-c\", {v:?}] \
                     to run it with a shell, or split it into the program and its arguments"
                )))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Argv, A::Error> {
                let mut args = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(256));
                while let Some(arg) = seq.next_element::<String>()? {
                    args.push(arg);
                }
                Ok(Argv(args))
            }
        }
        d.deserialize_any(ArgvVisitor)
    }
}

/// A size or duration as written: a plain integer (bytes, ms) or a string with units,
/// converted in [`SpecFile::into_task_spec`] where the field name is known for the message.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Human {
    Number(u64),
    Text(String),
}

impl Human {
    fn size(self, field: &str) -> Result<u64, InvalidField> {
        match self {
            Human::Number(n) => Ok(n),
            Human::Text(t) => units::parse_size(&t).map_err(|e| invalid(field, e.to_string())),
        }
    }

    fn duration(self, field: &str) -> Result<u64, InvalidField> {
        match self {
            Human::Number(n) => Ok(n),
            Human::Text(t) => units::parse_duration(&t).map_err(|e| invalid(field, e.to_string())),
        }
    }
}

impl<'de> Deserialize<'de> for Human {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct HumanVisitor;
        impl Visitor<'_> for HumanVisitor {
            type Value = Human;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a whole number or a string with a unit, e.g. \"2GiB\" or \"30m\"")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Human, E> {
                Ok(Human::Number(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Human, E> {
                u64::try_from(v)
                    .map(Human::Number)
                    .map_err(|_| E::invalid_value(Unexpected::Signed(v), &self))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Human, E> {
                Ok(Human::Text(v.to_owned()))
            }
        }
        d.deserialize_any(HumanVisitor)
    }
}

#[cfg(test)]
#[path = "spec_tests.rs"]
mod tests;
