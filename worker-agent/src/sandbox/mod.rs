//! The worker's sandbox: runs one task attempt isolated and limited, and tells how it ended.
//!
//! [`Sandbox::detect`] runs once at start-up: it finds a cgroup hierarchy the worker can create
//! children in (v2, or the v1 fallback of hybrid hosts — see the `cgroup` module) and whether
//! namespaces can be created, and starts the spawner, the small process that forks every
//! attempt for the worker (see the `spawner` module for why). [`Sandbox::spawn`] then starts an
//! attempt and returns an [`Attempt`], whose [`Attempt::wait`] enforces the wall-time limit,
//! honours cancellation and classifies the end. The attempt's first process is the worker's
//! child either way (the spawner forks with `CLONE_PARENT`; where that is refused, as under
//! qemu-user emulation, the worker forks itself).
//!
//! Per attempt, with `isolation = sandbox`:
//! - new pid, mount, uts, ipc and cgroup namespaces, and a network namespace with only `lo` for
//!   `network = none` — or, for `network = proxy`, with only `lo` and on it the listening
//!   socket of the worker's egress proxy (see [`crate::egress`]); a user namespace only when the worker is not root (root needs none to
//!   create the others, and a one-to-one map of root would add nothing);
//! - the host's file systems read-only, nosuid and nodev; a fresh /proc for the new pid
//!   namespace, a read-only /sys (so /sys/class/net shows the sandbox's interfaces), a minimal
//!   /dev, a private tmpfs on /tmp, an empty /run; the worker's private paths (its config, TLS
//!   files, work directory, [`plan::WELL_KNOWN_PRIVATE`]) covered by empty mounts; the
//!   workspace bound back writable — so the task writes only to its workspace, /tmp and
//!   /dev/shm, and sees no other attempt's workspace (see [`plan`] for the policy);
//!   hostname `drover-<task>`;
//! - the task runs as pid 2 under a small init (pid 1) that reaps orphans: see the `child`
//!   module for why, and for how the helpers are built without re-executing the worker;
//! - the task's capabilities are cut to Docker's default set (no CAP_SYS_ADMIN, CAP_SYS_PTRACE,
//!   CAP_NET_ADMIN, ...), so a root task cannot undo its mounts or read the init's memory;
//! - with `isolation = process` the task is a plain child in its own process group: trusted
//!   work, none of the above (it sees and can write whatever the worker can).
//!
//! Both: the attempt's own cgroup (memory limit without swap, pids limit), `no_new_privs`,
//! stdin from /dev/null, stdout and stderr piped to the worker, an events pipe as fd 3, the
//! environment of [`plan`]'s policy, cwd = the workspace.
//!
//! Invariants:
//! - every process of an attempt is in its cgroup from before its first instruction of task
//!   code, so killing the cgroup kills the whole tree (daemonized grandchildren included);
//! - when [`Attempt::wait`] returns, nothing of the attempt runs any more — whether the main
//!   process exited, or it was cancelled or timed out — and its cgroup is gone (or, if the
//!   kernel could not empty it, kept on a leftover list that every later spawn retries);
//! - OOM is read from the cgroup's counter, never guessed from a SIGKILL.

mod attempt;
pub(crate) mod cgroup;
mod child;
mod error;
mod netns;
pub mod plan;
mod process;
mod spawner;
pub mod standby;
#[cfg(test)]
mod tests;
mod warm;

use std::collections::BTreeMap;
use std::fmt;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use drover_protocol::task::{Isolation, Limits, NetworkPolicy};
use drover_protocol::CgroupVersion;
use nix::fcntl::OFlag;
use nix::libc;
use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tracing::{debug, warn};

pub use attempt::{Attempt, AttemptOutcome};
pub use error::{CgroupError, SandboxError, SpawnError};

use cgroup::{attempt_name, AttemptCgroup, Hierarchy};
use child::{ChildPlan, Mask, Rebind, Record, SandboxSetup, SysMount};

/// Helper processes an attempt with `isolation = sandbox` keeps in its cgroup besides the task
/// (the outer helper and the init); added to the pids limit so the task gets what it asked for.
pub const SANDBOX_HELPER_PIDS: u32 = 2;

/// Warm cgroups kept ready on cgroup v1 hosts (one idle spawner thread and one empty cgroup
/// each). Each takes a grace period (milliseconds) to get ready, so this bounds how many
/// attempts a second start warm: 2 kept up with about 100/s here, 8 with the 500/s of a no-op
/// flood (docs/benchmarks.md); more start cold.
const WARM_CGROUPS: usize = 8;

/// What to run for one attempt.
#[derive(Debug, Clone, Copy)]
pub struct AttemptSpec<'a> {
    /// The task's id (also in `DROVER_TASK_ID`, the hostname and the cgroup's name).
    pub task_id: &'a str,
    /// The attempt's number (`DROVER_ATTEMPT`).
    pub attempt: u32,
    /// The command; `argv[0]` is searched on the task's `PATH` as execvp(3) would.
    pub argv: &'a [String],
    /// The declared environment; see [`plan`] for what the task sees in all.
    pub env: &'a BTreeMap<String, String>,
    /// An existing directory (the caller makes and fills it); the task's cwd.
    pub workspace: &'a Path,
    /// Limits, already resolved by the caller (e.g. a memory limit defaulted from the
    /// requirements). `memory_bytes`/`pids`/`wall_time_ms` of `None` mean no limit.
    pub limits: &'a Limits,
    /// `none`: a network namespace with only `lo` (sandbox isolation only).
    pub network: NetworkPolicy,
    /// `sandbox`: namespaces as described above; `process`: a plain child, for trusted work.
    pub isolation: Isolation,
    /// The file holding the checkpoint this attempt resumes from (`DROVER_CHECKPOINT_FILE`),
    /// already written by the caller; `None` when there is none.
    pub checkpoint_file: Option<&'a Path>,
    /// More `DROVER_*` variables set by the caller (`DROVER_ITERATION`,
    /// `DROVER_FEEDBACK_FILE` under acceptance criteria); names must start with `DROVER_`.
    pub extra_env: &'a [(String, String)],
    /// `network = proxy`: the attempt's egress proxy, which serves the sandbox's socket and
    /// whose variables ([`crate::egress::Egress::env`]) the task gets.
    pub egress: Option<&'a crate::egress::Egress>,
    /// A prepared attempt's confirmation, which its task must not run before. In a sandbox
    /// the whole sandbox is built meanwhile and only the task's exec waits; with `process`
    /// isolation the spawn waits before anything is forked. Dropped unconfirmed, the spawn
    /// ends with [`SpawnError::Unconfirmed`]. `None`: no wait.
    pub confirmation: Option<&'a crate::stream::Confirmation>,
}

/// The worker's sandbox facility; cheap to clone (one shared state).
#[derive(Debug, Clone)]
pub struct Sandbox {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    hierarchy: Hierarchy,
    namespaces: bool,
    user_namespace: bool,
    /// The worker's private paths, hidden from sandboxed tasks (besides the well-known ones).
    private: Vec<PathBuf>,
    /// Files bound back read-only when a cover hides them (tests add to it).
    keep: Vec<PathBuf>,
    next_seq: AtomicU64,
    /// Set once the spawner could not fork for the worker (`clone(CLONE_PARENT)` refused, as
    /// under qemu-user emulation): attempts are then forked by the worker itself, cold.
    fork_here: std::sync::atomic::AtomicBool,
    /// Attempts started, and how many of them in a warm cgroup.
    started: AtomicU64,
    started_warm: AtomicU64,
    /// Cgroups that could not be removed yet (retried on each spawn).
    leftovers: Mutex<Vec<AttemptCgroup>>,
    /// Forks every attempt's first process, in the attempt's cgroup (warm ones on v1; see the
    /// `spawner` and `warm` modules).
    spawner: spawner::Spawner,
}

impl Sandbox {
    /// Probes the host once (a few milliseconds: creates and removes a probe cgroup, forks a
    /// namespace probe) and removes attempt cgroups that dead workers left behind.
    ///
    /// `root_hint`: a cgroup path such as `/drover` to create attempt cgroups under instead of
    /// the detected place (see the `cgroup` module); v2 takes it under /sys/fs/cgroup, v1 under
    /// each controller's mount. Fails, naming what is missing, when no cgroup hierarchy is usable;
    /// missing namespace support is not an error (see [`Sandbox::namespaces`]).
    pub fn detect(root_hint: Option<&Path>) -> Result<Sandbox, SandboxError> {
        Sandbox::detect_hiding(root_hint, Vec::new())
    }

    /// [`Sandbox::detect`], hiding `private` paths (files or directories; see
    /// [`private_paths`]) from every sandboxed task besides [`plan::WELL_KNOWN_PRIVATE`].
    pub fn detect_hiding(
        root_hint: Option<&Path>,
        private: Vec<PathBuf>,
    ) -> Result<Sandbox, SandboxError> {
        for shared in private.iter().filter(|p| {
            p.is_dir()
                && plan::SHARED_DIRS
                    .iter()
                    .any(|d| p.canonicalize().ok().as_deref() == Some(Path::new(d)))
        }) {
            warn!(
                path = %shared.display(),
                "a shared system directory holds the worker's files: sandboxed tasks still see \
                 it (only the worker's own files in it are hidden); give the worker a directory \
                 of its own (work_dir, config and TLS files)"
            );
        }
        let hierarchy = Hierarchy::detect(root_hint)?;
        let namespaces = crate::resources::host::can_create_namespaces();
        let user_namespace = !nix::unistd::geteuid().is_root();
        let sandbox = Sandbox::build(hierarchy, namespaces, user_namespace, private, true)
            .map_err(|source| SandboxError::Spawner { source })?;
        for stale in sandbox.inner.hierarchy.stale() {
            warn!(
                cgroup = ?stale.dirs(),
                "removing an attempt cgroup left by a worker that is gone"
            );
            stale.kill_now();
            sandbox.inner.keep_or_remove(stale, false);
        }
        if !namespaces {
            warn!("namespaces are unavailable: only isolation `process` can run here");
        }
        Ok(sandbox)
    }

    #[cfg(test)]
    pub(crate) fn with_parts(
        hierarchy: Hierarchy,
        namespaces: bool,
        user_namespace: bool,
    ) -> Sandbox {
        Sandbox::build(hierarchy, namespaces, user_namespace, Vec::new(), true)
            .expect("start a spawner")
    }

    fn build(
        hierarchy: Hierarchy,
        namespaces: bool,
        user_namespace: bool,
        private: Vec<PathBuf>,
        warm: bool,
    ) -> std::io::Result<Sandbox> {
        let options = spawner::Options {
            warm,
            netns: namespaces && !user_namespace,
        };
        let spawner = spawner::Spawner::start(hierarchy.clone(), options)?;
        Ok(Sandbox {
            inner: Arc::new(Inner {
                hierarchy,
                namespaces,
                user_namespace,
                private,
                keep: Vec::new(),
                next_seq: AtomicU64::new(1),
                fork_here: std::sync::atomic::AtomicBool::new(false),
                started: AtomicU64::new(0),
                started_warm: AtomicU64::new(0),
                leftovers: Mutex::new(Vec::new()),
                spawner,
            }),
        })
    }

    /// Attempts started so far, and how many of them were born in a warm cgroup (the rest
    /// moved into theirs, waiting for the kernel; see the `warm` module).
    pub fn started(&self) -> (u64, u64) {
        (
            self.inner.started.load(Ordering::Relaxed),
            self.inner.started_warm.load(Ordering::Relaxed),
        )
    }

    /// The cgroup version in use (for the resource report).
    pub fn cgroup_version(&self) -> CgroupVersion {
        self.inner.hierarchy.version()
    }

    /// Whether `isolation = sandbox` is possible here.
    pub fn namespaces(&self) -> bool {
        self.inner.namespaces
    }

    /// Whether a pids limit is enforced (v1 hosts may lack the pids hierarchy).
    pub fn pids_limit_available(&self) -> bool {
        self.inner.hierarchy.has_pids()
    }

    /// Where attempt cgroups are created (one directory per v1 controller).
    pub fn cgroup_bases(&self) -> Vec<PathBuf> {
        self.inner
            .hierarchy
            .bases()
            .into_iter()
            .map(Path::to_path_buf)
            .collect()
    }

    /// Starts an attempt. Returns once the task has exec'd (or with the step that failed, after
    /// cleaning up). The caller must read the attempt's stdout, stderr and events, or the task
    /// blocks when a pipe is full (that is the back-pressure).
    pub async fn spawn(&self, spec: AttemptSpec<'_>) -> Result<Attempt, SpawnError> {
        self.inner.retry_leftovers();
        let sandboxed = spec.isolation == Isolation::Sandbox;
        if sandboxed && !self.inner.namespaces {
            return Err(SpawnError::NamespacesUnavailable);
        }
        let proxied = spec.network == NetworkPolicy::Proxy;
        if proxied && !sandboxed {
            return Err(SpawnError::ProxyNeedsSandbox);
        }
        if proxied && spec.egress.is_none() {
            return Err(SpawnError::Proxy(
                "no egress proxy was set up for the attempt".into(),
            ));
        }
        let workspace = workspace(spec.workspace)?;
        let env = plan::environment(&spec, &workspace)?;
        let argv = plan::argv(spec.argv)?;
        let envp = plan::envp(&env)?;
        let path_var = env
            .iter()
            .find(|(k, _)| k == "PATH")
            .map_or(plan::DEFAULT_PATH, |(_, v)| v.as_str());
        let candidates = plan::candidates(&spec.argv[0], path_var);

        let pids_limit = spec.limits.pids.map(|p| {
            if sandboxed {
                p.saturating_add(SANDBOX_HELPER_PIDS)
            } else {
                p
            }
        });
        let pids_limit_enforced = pids_limit.is_none() || self.inner.hierarchy.has_pids();
        if !pids_limit_enforced {
            warn!(
                task = spec.task_id,
                "no pids controller: this attempt's pids limit is not enforced"
            );
        }
        let seq = self.inner.next_seq.fetch_add(1, Ordering::Relaxed);
        let name = attempt_name(seq, spec.task_id, spec.attempt);

        let (setup_r, setup_w) = pipe_pair("setup")?;
        let (events_r, events_w) = pipe_pair("events")?;
        let (stdout_r, stdout_w) = pipe_pair("stdout")?;
        let (stderr_r, stderr_w) = pipe_pair("stderr")?;
        let stdin = std::fs::File::open("/dev/null").map_err(|source| SpawnError::Pipe {
            what: "stdin (/dev/null)",
            source,
        })?;
        let status = if sandboxed {
            Some(pipe_pair("status")?)
        } else {
            None
        };
        let proxy_chan = if proxied {
            Some(proxy_socket_pair()?)
        } else {
            None
        };
        // A prepared attempt: in a sandbox, the whole set-up runs while the confirm is on its
        // way, and only the task's exec waits for it (a byte on this pipe). A process-isolated
        // task is vforked by the spawner, which must not wait on the coordinator: its spawn
        // waits below, before the spawner is asked.
        let confirm_pipe = match spec.confirmation {
            Some(c @ crate::stream::Confirmation::Pending(_)) if sandboxed => {
                Some((c, pipe_pair("confirm")?))
            }
            _ => None,
        };
        let c = |p: &Path| {
            plan::c_path(p).map_err(|_| SpawnError::Workspace {
                path: p.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in a path"),
            })
        };
        let fds = spawner::FdSet {
            stdio: [
                stdin.as_raw_fd(),
                stdout_w.as_raw_fd(),
                stderr_w.as_raw_fd(),
            ],
            setup: setup_w.as_raw_fd(),
            events: events_w.as_raw_fd(),
            status: status.as_ref().map(|(_, w)| w.as_raw_fd()),
            proxy: proxy_chan.as_ref().map(|(_, theirs)| theirs.as_raw_fd()),
            confirm: confirm_pipe.as_ref().map(|(_, (r, _))| r.as_raw_fd()),
        };
        // The spawner fills in the cgroup part: which cgroup is known only there (a warm one,
        // born with a thread inside, or a new one the process joins itself).
        let child_plan = ChildPlan {
            cgroup_procs: Vec::new(),
            workspace: c(&workspace)?,
            candidates: candidates.iter().map(|p| c(p)).collect::<Result<_, _>>()?,
            argv,
            envp,
            stdio: fds.stdio,
            setup_fd: fds.setup,
            events_fd: fds.events,
            status_fd: fds.status,
            proxy_fd: fds.proxy,
            pids_once_alone: None,
            confirm_fd: fds.confirm,
            sandbox: sandboxed
                .then(|| self.sandbox_setup(&spec, &workspace))
                .transpose()?,
            // Made where the outer helper is forked (the spawner, or `fork_here`).
            stacks: None,
            // The spawner sets it on what it receives.
            from_spawner: false,
        };
        let mask_paths_and_rebinds = child_plan.sandbox.as_ref().map_or_else(
            || (Vec::new(), Vec::new()),
            |s| {
                let path = |c: &std::ffi::CStr| PathBuf::from(c.to_string_lossy().into_owned());
                (
                    s.masks.iter().map(|m| path(&m.path)).collect::<Vec<_>>(),
                    s.rebinds.iter().map(|r| path(&r.path)).collect::<Vec<_>>(),
                )
            },
        );
        let request = spawner::Request::Spawn(Box::new(spawner::SpawnRequest {
            name,
            memory_bytes: spec.limits.memory_bytes,
            pids: pids_limit,
            plan: child_plan,
        }));
        if let (Some(confirmation), None) = (spec.confirmation, &confirm_pipe) {
            if !confirmation.wait().await {
                return Err(SpawnError::Unconfirmed);
            }
        }
        let reply = if self.inner.fork_here.load(Ordering::Relaxed) {
            None
        } else {
            Some(
                self.inner
                    .spawner
                    .call(&request, &fds.list())
                    .await
                    .map_err(SpawnError::Fork)?,
            )
        };
        let (pid, name, warm) = match reply {
            Some(spawner::Reply::Spawned {
                pid,
                cgroup,
                warm,
                notes,
                reap,
            }) => {
                log_notes(notes);
                reap_let_go(reap);
                self.inner.started.fetch_add(1, Ordering::Relaxed);
                if warm {
                    self.inner.started_warm.fetch_add(1, Ordering::Relaxed);
                }
                (pid, cgroup, warm)
            }
            Some(spawner::Reply::Failed {
                failure: spawner::Failure::Fork { errno },
                notes,
                reap,
            }) if errno == libc::EINVAL => {
                log_notes(notes);
                reap_let_go(reap);
                warn!(
                    "this system refuses clone(CLONE_PARENT) (qemu-user emulation does): the \
                     worker forks attempts itself from now on, without warm cgroups"
                );
                self.inner.fork_here.store(true, Ordering::Relaxed);
                let (pid, name) = self.fork_here(request)?;
                (pid, name, false)
            }
            Some(spawner::Reply::Failed {
                failure,
                notes,
                reap,
            }) => {
                log_notes(notes);
                reap_let_go(reap);
                return Err(failure.into());
            }
            Some(spawner::Reply::Status { .. }) => {
                return Err(SpawnError::Fork(std::io::Error::other(
                    "the spawner answered a spawn with its status",
                )))
            }
            None => {
                let (pid, name) = self.fork_here(request)?;
                (pid, name, false)
            }
        };
        let mut process = process::Process::new(pid);
        let cgroup = self.inner.hierarchy.existing(&name);
        let procs = cgroup.procs_files();
        let mut guard = attempt::CgroupGuard::new(cgroup, warm, self.inner.clone());
        // Only the helpers may hold the write ends now, so EOF means they are done with them.
        drop((setup_w, events_w, stdout_w, stderr_w, stdin));
        // The task waits for this, its sandbox built: a byte once confirmed, EOF if dropped.
        let confirm = async {
            if let Some((confirmation, (r, w))) = confirm_pipe {
                drop(r);
                if confirmation.wait().await {
                    let _ = nix::unistd::write(&w, b"c");
                }
            }
        };
        let status_r = status.map(|(r, w)| {
            drop(w);
            r
        });
        let proxy_chan = proxy_chan.map(|(ours, theirs)| {
            drop(theirs);
            ours
        });

        let mut setup = read_end(setup_r, "setup")?;
        let mut report = Vec::new();
        let read = setup.read_to_end(&mut report);
        tokio::pin!(read);
        // The pipe ends at the exec, which waits for the confirm, or at a failure, which may
        // come first.
        let read = tokio::select! {
            r = &mut read => r,
            () = confirm => read.await,
        };
        if let Err(source) = read {
            warn!(%source, "cannot read the setup pipe; assuming the attempt started");
        }
        let (mask_paths, rebind_paths) = mask_paths_and_rebinds;
        let failure = child::parse_records(&report)
            .into_iter()
            .find_map(|r| match r {
                Record::Error { step, index, errno } => Some((step, index, errno)),
                _ => None,
            });
        if let Some((step, index, errno)) = failure {
            // The helpers exit right after an error record; reap them and drop the cgroup.
            let _ = process.wait().await;
            guard.finish().await;
            return Err(match step {
                Some(child::Step::Confirm) => SpawnError::Unconfirmed,
                Some(child::Step::Exec) => SpawnError::Exec {
                    program: spec.argv[0].clone(),
                    errno,
                    searched: candidates
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                },
                Some(step) => SpawnError::Setup {
                    step: step.describe(index, &procs, &workspace, &mask_paths, &rebind_paths),
                    errno,
                },
                None => SpawnError::Setup {
                    step: "an unknown setup step".to_owned(),
                    errno,
                },
            });
        }
        if let (Some(chan), Some(egress)) = (proxy_chan, spec.egress) {
            // S sent the socket before it forked the task's init, so it is there by now.
            let served = receive_listener(&chan).and_then(|l| {
                egress
                    .serve(l)
                    .map_err(|e| format!("cannot serve the proxy socket: {e}"))
            });
            if let Err(why) = served {
                drop(process.start_kill());
                let _ = process.wait().await;
                guard.finish().await;
                return Err(SpawnError::Proxy(why));
            }
        }
        let events = read_end(events_r, "events")?;
        debug!(
            task = spec.task_id,
            attempt = spec.attempt,
            cgroup = %name,
            pid = process.id(),
            sandboxed,
            "attempt started"
        );
        Ok(Attempt::new(
            process,
            read_end(stdout_r, "stdout")?,
            read_end(stderr_r, "stderr")?,
            events,
            status_r,
            guard,
            spec.limits,
            pids_limit_enforced,
        ))
    }

    /// The fallback where the spawner cannot fork for the worker (see [`Inner::fork_here`]):
    /// a new cgroup, which the child joins itself, and a fork of the worker. Returns (pid,
    /// cgroup name).
    fn fork_here(&self, request: spawner::Request) -> Result<(i32, String), SpawnError> {
        let spawner::Request::Spawn(spawn) = request else {
            return Err(SpawnError::Fork(std::io::Error::other(
                "not a spawn request",
            )));
        };
        let spawner::SpawnRequest {
            name,
            memory_bytes,
            pids,
            mut plan,
        } = *spawn;
        if plan.sandbox.is_some() {
            plan.stacks = Some(child::Stacks::helpers().map_err(SpawnError::Fork)?);
        }
        let cgroup = self
            .inner
            .hierarchy
            .create(&name, cgroup::CgroupLimits { memory_bytes, pids })?;
        let bad_path = |p: &Path| SpawnError::Workspace {
            path: p.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in a path"),
        };
        plan.cgroup_procs = cgroup
            .procs_files()
            .iter()
            .map(|p| plan::c_path(p).map_err(|_| bad_path(p)))
            .collect::<Result<_, _>>()?;
        match child::fork_process() {
            Ok(0) => child::run(&plan),
            Ok(pid) => {
                self.inner.started.fetch_add(1, Ordering::Relaxed);
                Ok((pid, name))
            }
            Err(errno) => {
                let _ = cgroup.remove();
                Err(SpawnError::Fork(errno.into()))
            }
        }
    }

    fn sandbox_setup(
        &self,
        spec: &AttemptSpec<'_>,
        workspace: &Path,
    ) -> Result<SandboxSetup, SpawnError> {
        let mut flags = libc::CLONE_NEWNS
            | libc::CLONE_NEWUTS
            | libc::CLONE_NEWIPC
            | libc::CLONE_NEWPID
            | libc::CLONE_NEWCGROUP;
        if spec.network != NetworkPolicy::Host {
            flags |= libc::CLONE_NEWNET;
        }
        let id_maps = self.inner.user_namespace.then(|| {
            flags |= libc::CLONE_NEWUSER;
            let uid = nix::unistd::geteuid().as_raw();
            let gid = nix::unistd::getegid().as_raw();
            (
                format!("0 {uid} 1\n").into_bytes(),
                format!("0 {gid} 1\n").into_bytes(),
            )
        });
        let private: Vec<plan::Private> = self
            .inner
            .private
            .iter()
            .map(PathBuf::as_path)
            .chain(plan::WELL_KNOWN_PRIVATE.iter().map(Path::new))
            .filter_map(|p| plan::found(p).ok())
            .map(|(path, dir)| plan::Private { path, dir })
            .collect();
        // The host's DNS settings, when /etc/resolv.conf points into a covered place (/run).
        let resolv = match spec.network {
            NetworkPolicy::Host => plan::found(Path::new("/etc/resolv.conf"))
                .ok()
                .map(|(path, _)| path)
                .filter(|p| p != Path::new("/etc/resolv.conf")),
            NetworkPolicy::None | NetworkPolicy::Proxy => None,
        };
        let keep: Vec<PathBuf> = resolv
            .into_iter()
            .chain(
                self.inner
                    .keep
                    .iter()
                    .filter_map(|p| plan::found(p).ok().map(|(path, _)| path)),
            )
            .collect();
        let mounts = plan::mount_plan(&private, workspace, &keep);
        let bad_path = |p: &Path| SpawnError::Workspace {
            path: p.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in a path"),
        };
        let c = |p: &Path| plan::c_path(p).map_err(|_| bad_path(p));
        let masks = mounts
            .masks
            .iter()
            .map(|m| {
                Ok(Mask {
                    path: c(&m.path)?,
                    kind: m.kind,
                    creates: m
                        .creates
                        .iter()
                        .map(|(p, dir)| Ok((c(p)?, *dir)))
                        .collect::<Result<_, SpawnError>>()?,
                })
            })
            .collect::<Result<_, SpawnError>>()?;
        let rebinds = mounts
            .rebinds
            .iter()
            .map(|(p, writable)| {
                Ok(Rebind {
                    path: c(p)?,
                    writable: *writable,
                })
            })
            .collect::<Result<_, SpawnError>>()?;
        Ok(SandboxSetup {
            unshare_flags: flags,
            // The spawner's, when it has one made ahead (see the `netns` module).
            net_ns: None,
            proxy_port: (spec.network == NetworkPolicy::Proxy).then_some(crate::egress::PROXY_PORT),
            // sysfs may only be mounted by the owner of the network namespace, and inside a
            // user namespace the host's /sys cannot be bound without its locked sub-mounts.
            sys: match (spec.network, self.inner.user_namespace) {
                (NetworkPolicy::None | NetworkPolicy::Proxy, _) => SysMount::Fresh,
                (NetworkPolicy::Host, false) => SysMount::Rebind,
                (NetworkPolicy::Host, true) => SysMount::Keep,
            },
            id_maps,
            hostname: plan::hostname(spec.task_id),
            masks,
            rebinds,
        })
    }

    /// Adds files to bind back read-only when covered (as /etc/resolv.conf's target is).
    #[cfg(test)]
    pub(crate) fn keep(&mut self, files: Vec<PathBuf>) {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.keep = files;
        }
    }

    /// A sandbox like `self` without warm cgroups (every attempt joins its cgroup itself).
    #[cfg(test)]
    pub(crate) fn cold(&self) -> Sandbox {
        Sandbox::build(
            self.inner.hierarchy.clone(),
            self.inner.namespaces,
            self.inner.user_namespace,
            self.inner.private.clone(),
            false,
        )
        .expect("start a spawner")
    }

    /// Waits (bounded) until a warm cgroup is ready; false on a host without them (v2).
    /// Panics, with what the spawner said, when a v1 host has none ready within 5 s.
    #[cfg(test)]
    pub(crate) async fn warm_ready(&self) -> bool {
        self.warm_ready_at_least(1).await
    }

    /// [`Sandbox::warm_ready`] for every warm cgroup of the pool: then the next attempt takes
    /// the one made (or re-entered) last.
    #[cfg(test)]
    pub(crate) async fn warm_all_ready(&self) -> bool {
        self.warm_ready_at_least(WARM_CGROUPS).await
    }

    #[cfg(test)]
    async fn warm_ready_at_least(&self, want: usize) -> bool {
        if !matches!(self.inner.hierarchy, Hierarchy::V1(_)) {
            return false;
        }
        let mut said = Vec::new();
        for _ in 0..500 {
            match self
                .inner
                .spawner
                .call(&spawner::Request::Status, &[])
                .await
            {
                Ok(spawner::Reply::Status { ready, reap, .. }) if ready >= want => {
                    reap_let_go(reap);
                    return true;
                }
                Ok(spawner::Reply::Status { notes, reap, .. }) => {
                    reap_let_go(reap);
                    said.extend(notes);
                }
                other => panic!("the spawner's status: {other:?}"),
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("not {want} warm cgroups ready within 5 s on a v1 host: {said:?}");
    }

    /// The spawner's network namespaces: (ready, lent, reused so far); see the `netns`
    /// module.
    #[cfg(test)]
    pub(crate) async fn netns_counts(&self) -> (usize, usize, u64) {
        match self
            .inner
            .spawner
            .call(&spawner::Request::Status, &[])
            .await
        {
            Ok(spawner::Reply::Status { netns, reap, .. }) => {
                reap_let_go(reap);
                netns
            }
            other => panic!("the spawner's status: {other:?}"),
        }
    }

    /// A sandbox like `self` whose attempts the worker forks itself, as where the spawner
    /// cannot (see [`Inner::fork_here`]).
    #[cfg(test)]
    pub(crate) fn forking_here(&self) -> Sandbox {
        let sandbox = self.cold();
        sandbox.inner.fork_here.store(true, Ordering::Relaxed);
        sandbox
    }

    /// Forces (or stops) the use of a user namespace, to test that path as root.
    #[cfg(test)]
    pub(crate) fn set_user_namespace(&mut self, on: bool) {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.user_namespace = on;
        }
    }
}

/// The worker's private paths for [`Sandbox::detect_hiding`]: its config file and the
/// directory holding it, its TLS files (CA, certificate, key) and their directories, and its
/// work directory (other attempts' workspaces). Directories in [`plan::SHARED_DIRS`] are not
/// hidden whole (a config in /etc hides the file only); see docs/architecture.md.
pub fn private_paths(config: &crate::config::WorkerConfig) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = Vec::new();
    // Each once: every sandboxed attempt looks each up again, and the TLS files tend to share
    // a directory.
    let mut add = |path: &Path| {
        if !paths.iter().any(|p| p == path) {
            paths.push(path.to_path_buf());
        }
    };
    let files = config
        .file
        .iter()
        .chain([&config.tls.ca, &config.tls.cert, &config.tls.key]);
    for file in files {
        add(file);
        if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
            add(dir);
        }
    }
    add(&config.work_dir);
    paths
}

impl fmt::Display for Sandbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let version = match self.cgroup_version() {
            CgroupVersion::V1 => "v1",
            CgroupVersion::V2 => "v2",
            CgroupVersion::None => "none",
        };
        write!(f, "cgroup {version} under ")?;
        for (i, base) in self.inner.hierarchy.bases().iter().enumerate() {
            write!(f, "{}{}", if i > 0 { ", " } else { "" }, base.display())?;
        }
        write!(
            f,
            "; pids limit {}; namespaces {}{}",
            if self.pids_limit_available() {
                "enforced"
            } else {
                "NOT enforced"
            },
            if self.inner.namespaces {
                "available"
            } else {
                "UNAVAILABLE"
            },
            if self.inner.user_namespace {
                " (with a user namespace)"
            } else {
                ""
            },
        )
    }
}

impl Inner {
    fn retry_leftovers(&self) {
        let pending = std::mem::take(&mut *self.leftovers());
        for cgroup in pending {
            cgroup.kill_now();
            self.keep_or_remove(cgroup, false);
        }
    }

    /// An attempt's cgroup at its end: kept as a leftover while not empty; else handed back
    /// for reuse if it was `warm` and can be ([`Inner::recycle`]), or removed.
    fn keep_or_remove(&self, cgroup: AttemptCgroup, warm: bool) {
        if !cgroup.is_empty() {
            self.leftovers().push(cgroup);
            return;
        }
        if warm && self.recycle(&cgroup, None) {
            return;
        }
        self.remove_or_keep(cgroup);
    }

    /// Hands an emptied warm cgroup (v1) back to the spawner's pool, reset, for a later
    /// attempt to be born in instead of a new one (see `v1::Group::reset_for_reuse` for
    /// which ones qualify and why; `oom_kills`: its counter, if already read since it was
    /// seen empty). True if it went; false: the caller removes it. Only warm ones: a cold one
    /// is named after its attempt's task.
    fn recycle(&self, cgroup: &AttemptCgroup, oom_kills: Option<u64>) -> bool {
        let AttemptCgroup::V1(group) = cgroup else {
            return false;
        };
        if let Err(why) = group.reset_for_reuse(oom_kills) {
            debug!(cgroup = %group.name(), %why, "attempt cgroup not reused; removing it");
            return false;
        }
        self.spawner.recycle(group.name())
    }

    /// Removes an empty cgroup; one that will not go yet is kept as a leftover. Then a warm
    /// cgroup is prepared in place of the one the attempt may have used: only now, because a
    /// thread moving into a cgroup holds the kernel's cgroup mutex through a grace period, and
    /// an attempt's own rmdir would wait behind it.
    fn remove_or_keep(&self, cgroup: AttemptCgroup) {
        if let Err(err) = cgroup.remove() {
            debug!(%err, "attempt cgroup not removable yet; will retry");
            self.leftovers().push(cgroup);
        }
        self.refill_warm();
    }

    /// Tops the warm cgroups up (see [`Inner::remove_or_keep`] for when).
    fn refill_warm(&self) {
        self.spawner.refill();
    }

    fn leftovers(&self) -> std::sync::MutexGuard<'_, Vec<AttemptCgroup>> {
        self.leftovers.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Logs what the spawner had to say (it does not log itself; see the `spawner` module).
/// Reaps the standby helpers the spawner let go (the worker's children; see the `standby`
/// module): each handle kills what still runs and reaps it now or at a later spawn.
fn reap_let_go(pids: Vec<i32>) {
    for pid in pids {
        drop(process::Process::new(pid));
    }
}

fn log_notes(notes: Vec<String>) {
    for note in notes {
        warn!("{note}");
    }
}

fn workspace(path: &Path) -> Result<PathBuf, SpawnError> {
    let (canonical, dir) = plan::found(path).map_err(|source| SpawnError::Workspace {
        path: path.to_path_buf(),
        source,
    })?;
    if !dir {
        return Err(SpawnError::Workspace {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a directory"),
        });
    }
    Ok(canonical)
}

/// A close-on-exec Unix socket pair (ours, the helper's) for the proxy's listening socket.
fn proxy_socket_pair() -> Result<(OwnedFd, OwnedFd), SpawnError> {
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    let err = |e: nix::errno::Errno| SpawnError::Pipe {
        what: "proxy socket",
        source: e.into(),
    };
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
    )
    .map_err(err)?;
    let above_stdio = |fd: OwnedFd| -> Result<OwnedFd, SpawnError> {
        if fd.as_raw_fd() > 2 {
            Ok(fd)
        } else {
            fd.try_clone().map_err(|source| SpawnError::Pipe {
                what: "proxy socket",
                source,
            })
        }
    };
    Ok((above_stdio(ours)?, above_stdio(theirs)?))
}

/// The listening socket the sandbox's outer helper sent over `chan`.
fn receive_listener(chan: &OwnedFd) -> Result<std::net::TcpListener, String> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut byte = [0u8; 1];
    let mut iov = [std::io::IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = recvmsg::<()>(
        chan.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(|e| format!("the sandbox sent no proxy socket: {e}"))?;
    for cmsg in msg
        .cmsgs()
        .map_err(|e| format!("bad control message: {e}"))?
    {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            if let Some(&fd) = fds.first() {
                // The kernel made `fd` ours (close-on-exec) with this message; nothing else
                // holds the number.
                let owned = child::owned_fd(fd);
                for extra in &fds[1..] {
                    drop(child::owned_fd(*extra));
                }
                return Ok(std::net::TcpListener::from(owned));
            }
        }
    }
    Err("the sandbox's message carried no socket".into())
}

/// The read end of a pipe made by [`pipe_pair`], for the runtime to read. One `fcntl`
/// (`F_SETFL` replaces the status flags: `pipe_pair` sets none but `O_CLOEXEC`, a descriptor
/// flag); the pipe's ends are separate open files, so the write end the child gets stays
/// blocking, and `pipe::Receiver::from_owned_fd`'s checks (an `fstat` that it is a pipe, an
/// `fcntl` for its flags) would only say what this module already knows.
fn read_end(fd: OwnedFd, what: &'static str) -> Result<pipe::Receiver, SpawnError> {
    let err = |source: std::io::Error| SpawnError::Pipe { what, source };
    nix::fcntl::fcntl(
        fd.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFL(OFlag::O_NONBLOCK),
    )
    .map_err(|e| err(e.into()))?;
    pipe::Receiver::from_owned_fd_unchecked(fd).map_err(err)
}

/// A close-on-exec pipe whose ends are clear of the stdio numbers (a daemon started with fd 0
/// closed would otherwise get a pipe end there, which std then overwrites in the child).
fn pipe_pair(what: &'static str) -> Result<(OwnedFd, OwnedFd), SpawnError> {
    let err = |source: std::io::Error| SpawnError::Pipe { what, source };
    let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| err(e.into()))?;
    let above_stdio = |fd: OwnedFd| -> Result<OwnedFd, SpawnError> {
        if fd.as_raw_fd() > 2 {
            Ok(fd)
        } else {
            // std's try_clone duplicates with F_DUPFD_CLOEXEC at 3 or above.
            fd.try_clone().map_err(err)
        }
    };
    Ok((above_stdio(r)?, above_stdio(w)?))
}
