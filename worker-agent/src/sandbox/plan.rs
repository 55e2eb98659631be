//! Turning an [`AttemptSpec`] into the C data the forked side needs (`child::ChildPlan`):
//! the task's environment, the program search, the hostname and the mount plan (what is
//! hidden, what is bound back). Pure functions, tested without root, except [`found`], which
//! looks a path up on the host.
//!
//! Mount policy (sandbox isolation; see the `child` module for how it is applied): the host's
//! tree is read-only for the task; an empty tmpfs covers /run (sockets of systemd, D-Bus, a
//! container runtime: a root task could otherwise ask them to run anything), the writable
//! private /tmp covers /tmp, and every private path of the worker is covered — a directory by
//! an empty read-only tmpfs, a file by the null device — unless it is one of [`SHARED_DIRS`]
//! (then only the private files in it are covered). The workspace is bound back, writable, at
//! its own path (recreated inside whatever covers it), and so is the target of
//! /etc/resolv.conf (read-only) when it lives under a cover and the task has the host's
//! network.
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
use std::sync::atomic::{AtomicBool, Ordering};

use super::child::{CArray, MaskKind, EVENTS_FD, MAX_REBINDS};
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
    if let Some(egress) = spec.egress {
        // The task's own declaration of one of them wins (it may want another proxy chain).
        for (name, value) in egress.env() {
            if !spec.env.contains_key(name) {
                env.push((name.clone(), value.clone()));
            }
        }
    }
    for (name, value) in spec.extra_env {
        if !name.starts_with(RESERVED_PREFIX) || value.contains('\0') {
            return Err(bad(
                name,
                "drover's own variables start with DROVER_, without NUL",
            ));
        }
        env.push((name.clone(), value.clone()));
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

/// Directories that hold the whole system or are shared by everyone: never covered whole, so
/// a private file in one of them (say a key in /etc) is covered alone.
pub const SHARED_DIRS: [&str; 29] = [
    "/",
    "/bin",
    "/boot",
    "/etc",
    "/home",
    "/lib",
    "/lib32",
    "/lib64",
    "/media",
    "/mnt",
    "/opt",
    "/root",
    "/run",
    "/sbin",
    "/srv",
    "/tmp",
    "/usr",
    "/usr/bin",
    "/usr/lib",
    "/usr/local",
    "/usr/local/bin",
    "/usr/local/lib",
    "/usr/share",
    "/var",
    "/var/cache",
    "/var/lib",
    "/var/log",
    "/var/tmp",
    "/etc/ssl",
];

/// Hidden from every sandboxed task when they exist, whatever the worker's own config says:
/// drover's default config, TLS and state directories (worker and coordinator), and the host's
/// own secrets that a root task could otherwise read (password hashes, SSH host keys, TLS
/// private keys).
pub const WELL_KNOWN_PRIVATE: [&str; 7] = [
    "/etc/drover",
    "/var/lib/drover",
    "/var/lib/drover-worker",
    "/etc/shadow",
    "/etc/gshadow",
    "/etc/ssh",
    "/etc/ssl/private",
];

/// `path` as the host has it now: its canonical form and whether it is a directory, or why it
/// has none (nothing there, say). Every sandboxed attempt looks up each private path again (one
/// made since the last attempt must be hidden too), so the common case is cheap: an absolute,
/// normal path with no symbolic link on the way is its own canonical form, which one `openat2`
/// with `RESOLVE_NO_SYMLINKS` proves, with an `fstat` and a close — where `canonicalize` takes
/// a `readlink` per component and a `stat` (some 70 system calls an attempt for the worker's
/// private paths, measured). Any other path, one with a link on the way (`ELOOP`), or a kernel
/// without `openat2` (before 5.6, or a seccomp filter that refuses it: then never tried again)
/// takes `canonicalize`.
pub(crate) fn found(path: &Path) -> std::io::Result<(PathBuf, bool)> {
    use nix::errno::Errno;
    use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
    use std::path::Component;
    // Normal: absolute, no `.` or `..`, no doubled or trailing `/` (compared as bytes: `Path`
    // equality ignores them).
    let normal = path.is_absolute()
        && path
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
        && path.components().collect::<PathBuf>().as_os_str() == path.as_os_str();
    if normal && !OPENAT2_REFUSED.load(Ordering::Relaxed) {
        let how = OpenHow::new()
            .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS);
        match openat2(nix::libc::AT_FDCWD, path, how) {
            Ok(fd) => {
                let stat = nix::sys::stat::fstat(fd);
                let _ = nix::unistd::close(fd);
                if let Ok(stat) = stat {
                    let dir = stat.st_mode & nix::libc::S_IFMT == nix::libc::S_IFDIR;
                    return Ok((path.to_path_buf(), dir));
                }
            }
            // As `canonicalize` would fail.
            Err(e @ (Errno::ENOENT | Errno::ENOTDIR)) => return Err(e.into()),
            Err(Errno::ENOSYS | Errno::EPERM) => OPENAT2_REFUSED.store(true, Ordering::Relaxed),
            Err(_) => {}
        }
    }
    let canonical = path.canonicalize()?;
    let dir = canonical.is_dir();
    Ok((canonical, dir))
}

/// Set once `openat2` failed with `ENOSYS` or `EPERM`: this kernel lacks it or a seccomp
/// filter refuses it, and [`found`] stops trying it first.
static OPENAT2_REFUSED: AtomicBool = AtomicBool::new(false);

/// A private path as found on the host (canonical).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Private {
    pub(crate) path: PathBuf,
    pub(crate) dir: bool,
}

/// What covers a path ([`child::MaskKind`] with host paths).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MaskPlan {
    pub(crate) path: PathBuf,
    pub(crate) kind: MaskKind,
    /// Created inside the cover, outermost first: (path, is a directory).
    pub(crate) creates: Vec<(PathBuf, bool)>,
}

/// The mounts of one attempt: covers, then what is bound back (the workspace first, writable).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MountPlan {
    pub(crate) masks: Vec<MaskPlan>,
    pub(crate) rebinds: Vec<(PathBuf, bool)>,
}

/// Replaced by the sandbox's own mounts; nothing under them needs a cover.
const OWN_MOUNTS: [&str; 3] = ["/proc", "/sys", "/dev"];

/// The mount plan for `workspace` (canonical) with `private` paths to hide and `keep` files
/// (canonical) to bind back read-only if something covers them.
pub(crate) fn mount_plan(private: &[Private], workspace: &Path, keep: &[PathBuf]) -> MountPlan {
    let mut candidates = vec![
        (PathBuf::from("/tmp"), MaskKind::Scratch),
        (PathBuf::from("/run"), MaskKind::Empty),
    ];
    for p in private {
        let shared = SHARED_DIRS.iter().any(|d| p.path == Path::new(d));
        if !p.path.is_absolute()
            || OWN_MOUNTS.iter().any(|m| p.path.starts_with(m))
            || p.path.starts_with(workspace)
            || (p.dir && shared)
        {
            continue;
        }
        let kind = if p.dir {
            MaskKind::Empty
        } else {
            MaskKind::File
        };
        candidates.push((p.path.clone(), kind));
    }
    // Path order is component order: a directory comes before everything under it.
    candidates.sort_by(|a, b| a.0.cmp(&b.0));
    let mut masks: Vec<MaskPlan> = Vec::new();
    for (path, kind) in candidates {
        let covered = masks
            .iter()
            .any(|m| m.kind != MaskKind::File && path.starts_with(&m.path));
        if !covered {
            masks.push(MaskPlan {
                path,
                kind,
                creates: Vec::new(),
            });
        }
    }
    let mut rebinds = vec![(workspace.to_path_buf(), true)];
    for file in keep {
        if rebinds.len() < MAX_REBINDS
            && masks
                .iter()
                .any(|m| m.kind != MaskKind::File && file.starts_with(&m.path))
        {
            rebinds.push((file.clone(), false));
        }
    }
    for (target, _) in &rebinds {
        let is_dir = target == workspace;
        let Some(mask) = masks
            .iter_mut()
            .find(|m| m.kind != MaskKind::File && target.starts_with(&m.path) && *target != m.path)
        else {
            continue;
        };
        let Ok(rest) = target.strip_prefix(&mask.path) else {
            continue;
        };
        let mut dir = mask.path.clone();
        let count = rest.components().count();
        for (i, c) in rest.components().enumerate() {
            dir.push(c);
            let entry = (dir.clone(), i + 1 < count || is_dir);
            if !mask.creates.contains(&entry) {
                mask.creates.push(entry);
            }
        }
    }
    MountPlan { masks, rebinds }
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
            extra_env: &[],
            egress: None,
            confirmation: None,
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
    fn extra_drover_variables_are_added_and_only_drover_ones() {
        let limits = Limits::default();
        let env = BTreeMap::new();
        let extra = [
            ("DROVER_ITERATION".to_owned(), "2".to_owned()),
            (
                "DROVER_FEEDBACK_FILE".to_owned(),
                "/w/.drover-feedback.json".to_owned(),
            ),
        ];
        let mut looped = spec(&env, &limits);
        looped.extra_env = &extra;
        let got = environment(&looped, Path::new("/w")).expect("env");
        assert!(got.contains(&("DROVER_ITERATION".into(), "2".into())));
        assert!(got.contains(&(
            "DROVER_FEEDBACK_FILE".into(),
            "/w/.drover-feedback.json".into()
        )));
        let bad = [("HOME".to_owned(), "/root".to_owned())];
        looped.extra_env = &bad;
        let err = environment(&looped, Path::new("/w")).expect_err("not a DROVER_ name");
        assert!(matches!(err, SpawnError::BadEnv { .. }), "{err}");
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

    fn dir(p: &str) -> Private {
        Private {
            path: p.into(),
            dir: true,
        }
    }

    fn file(p: &str) -> Private {
        Private {
            path: p.into(),
            dir: false,
        }
    }

    fn mask(path: &str, kind: MaskKind, creates: &[(&str, bool)]) -> MaskPlan {
        MaskPlan {
            path: path.into(),
            kind,
            creates: creates
                .iter()
                .map(|(p, d)| (PathBuf::from(p), *d))
                .collect(),
        }
    }

    #[test]
    fn workspace_under_tmp_is_recreated_in_the_new_tmp() {
        let plan = mount_plan(&[], Path::new("/tmp/a/b"), &[]);
        assert_eq!(
            plan.masks,
            [
                mask("/run", MaskKind::Empty, &[]),
                mask(
                    "/tmp",
                    MaskKind::Scratch,
                    &[("/tmp/a", true), ("/tmp/a/b", true)]
                ),
            ]
        );
        assert_eq!(plan.rebinds, [(PathBuf::from("/tmp/a/b"), true)]);
        // Not under /tmp: bound onto itself, nothing created.
        let plan = mount_plan(&[], Path::new("/tmpx/w"), &[]);
        assert!(plan.masks.iter().all(|m| m.creates.is_empty()));
    }

    #[test]
    fn private_paths_are_covered_outermost_only() {
        let private = [
            dir("/srv/drover"),
            file("/srv/drover/tls/worker.key"),
            dir("/srv/drover/work"),
            file("/etc/worker.key"),
            dir("/etc"),
            dir("/var/lib/drover"),
            dir("/proc/1"),
            file("/tmp/x.key"),
            dir("/srv/drover/work/tasks/t-1/inner"),
        ];
        let plan = mount_plan(&private, Path::new("/srv/drover/work/tasks/t-1"), &[]);
        assert_eq!(
            plan.masks,
            [
                mask("/etc/worker.key", MaskKind::File, &[]),
                mask("/run", MaskKind::Empty, &[]),
                mask(
                    "/srv/drover",
                    MaskKind::Empty,
                    &[
                        ("/srv/drover/work", true),
                        ("/srv/drover/work/tasks", true),
                        ("/srv/drover/work/tasks/t-1", true)
                    ]
                ),
                mask("/tmp", MaskKind::Scratch, &[]),
                mask("/var/lib/drover", MaskKind::Empty, &[]),
            ]
        );
    }

    #[test]
    fn kept_files_are_bound_back_only_when_covered() {
        let keep = [
            PathBuf::from("/run/systemd/resolve/stub-resolv.conf"),
            PathBuf::from("/etc/hosts"),
        ];
        let plan = mount_plan(&[], Path::new("/w"), &keep);
        assert_eq!(
            plan.rebinds,
            [
                (PathBuf::from("/w"), true),
                (
                    PathBuf::from("/run/systemd/resolve/stub-resolv.conf"),
                    false
                )
            ]
        );
        assert_eq!(
            plan.masks[0],
            mask(
                "/run",
                MaskKind::Empty,
                &[
                    ("/run/systemd", true),
                    ("/run/systemd/resolve", true),
                    ("/run/systemd/resolve/stub-resolv.conf", false)
                ]
            )
        );
    }

    /// `found` gives what `canonicalize` and `is_dir` give, for every kind of path: the
    /// quick way only where the path is its own canonical form.
    #[test]
    fn found_paths_are_canonical() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().canonicalize().expect("canonical tempdir");
        let real = root.join("real");
        std::fs::create_dir(&real).expect("mkdir");
        std::fs::write(real.join("file"), b"x").expect("file");
        std::os::unix::fs::symlink(&real, root.join("link")).expect("symlink");
        std::os::unix::fs::symlink(real.join("file"), root.join("file-link")).expect("symlink");
        // Where the kernel has `openat2` the quick way is what is tested here.
        let quick = nix::fcntl::openat2(
            nix::libc::AT_FDCWD,
            &root,
            nix::fcntl::OpenHow::new().flags(nix::fcntl::OFlag::O_PATH),
        )
        .map(nix::unistd::close)
        .is_ok();
        if !quick {
            eprintln!("*** no openat2 here: only found's fallback (canonicalize) is tested ***");
        }
        let expected = |p: &Path| {
            let c = p.canonicalize().expect("canonicalize");
            let dir = c.is_dir();
            (c, dir)
        };
        for p in [
            real.clone(),
            real.join("file"),
            // A link on the way, and as the last component.
            root.join("link/file"),
            root.join("link"),
            root.join("file-link"),
            // Not normal.
            root.join("real/./file"),
            root.join("real/../real/file"),
            PathBuf::from(format!("{}//real/file", root.display())),
            PathBuf::from(format!("{}/real/", root.display())),
            PathBuf::from("/"),
        ] {
            let (path, dir) = found(&p).expect("found");
            let (want, want_dir) = expected(&p);
            // As bytes: `Path` equality ignores doubled and trailing separators.
            assert_eq!(
                (path.as_os_str(), dir),
                (want.as_os_str(), want_dir),
                "{}",
                p.display()
            );
        }
        assert_eq!(
            found(&root.join("link/file")).expect("found").0,
            real.join("file")
        );
        for p in [
            root.join("missing"),
            root.join("link/missing"),
            root.join("real/file/below"),
            PathBuf::from(format!("{}/real/file/", root.display())),
        ] {
            let err = found(&p).expect_err(&p.display().to_string());
            assert!(p.canonicalize().is_err(), "{}: {err}", p.display());
        }
        assert_eq!(
            found(&root.join("missing")).expect_err("missing").kind(),
            std::io::ErrorKind::NotFound
        );
    }
}
