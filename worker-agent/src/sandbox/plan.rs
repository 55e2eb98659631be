//! Turning an [`AttemptSpec`] into the C data the forked side needs (`child::ChildPlan`):
//! the task's environment, the program search, the hostname and the /tmp rebinding. Pure
//! functions, tested without root.
//!
//! Environment policy: the task sees exactly the variables its spec declares plus
//! `DROVER_TASK_ID`, `DROVER_ATTEMPT`, `DROVER_EVENTS_FD` and `DROVER_WORKSPACE` (and
//! `DROVER_CHECKPOINT_FILE` when the attempt resumes from a checkpoint) — nothing of the
//! worker's own environment. The one addition is `PATH`: a spec that does not declare one
//! gets [`DEFAULT_PATH`], so that `sh -c 'ls'` behaves as it does everywhere else instead of
//! depending on the C library's built-in search path. A spec may not declare `DROVER_*` names.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::child::{CArray, EVENTS_FD};
use super::error::SpawnError;
use super::AttemptSpec;

/// `PATH` for a task whose spec declares none.
pub const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";
/// Prefix reserved for the variables drover sets.
pub const RESERVED_PREFIX: &str = "DROVER_";

/// The task's whole environment, sorted by name.
pub(crate) fn environment(
    spec: &AttemptSpec<'_>,
    workspace: &Path,
) -> Result<Vec<(String, String)>, SpawnError> {
    let bad = |name: &str, reason| SpawnError::BadEnv {
        name: name.to_owned(),
        reason,
    };
    let mut env = Vec::with_capacity(spec.env.len() + 5);
    for (name, value) in spec.env {
        if name.is_empty() || name.contains('=') || name.contains('\0') {
            return Err(bad(name, "a name must be non-empty, without `=` or NUL"));
        }
        if name.starts_with(RESERVED_PREFIX) {
            return Err(bad(name, "names starting with DROVER_ are set by drover"));
        }
        if value.contains('\0') {
            return Err(bad(name, "the value contains a NUL byte"));
        }
        env.push((name.clone(), value.clone()));
    }
    if !spec.env.contains_key("PATH") {
        env.push(("PATH".to_owned(), DEFAULT_PATH.to_owned()));
    }
    let workspace = workspace
        .to_str()
        .ok_or_else(|| SpawnError::Workspace {
            path: workspace.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the path is not UTF-8, so it cannot be passed in DROVER_WORKSPACE",
            ),
        })?
        .to_owned();
    env.extend([
        ("DROVER_TASK_ID".to_owned(), spec.task_id.to_owned()),
        ("DROVER_ATTEMPT".to_owned(), spec.attempt.to_string()),
        ("DROVER_EVENTS_FD".to_owned(), EVENTS_FD.to_string()),
        ("DROVER_WORKSPACE".to_owned(), workspace),
    ]);
    if let Some(file) = spec.checkpoint_file {
        let file = file.to_str().ok_or_else(|| SpawnError::Workspace {
            path: file.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the path is not UTF-8, so it cannot be passed in DROVER_CHECKPOINT_FILE",
            ),
        })?;
        env.push(("DROVER_CHECKPOINT_FILE".to_owned(), file.to_owned()));
    }
    env.sort();
    Ok(env)
}

/// `NAME=value` strings for execve.
pub(crate) fn envp(env: &[(String, String)]) -> Result<CArray, SpawnError> {
    env.iter()
        .map(|(k, v)| {
            CString::new(format!("{k}={v}")).map_err(|_| SpawnError::BadEnv {
                name: k.clone(),
                reason: "contains a NUL byte",
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .map(CArray::new)
}

/// argv for execve.
pub(crate) fn argv(args: &[String]) -> Result<CArray, SpawnError> {
    if args.is_empty() || args[0].is_empty() {
        return Err(SpawnError::EmptyCommand);
    }
    args.iter()
        .enumerate()
        .map(|(index, a)| CString::new(a.as_str()).map_err(|_| SpawnError::NulInArgument { index }))
        .collect::<Result<Vec<_>, _>>()
        .map(CArray::new)
}

/// The paths execvp(3) would try for `program` with the task's `PATH`: the program itself if
/// it names a path, else each `PATH` entry joined with it (an empty entry is the workspace).
pub(crate) fn candidates(program: &str, path_var: &str) -> Vec<PathBuf> {
    if program.contains('/') {
        return vec![PathBuf::from(program)];
    }
    path_var
        .split(':')
        .map(|dir| {
            if dir.is_empty() {
                Path::new(".").join(program)
            } else {
                Path::new(dir).join(program)
            }
        })
        .collect()
}

/// `drover-<task>`: lowercase letters, digits and dashes, at most 64 bytes (the kernel's limit).
pub(crate) fn hostname(task: &str) -> Vec<u8> {
    let mut name = String::from("drover-");
    for c in task.chars() {
        if name.len() >= 64 {
            break;
        }
        name.push(if c.is_ascii_alphanumeric() {
            c.to_ascii_lowercase()
        } else {
            '-'
        });
    }
    name.into_bytes()
}

/// When `workspace` (absolute, canonical) is under /tmp, the directories from /tmp down to it,
/// outermost first; else none.
pub(crate) fn tmp_mkdirs(workspace: &Path) -> Vec<PathBuf> {
    let Ok(rest) = workspace.strip_prefix("/tmp") else {
        return Vec::new();
    };
    let mut dir = PathBuf::from("/tmp");
    rest.components()
        .map(|c| {
            dir.push(c);
            dir.clone()
        })
        .collect()
}

/// A path as a C string.
pub(crate) fn c_path(path: &Path) -> Result<CString, std::ffi::NulError> {
    CString::new(path.as_os_str().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_protocol::task::{Isolation, Limits, NetworkPolicy};
    use std::collections::BTreeMap;

    fn spec<'a>(env: &'a BTreeMap<String, String>, limits: &'a Limits) -> AttemptSpec<'a> {
        AttemptSpec {
            task_id: "t1",
            attempt: 2,
            argv: &[],
            env,
            workspace: Path::new("/w"),
            limits,
            network: NetworkPolicy::None,
            isolation: Isolation::Sandbox,
            checkpoint_file: None,
        }
    }

    #[test]
    fn environment_is_declared_plus_drover() {
        let limits = Limits::default();
        let env = BTreeMap::from([("FOO".to_owned(), "bar".to_owned())]);
        let got = environment(&spec(&env, &limits), Path::new("/w")).expect("env");
        let names: Vec<&str> = got.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            names,
            [
                "DROVER_ATTEMPT",
                "DROVER_EVENTS_FD",
                "DROVER_TASK_ID",
                "DROVER_WORKSPACE",
                "FOO",
                "PATH"
            ]
        );
        assert!(got.contains(&("PATH".into(), DEFAULT_PATH.into())));
        assert!(got.contains(&("DROVER_EVENTS_FD".into(), "3".into())));
        assert!(got.contains(&("DROVER_ATTEMPT".into(), "2".into())));
        assert!(
            !got.iter().any(|(k, _)| k == "DROVER_CHECKPOINT_FILE"),
            "only with a checkpoint"
        );
        let mut resumed = spec(&env, &limits);
        resumed.checkpoint_file = Some(Path::new("/w/.drover-checkpoint.json"));
        let got = environment(&resumed, Path::new("/w")).expect("env");
        assert!(got.contains(&(
            "DROVER_CHECKPOINT_FILE".into(),
            "/w/.drover-checkpoint.json".into()
        )));

        let env = BTreeMap::from([("PATH".to_owned(), "/opt/bin".to_owned())]);
        let got = environment(&spec(&env, &limits), Path::new("/w")).expect("env");
        assert!(got.contains(&("PATH".into(), "/opt/bin".into())));
        assert_eq!(got.iter().filter(|(k, _)| k == "PATH").count(), 1);
    }

    #[test]
    fn environment_rejects_reserved_and_malformed() {
        let limits = Limits::default();
        for name in ["DROVER_TASK_ID", "", "A=B", "N\0"] {
            let env = BTreeMap::from([(name.to_owned(), "x".to_owned())]);
            let err = environment(&spec(&env, &limits), Path::new("/w")).expect_err(name);
            assert!(matches!(err, SpawnError::BadEnv { .. }), "{err}");
        }
        let env = BTreeMap::from([("A".to_owned(), "x\0y".to_owned())]);
        assert!(environment(&spec(&env, &limits), Path::new("/w")).is_err());
    }

    #[test]
    fn argv_rules() {
        assert!(matches!(argv(&[]), Err(SpawnError::EmptyCommand)));
        assert!(matches!(
            argv(&[String::new()]),
            Err(SpawnError::EmptyCommand)
        ));
        assert!(matches!(
            argv(&["sh".into(), "a\0".into()]),
            Err(SpawnError::NulInArgument { index: 1 })
        ));
        assert!(argv(&["sh".into()]).is_ok());
    }

    #[test]
    fn program_search() {
        assert_eq!(candidates("./run", "/bin"), [PathBuf::from("./run")]);
        assert_eq!(candidates("/bin/sh", "/x"), [PathBuf::from("/bin/sh")]);
        assert_eq!(
            candidates("sh", "/usr/bin::/bin"),
            [
                PathBuf::from("/usr/bin/sh"),
                PathBuf::from("./sh"),
                PathBuf::from("/bin/sh")
            ]
        );
    }

    #[test]
    fn hostnames() {
        assert_eq!(hostname("Task_1"), b"drover-task-1");
        assert!(hostname(&"x".repeat(200)).len() <= 64);
    }

    #[test]
    fn tmp_rebinding() {
        assert!(tmp_mkdirs(Path::new("/var/lib/w")).is_empty());
        assert!(tmp_mkdirs(Path::new("/tmpx/w")).is_empty());
        assert_eq!(
            tmp_mkdirs(Path::new("/tmp/a/b")),
            [PathBuf::from("/tmp/a"), PathBuf::from("/tmp/a/b")]
        );
    }
}
