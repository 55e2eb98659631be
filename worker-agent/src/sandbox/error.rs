//! The sandbox's errors: [`SandboxError`] at start-up, [`SpawnError`] per attempt, and the
//! [`CgroupError`] both carry. Each names what failed, on which path, and what to do.

use std::io;
use std::path::PathBuf;

use nix::errno::Errno;

/// A cgroup file operation that failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} {path}: {source}")]
pub struct CgroupError {
    /// What was being done, e.g. "set memory.max in".
    pub action: std::borrow::Cow<'static, str>,
    /// The cgroup directory or control file.
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

/// Why no sandbox can be offered on this host ([`super::Sandbox::detect`]).
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(
        "no usable cgroup hierarchy: neither cgroup2 with the memory controller at \
         /sys/fs/cgroup nor a cgroup v1 memory hierarchy is mounted (see /proc/self/mountinfo); \
         boot with the unified hierarchy (the default on current Debian/Ubuntu) or mount the v1 \
         memory controller"
    )]
    NoCgroups,
    #[error("cannot {action} {path}: {source}")]
    Proc {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} does not say which `{controller}` cgroup this process is in")]
    OwnCgroup {
        controller: &'static str,
        path: PathBuf,
    },
    #[error(
        "this process's `{controller}` cgroup {path} does not exist (is the hierarchy mounted \
         from inside a cgroup namespace?); give the sandbox an explicit cgroup root"
    )]
    OwnCgroupMissing {
        controller: &'static str,
        path: PathBuf,
    },
    #[error(
        "cannot create attempt cgroups: {source}; run the worker as root, or under systemd \
         with Delegate=yes, or point it at a cgroup it owns"
    )]
    CannotCreate {
        #[source]
        source: CgroupError,
    },
    #[error(
        "the `{controller}` controller is not available in {path} (it offers: `{available}`); \
         enable it in the parent's cgroup.subtree_control, or run the worker under systemd with \
         Delegate=yes"
    )]
    ControllerMissing {
        controller: &'static str,
        path: PathBuf,
        available: String,
    },
    #[error(
        "cgroup {path} holds processes {pids:?}, so cgroup v2 will not let it hand controllers \
         to attempt cgroups; move them to a leaf cgroup or choose another cgroup root"
    )]
    BaseHasProcesses { path: PathBuf, pids: Vec<i32> },
    #[error("cannot start the sandbox's spawner process (fork, socketpair): {source}")]
    Spawner {
        #[source]
        source: io::Error,
    },
}

/// Why an attempt could not be started ([`super::Sandbox::spawn`]). Nothing of the attempt is
/// left running when this is returned.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("the command is empty: a task needs at least a program name")]
    EmptyCommand,
    #[error("argument {index} of the command contains a NUL byte")]
    NulInArgument { index: usize },
    #[error("environment variable {name:?} is not allowed: {reason}")]
    BadEnv { name: String, reason: &'static str },
    #[error(
        "isolation `sandbox` needs namespaces, which this host does not let the worker create; \
         run the worker as root (or allow unprivileged user namespaces), or use isolation \
         `process` for trusted work"
    )]
    NamespacesUnavailable,
    #[error("workspace {path}: {source}")]
    Workspace {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot set up the attempt's cgroup: {0}")]
    Cgroup(#[from] CgroupError),
    #[error("cannot create the {what} pipe: {source}")]
    Pipe {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the attempt's process: {0}")]
    Fork(#[source] io::Error),
    #[error("the coordinator never confirmed the attempt; nothing of it was started")]
    Unconfirmed,
    #[error("sandbox setup failed: cannot {step}: {errno}")]
    Setup { step: String, errno: Errno },
    #[error(
        "cannot run {program:?}: {errno} (looked in: {searched}); check the command and the \
         task's PATH"
    )]
    Exec {
        program: String,
        errno: Errno,
        searched: String,
    },
    #[error(
        "network `proxy` needs isolation `sandbox` (a process-isolated task shares the \
         worker's network, so nothing would hold it to the proxy)"
    )]
    ProxyNeedsSandbox,
    #[error("network `proxy`: {0}")]
    Proxy(String),
}
