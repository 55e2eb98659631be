#![allow(clippy::unwrap_used)]

use super::*;
use crate::tasks::validate::MAX_SPEC_BYTES;
use std::fs;

fn toml(text: &str) -> Result<TaskSpec, SpecError> {
    parse_spec(text, Some(SpecFormat::Toml), Path::new("dir/job.toml"))
}

fn json(text: &str) -> Result<TaskSpec, SpecError> {
    parse_spec(text, Some(SpecFormat::Json), Path::new("dir/job.json"))
}

/// The `field: message` of a validation error, or a panic naming what came instead.
fn invalid_field(r: Result<TaskSpec, SpecError>) -> (String, String) {
    match r {
        Err(SpecError::Invalid { source, .. }) => (source.field, source.message),
        other => panic!("expected an invalid field, got {other:?}"),
    }
}

fn toml_invalid(text: &str) -> (String, String) {
    invalid_field(toml(text))
}

const CMD: &str = "command = [\"true\"]\n";

#[test]
fn minimal_spec_gets_documented_defaults() {
    let spec = toml(CMD).unwrap();
    assert_eq!(spec.name, "job", "name defaults to the file stem");
    assert_eq!(spec.command, ["true"]);
    assert!(spec.env.is_empty() && spec.inputs.is_empty() && spec.outputs.is_empty());
    assert_eq!(
        spec.requirements,
        Requirements {
            cpus: DEFAULT_CPUS,
            ..Requirements::default()
        }
    );
    assert_eq!(spec.limits, Limits::default());
    assert_eq!(spec.limits.pids, Some(512));
    assert_eq!(spec.limits.wall_time_ms, Some(3_600_000));
    assert_eq!(spec.network, NetworkPolicy::None);
    assert_eq!(spec.isolation, Isolation::Sandbox);
    assert_eq!(spec.retry, RetryPolicy::default());
    assert_eq!(spec.priority, 0);
}

const FULL_TOML: &str = r#"
name = "render"
command = ["python3", "render.py", "--out", "out"]
inputs = ["render.py", "assets/"]
outputs = ["out/*.png", "log.txt"]
network = "host"
isolation = "process"
priority = 10

[env]
PYTHONUNBUFFERED = "1"
_private = "x"

[requirements]
arch = "aarch64"
cpus = 2
memory = "1.5GiB"
gpus = 1
labels = ["browser", "gpu"]

[limits]
memory = "2GiB"
pids = 128
wall_time = "1h30m"

[retry]
max_attempts = 5
backoff = "2s"
"#;

const FULL_JSON: &str = r#"{
  "name": "render",
  "command": ["python3", "render.py", "--out", "out"],
  "env": {"PYTHONUNBUFFERED": "1", "_private": "x"},
  "inputs": ["render.py", "assets/"],
  "outputs": ["out/*.png", "log.txt"],
  "requirements": {"arch": "aarch64", "cpus": 2, "memory": 1610612736, "gpus": 1,
                   "labels": ["browser", "gpu"]},
  "limits": {"memory": "2GiB", "pids": 128, "wall_time": 5400000},
  "network": "host",
  "isolation": "process",
  "retry": {"max_attempts": 5, "backoff": "2s"},
  "priority": 10
}"#;

#[test]
fn every_field_converts_and_json_matches_toml() {
    let spec = toml(FULL_TOML).unwrap();
    assert_eq!(
        spec,
        TaskSpec {
            name: "render".into(),
            command: vec![
                "python3".into(),
                "render.py".into(),
                "--out".into(),
                "out".into()
            ],
            env: [("PYTHONUNBUFFERED", "1"), ("_private", "x")]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            inputs: vec!["render.py".into(), "assets/".into()],
            outputs: vec!["out/*.png".into(), "log.txt".into()],
            requirements: Requirements {
                arch: Some("aarch64".into()),
                cpus: 2,
                memory_bytes: 1_610_612_736,
                gpus: 1,
                labels: vec!["browser".into(), "gpu".into()],
            },
            limits: Limits {
                memory_bytes: Some(2 << 30),
                pids: Some(128),
                wall_time_ms: Some(5_400_000),
            },
            network: NetworkPolicy::Host,
            isolation: Isolation::Process,
            retry: RetryPolicy {
                max_attempts: 5,
                backoff_ms: 2000,
                ..RetryPolicy::default()
            },
            priority: 10,
            on_disconnect: None,
            lost_after_ms: None,
            acceptance: vec![],
            max_iterations: drover_protocol::task::DEFAULT_MAX_ITERATIONS,
            verdict: None,
            egress: Vec::new(),
            secrets: Vec::new(),
        }
    );
    assert_eq!(json(FULL_JSON).unwrap(), spec);
}

#[test]
fn unknown_keys_are_named_with_their_line() {
    let err =
        toml("command = [\"true\"]\n[requirements]\ncpus = 1\nmemroy = \"1GiB\"\n").unwrap_err();
    let SpecError::Parse {
        line,
        message,
        guessed,
        ..
    } = &err
    else {
        panic!("{err:?}")
    };
    assert_eq!(*line, Some(4));
    assert!(!guessed);
    assert!(message.contains("unknown field `memroy`"), "{message}");
    assert!(
        message.contains("`memory`"),
        "lists the known keys: {message}"
    );
    assert!(
        err.to_string()
            .starts_with("dir/job.toml:4:1: invalid TOML task spec: unknown field `memroy`"),
        "{err}"
    );

    let err = toml("command = [\"true\"]\nname = \n").unwrap_err();
    assert!(!err.to_string().contains('\n'), "one line: {err}");

    let err = toml("comand = [\"true\"]\n").unwrap_err();
    assert!(err.to_string().contains("unknown field `comand`"), "{err}");

    let err = json("{\"command\": [\"true\"],\n \"retry\": {\"max_atempts\": 2}}").unwrap_err();
    assert!(
        err.to_string().starts_with("dir/job.json:2:")
            && err.to_string().contains("unknown field `max_atempts`"),
        "{err}"
    );
}

#[test]
fn wrong_types_are_parse_errors_naming_the_expectation() {
    let err = toml("command = [\"true\"]\n[requirements]\ncpus = \"two\"\n").unwrap_err();
    assert!(
        matches!(&err, SpecError::Parse { line: Some(3), .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("expected u32"), "{err}");

    let err = toml("command = [\"true\"]\nnetwork = \"internet\"\n").unwrap_err();
    assert!(
        err.to_string().contains("`none`") && err.to_string().contains("`host`"),
        "{err}"
    );

    let err = toml("command = [\"true\"]\n[limits]\nmemory = 1.5\n").unwrap_err();
    assert!(err.to_string().contains("\"2GiB\""), "{err}");

    let err = toml("command = [\"true\"]\n[limits]\nwall_time = -5\n").unwrap_err();
    assert!(err.to_string().contains("-5"), "{err}");
}

#[test]
fn command_is_required_non_empty_and_a_list() {
    let (field, message) = toml_invalid("name = \"x\"\n");
    assert_eq!(field, "command");
    assert!(message.starts_with("is missing"), "{message}");
    let (field, message) = toml_invalid("command = []\n");
    assert_eq!(field, "command");
    assert!(
        message.contains("command = [\"echo\", \"hello\"]"),
        "{message}"
    );
    assert_eq!(toml_invalid("command = [\"\", \"x\"]\n").0, "command[0]");
    assert_eq!(
        toml_invalid("command = [\"echo\", \"a\\u0000b\"]\n").0,
        "command[1]"
    );

    let err = toml("command = \"echo hello\"\n").unwrap_err();
    assert!(
        err.to_string()
            .contains("command = [\"sh\", \"-c\", \"echo hello\"]"),
        "{err}"
    );
}

#[test]
fn sizes_and_durations_explain_themselves() {
    let err = toml("command = [\"true\"]\n[requirements]\nmemory = \"2 gigs\"\n").unwrap_err();
    assert_eq!(
        err.to_string(),
        "dir/job.toml: requirements.memory: \"2 gigs\" is not a size; use e.g. 512MiB, 2GiB or a number of bytes"
    );
    let (field, message) =
        toml_invalid("command = [\"true\"]\n[limits]\nwall_time = \"30 minutes\"\n");
    assert_eq!(field, "limits.wall_time");
    assert_eq!(
        message,
        "\"30 minutes\" is not a duration; use e.g. 90s, 30m, 1h30m or a number of milliseconds"
    );
    let (field, message) = toml_invalid("command = [\"true\"]\n[retry]\nbackoff = \"5\"\n");
    assert_eq!(field, "retry.backoff");
    assert!(message.contains("\"5s\""), "{message}");

    let spec = toml(
        "command = [\"true\"]\n[requirements]\nmemory = 1073741824\n[limits]\nwall_time = 1500\n",
    )
    .unwrap();
    assert_eq!(spec.requirements.memory_bytes, 1 << 30);
    assert_eq!(spec.limits.wall_time_ms, Some(1500));
}

#[test]
fn field_rules() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "[env]\n\"1X\" = \"a\"\n",
            "env.1X",
            "not a valid variable name",
        ),
        (
            "[env]\n\"A-B\" = \"a\"\n",
            "env.A-B",
            "not a valid variable name",
        ),
        (
            "[env]\nDROVER_TASK_ID = \"a\"\n",
            "env.DROVER_TASK_ID",
            "reserved",
        ),
        ("outputs = [\"/etc/passwd\"]\n", "outputs[0]", "absolute"),
        ("outputs = [\"ok\", \"../up\"]\n", "outputs[1]", "\"..\""),
        ("outputs = [\"a/../../b\"]\n", "outputs[0]", "\"..\""),
        ("outputs = [\"\"]\n", "outputs[0]", "empty"),
        ("inputs = [\" \"]\n", "inputs[0]", "empty"),
        (
            "[requirements]\nlabels = [\"has space\"]\n",
            "requirements.labels[0]",
            "not a valid label",
        ),
        (
            "[requirements]\narch = \"arm64\"\n",
            "requirements.arch",
            "use \"aarch64\"",
        ),
        (
            "[requirements]\narch = \"amd64\"\n",
            "requirements.arch",
            "use \"x86_64\"",
        ),
        (
            "[requirements]\narch = \"x86 64\"\n",
            "requirements.arch",
            "uname -m",
        ),
        (
            "[requirements]\nmemory = 512\n",
            "requirements.memory",
            "\"512MiB\"",
        ),
        ("[limits]\nmemory = 0\n", "limits.memory", "more than 0"),
        ("[limits]\npids = 0\n", "limits.pids", "at least 1"),
        (
            "[limits]\nwall_time = 0\n",
            "limits.wall_time",
            "more than 0",
        ),
        (
            "[limits]\nwall_time = \"0s\"\n",
            "limits.wall_time",
            "more than 0",
        ),
        (
            "[retry]\nmax_attempts = 0\n",
            "retry.max_attempts",
            "at least 1",
        ),
        ("name = \"  \"\n", "name", "empty"),
        ("name = \"a\\nb\"\n", "name", "control characters"),
        (
            "[requirements]\nmemory = \"4GiB\"\n[limits]\nmemory = \"2GiB\"\n",
            "limits.memory",
            "2 GiB is less than requirements.memory (4 GiB)",
        ),
    ];
    for (body, want_field, want_text) in cases {
        let (field, message) = toml_invalid(&format!("{CMD}{body}"));
        assert_eq!(&field, want_field, "{body}");
        assert!(message.contains(want_text), "{body}: {message}");
    }
    // Equal limit and requirement, lowercase and underscore env names, globs with ** are fine.
    toml(&format!(
        "{CMD}outputs = [\"**/*.log\", \"./a\"]\n[env]\n_x1 = \"\"\nlower = \"y\"\n\
         [requirements]\nmemory = \"2GiB\"\n[limits]\nmemory = \"2GiB\"\n"
    ))
    .unwrap();
}

#[test]
fn oversized_spec_is_refused_before_it_reaches_the_wire() {
    let mut spec = toml(CMD).unwrap();
    spec.env.insert("BIG".into(), "x".repeat(MAX_SPEC_BYTES));
    let err = validate_spec(&spec).unwrap_err();
    assert!(err.message.contains("input file"), "{err}");
}

#[test]
fn format_is_guessed_when_the_name_does_not_say() {
    let spec = parse_spec("{\"command\": [\"true\"]}", None, Path::new("job.spec")).unwrap();
    assert_eq!(spec.name, "job");
    parse_spec(CMD, None, Path::new("job.spec")).unwrap();
    let err = parse_spec("command: [true]\n", None, Path::new("job.yaml")).unwrap_err();
    assert!(matches!(
        err,
        SpecError::Parse {
            guessed: true,
            format: SpecFormat::Toml,
            ..
        }
    ));
    assert!(
        err.to_string().contains("task specs are TOML or JSON"),
        "{err}"
    );
    assert_eq!(
        SpecFormat::from_path(Path::new("a/B.JSON")),
        Some(SpecFormat::Json)
    );
    assert_eq!(SpecFormat::from_path(Path::new("a/b")), None);
}

#[test]
fn unreadable_spec_file_is_a_read_error() {
    let err = load_spec(Path::new("/nonexistent/drover/job.toml")).unwrap_err();
    assert!(matches!(err, SpecError::Read { .. }));
    assert!(err
        .to_string()
        .starts_with("cannot read task spec /nonexistent/drover/job.toml"));
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn every_example_loads() {
    let dir = repo_root().join("examples");
    let mut names = Vec::new();
    for entry in fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            continue; // data the examples ship as inputs
        }
        let loaded = load_spec(&path).unwrap_or_else(|e| panic!("{e}"));
        names.push(path.file_name().unwrap().to_string_lossy().into_owned());
        if path.ends_with("arm.toml") {
            assert_eq!(loaded.spec.requirements.arch.as_deref(), Some("aarch64"));
            assert!(loaded.spec.command.join(" ").contains("uname -m"));
        }
        if path.ends_with("browser.toml") {
            assert_eq!(loaded.spec.requirements.labels, ["browser"]);
        }
    }
    names.sort();
    for want in ["arm.toml", "browser.toml", "hello.json", "hello.toml"] {
        assert!(
            names.iter().any(|n| n == want),
            "examples/{want} is missing: {names:?}"
        );
    }
    let hello_toml = load_spec(&dir.join("hello.toml")).unwrap();
    let hello_json = load_spec(&dir.join("hello.json")).unwrap();
    assert_eq!(
        hello_toml.spec, hello_json.spec,
        "the two hello examples say the same"
    );
}

/// Every ```toml and ```json block in docs/task-spec.md is a complete, valid spec unless its
/// info string says `fragment`.
#[test]
fn every_spec_in_the_docs_parses() {
    let doc = fs::read_to_string(repo_root().join("docs/task-spec.md")).unwrap();
    let mut checked = 0;
    let mut block: Option<(SpecFormat, String)> = None;
    for line in doc.lines() {
        match (&mut block, line.strip_prefix("```")) {
            (None, Some(info)) => {
                let format = match info.split_whitespace().next() {
                    Some("toml") => SpecFormat::Toml,
                    Some("json") => SpecFormat::Json,
                    _ => continue,
                };
                if !info.contains("fragment") {
                    block = Some((format, String::new()));
                }
            }
            (Some((format, text)), Some(_)) => {
                parse_spec(text, Some(*format), Path::new("docs/task-spec.md"))
                    .unwrap_or_else(|e| panic!("{e}\n{text}"));
                checked += 1;
                block = None;
            }
            (Some((_, text)), None) => {
                text.push_str(line);
                text.push('\n');
            }
            (None, None) => {}
        }
    }
    assert!(
        checked >= 2,
        "found only {checked} spec blocks in docs/task-spec.md"
    );
}

#[test]
fn oom_policy_fields_convert_and_are_checked() {
    use drover_protocol::task::OomPolicy;
    let spec = toml(&format!(
        "{CMD}[limits]\nmemory = \"512MiB\"\n[retry]\non_oom = \"retry_with_more_memory\"\nmemory_factor = 1.5\nmemory_ceiling = \"2GiB\"\n"
    ))
    .unwrap();
    assert_eq!(spec.retry.on_oom, OomPolicy::RetryWithMoreMemory);
    assert_eq!(spec.retry.memory_factor_percent, 150);
    assert_eq!(spec.retry.memory_ceiling_bytes, Some(2 << 30));
    let j =
        json(r#"{"command":["true"],"requirements":{"memory":"1GiB"},"retry":{"on_oom":"fail"}}"#)
            .unwrap();
    assert_eq!(j.retry.on_oom, OomPolicy::Fail);

    let (field, message) = toml_invalid(&format!(
        "{CMD}[retry]\non_oom = \"retry_with_more_memory\"\n"
    ));
    assert_eq!(field, "retry.on_oom");
    assert!(
        message.contains("limits.memory or requirements.memory"),
        "{message}"
    );
    let (field, message) = toml_invalid(&format!(
        "{CMD}[limits]\nmemory = \"1GiB\"\n[retry]\non_oom = \"retry_with_more_memory\"\nmemory_ceiling = \"512MiB\"\n"
    ));
    assert_eq!(field, "retry.memory_ceiling");
    assert!(message.contains("no room to grow"), "{message}");
    let (field, message) = toml_invalid(&format!("{CMD}[retry]\nmemory_factor = 2.0\n"));
    assert_eq!(field, "retry.memory_factor");
    assert!(message.contains("retry_with_more_memory"), "{message}");
    let (field, _) = toml_invalid(&format!(
        "{CMD}[limits]\nmemory = \"1GiB\"\n[retry]\non_oom = \"retry_with_more_memory\"\nmemory_factor = 1.0\n"
    ));
    assert_eq!(field, "retry.memory_factor");
    let (field, _) = toml_invalid(&format!("{CMD}[retry]\nmemory_ceiling = \"4GiB\"\n"));
    assert_eq!(field, "retry.memory_ceiling");
    assert!(matches!(
        toml(&format!("{CMD}[retry]\non_oom = \"sometimes\"\n")),
        Err(SpecError::Parse { .. })
    ));
}

#[test]
fn acceptance_criteria_and_verdict_convert_and_are_checked() {
    let spec = toml(&format!(
        "{CMD}outputs = [\"out/\"]\nmax_iterations = 5\n\
         [[acceptance]]\nname = \"tests\"\ncommand = [\"cargo\", \"test\"]\ntimeout = \"2m\"\n\
         [[acceptance]]\nname = \"report\"\ncommand = [\"test\", \"-s\", \"out/r.json\"]\n\
         [verdict]\n"
    ))
    .unwrap();
    assert_eq!(spec.max_iterations, 5);
    assert_eq!(spec.acceptance.len(), 2);
    assert_eq!(spec.acceptance[0].timeout_ms, 120_000);
    assert_eq!(
        spec.acceptance[1].timeout_ms,
        drover_protocol::task::DEFAULT_CRITERION_TIMEOUT_MS
    );
    // An empty [verdict] re-runs the acceptance criteria.
    assert_eq!(spec.verdict_criteria().unwrap(), &spec.acceptance[..]);
    let j = json(
        r#"{"command":["true"],"outputs":["o"],"acceptance":[{"name":"a","command":["true"]}],
            "verdict":{"criteria":[{"name":"v","command":["true"],"timeout":"1s"}]}}"#,
    )
    .unwrap();
    assert_eq!(
        j.max_iterations,
        drover_protocol::task::DEFAULT_MAX_ITERATIONS
    );
    assert_eq!(j.verdict_criteria().unwrap()[0].name, "v");
    assert_eq!(j.verdict_criteria().unwrap()[0].timeout_ms, 1000);

    let crit = "[[acceptance]]\nname = \"t\"\ncommand = [\"true\"]\n";
    for (text, want_field, want) in [
        (
            format!("{CMD}max_iterations = 2\n"),
            "max_iterations",
            "only with [[acceptance]]",
        ),
        (
            format!("{CMD}max_iterations = 0\n{crit}"),
            "max_iterations",
            "out of range",
        ),
        (
            format!("{CMD}{crit}{crit}"),
            "acceptance[1].name",
            "used twice",
        ),
        (
            format!("{CMD}[[acceptance]]\nname = \"\"\ncommand = [\"true\"]\n"),
            "acceptance[0].name",
            "1 to 64 characters",
        ),
        (
            format!("{CMD}[[acceptance]]\nname = \"t\"\ncommand = []\n"),
            "acceptance[0].command",
            "must name a program",
        ),
        (
            format!("{CMD}[[acceptance]]\nname = \"t\"\ncommand = [\"true\"]\ntimeout = 0\n"),
            "acceptance[0].timeout",
            "more than 0",
        ),
        (
            format!("{CMD}{crit}[verdict]\n"),
            "verdict",
            "declares none",
        ),
        (
            format!("{CMD}outputs = [\"o\"]\n[verdict]\n"),
            "verdict",
            "no criteria",
        ),
    ] {
        let (field, message) = toml_invalid(&text);
        assert_eq!(field, want_field, "{text}");
        assert!(message.contains(want), "{field}: {message}");
    }
    assert!(matches!(
        toml(&format!(
            "{CMD}[[acceptance]]\nname = \"t\"\ncommand = [\"true\"]\nretries = 2\n"
        )),
        Err(SpecError::Parse { .. })
    ));
}

#[test]
fn egress_and_secret_grants_convert_and_are_checked() {
    let spec = toml(&format!(
        "{CMD}network = \"proxy\"\negress = [\"API.GitHub.com\", \"*.example.com:8443\"]\n\
         [[secrets]]\nname = \"gh\"\nhosts = [\"api.github.com\"]\n\
         [[secrets]]\nname = \"git\"\nhosts = [\"a.example.com:8443\"]\nheader = \"X-Token\"\n\
         scheme = \"basic\"\nusername = \"x-access-token\"\n"
    ))
    .unwrap();
    assert_eq!(spec.network, NetworkPolicy::Proxy);
    assert_eq!(spec.egress, ["api.github.com", "*.example.com:8443"]);
    assert_eq!(spec.secrets[0].header, "Authorization");
    assert_eq!(spec.secrets[0].scheme, SecretScheme::Bearer);
    assert_eq!(
        spec.secrets[1].scheme,
        SecretScheme::Basic {
            username: "x-access-token".into()
        }
    );
    let grant = "[[secrets]]\nname = \"gh\"\nhosts = [\"api.github.com\"]\n";
    for (text, field, needle) in [
        (
            format!("{CMD}network = \"proxy\"\nisolation = \"process\"\n"),
            "network",
            "sandbox",
        ),
        (format!("{CMD}egress = [\"a.example\"]\n"), "egress", "proxy"),
        (format!("{CMD}{grant}"), "secrets", "proxy"),
        (
            format!("{CMD}network = \"proxy\"\negress = [\"https://a.example\"]\n"),
            "egress[0]",
            "URL",
        ),
        (
            format!("{CMD}network = \"proxy\"\negress = [\"other.example\"]\n{grant}"),
            "secrets[0].hosts[0]",
            "not covered by egress",
        ),
        (
            format!(
                "{CMD}network = \"proxy\"\negress = [\"api.github.com\"]\n{grant}scheme = \"basic\"\n"
            ),
            "secrets[0].username",
            "needed",
        ),
        (
            format!(
                "{CMD}network = \"proxy\"\negress = [\"api.github.com\"]\n{grant}username = \"u\"\n"
            ),
            "secrets[0].username",
            "only with",
        ),
        (
            format!(
                "{CMD}network = \"proxy\"\negress = [\"api.github.com\"]\n{grant}header = \"Bad Header\"\n"
            ),
            "secrets[0].header",
            "not an HTTP header",
        ),
        (
            format!(
                "{CMD}network = \"proxy\"\negress = [\"api.github.com\"]\n[[secrets]]\nname = \"a b\"\nhosts = [\"api.github.com\"]\n"
            ),
            "secrets[0].name",
            "not a valid secret name",
        ),
    ] {
        let (f, message) = toml_invalid(&text);
        assert_eq!(f, field, "{text}: {message}");
        assert!(message.contains(needle), "{text}: {message}");
    }
}
