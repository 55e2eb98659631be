//! The cgroup v2 backend: one unified hierarchy at /sys/fs/cgroup.
//!
//! Attempt cgroups are children of one base cgroup whose `cgroup.subtree_control` enables
//! `memory` (required) and `pids` (if available). Because v2 forbids processes in a cgroup that
//! hands controllers to its children, the base must hold no process:
//! - under systemd (`Delegate=yes`) the base is the service's own cgroup, and the worker first
//!   moves the processes there (itself) into the leaf `<base>/worker`;
//! - run by hand, the base is `/sys/fs/cgroup/drover`, beside systemd's slices;
//! - a root hint names the base explicitly.
//!
//! Killing uses `cgroup.kill` (Linux 5.14+), else freeze, SIGKILL each process, thaw.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;
use tracing::{info, warn};

use super::{
    keyed_value, kill_pids, kill_until_empty, make_dir, poll_until, read_control, read_pids,
    read_u64, undo, write_control, CgroupLimits, Counters, CGROUP_MOUNT,
};
use crate::sandbox::error::{CgroupError, SandboxError};

/// The leaf the worker moves itself into when its own cgroup becomes the base.
pub(crate) const WORKER_LEAF: &str = "worker";
/// The base used when the worker is not a delegated systemd service.
const DEFAULT_BASE: &str = "/drover";
/// The leaf a cgroup namespace root's processes are moved into so it can delegate.
const INIT_LEAF: &str = "init";
const FREEZE_TIMEOUT: Duration = Duration::from_secs(2);

/// The base cgroup and what it hands to attempt cgroups.
#[derive(Debug, Clone)]
pub(crate) struct Base {
    pub(crate) dir: PathBuf,
    /// `memory` is enabled for children (always, unless built by a test).
    pub(crate) memory: bool,
    /// `pids` is enabled for children.
    pub(crate) pids: bool,
}

impl Base {
    /// `own`: the text of /proc/self/cgroup.
    pub(crate) fn detect(root_hint: Option<&Path>, own: &str) -> Result<Base, SandboxError> {
        let own = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .map(PathBuf::from)
            .ok_or(SandboxError::OwnCgroup {
                controller: "cgroup2",
                path: PathBuf::from("/proc/self/cgroup"),
            })?;
        let under_systemd = std::env::var_os("INVOCATION_ID").is_some();
        let rel = base_path(root_hint, &own, under_systemd);
        let mount = Path::new(CGROUP_MOUNT);
        let dir = under(mount, &rel);
        std::fs::create_dir_all(&dir).map_err(|source| SandboxError::CannotCreate {
            source: CgroupError {
                action: "create the base cgroup".into(),
                path: dir.clone(),
                source,
            },
        })?;
        if own == rel {
            evacuate(&dir, WORKER_LEAF)?;
        }
        let mut available = controllers(&dir)?;
        if !available.iter().any(|c| c == "memory") {
            if let Some(parent) = dir.parent().filter(|p| p.starts_with(mount)) {
                enable_in_parent(parent, mount)?;
                available = controllers(&dir)?;
            }
        }
        if !available.iter().any(|c| c == "memory") {
            return Err(SandboxError::ControllerMissing {
                controller: "memory",
                path: dir.join("cgroup.controllers"),
                available: available.join(" "),
            });
        }
        let pids = available.iter().any(|c| c == "pids");
        if !pids {
            warn!(
                path = %dir.display(),
                "no pids controller in the base cgroup: pids limits will not be enforced"
            );
        }
        let wanted = if pids { "+memory +pids" } else { "+memory" };
        enable(&dir, wanted)?;
        Ok(Base {
            dir,
            memory: true,
            pids,
        })
    }

    pub(crate) fn create(&self, name: &str, limits: CgroupLimits) -> Result<Group, CgroupError> {
        let group = self.existing(name);
        make_dir(&group.dir)?;
        let result = (|| {
            if let Some(bytes) = limits.memory_bytes {
                if !self.memory {
                    return Err(CgroupError {
                        action: "set a memory limit: the memory controller is not enabled for"
                            .into(),
                        path: self.dir.clone(),
                        source: io::Error::from(io::ErrorKind::Unsupported),
                    });
                }
                write_control(
                    &group.dir.join("memory.max"),
                    &bytes.to_string(),
                    "set memory.max in",
                )?;
                let swap = group.dir.join("memory.swap.max");
                if swap.exists() {
                    write_control(&swap, "0", "set memory.swap.max in")?;
                }
            }
            if let (Some(max), true) = (limits.pids, self.pids) {
                write_control(
                    &group.dir.join("pids.max"),
                    &max.to_string(),
                    "set pids.max in",
                )?;
            }
            Ok(())
        })();
        match result {
            Ok(()) => Ok(group),
            Err(e) => {
                undo(std::slice::from_ref(&group.dir));
                Err(e)
            }
        }
    }

    pub(crate) fn existing(&self, name: &str) -> Group {
        Group {
            dir: self.dir.join(name),
        }
    }
}

/// One attempt's cgroup.
#[derive(Debug)]
pub(crate) struct Group {
    pub(crate) dir: PathBuf,
}

impl Group {
    /// Pids here and in any child cgroup the task made.
    pub(crate) fn pids(&self) -> io::Result<Vec<i32>> {
        let mut all = Vec::new();
        collect_pids(&self.dir, &mut all)?;
        Ok(all)
    }

    pub(crate) fn is_empty(&self) -> bool {
        match read_control(self.dir.join("cgroup.events")) {
            Ok(events) => keyed_value(&events, "populated") == Some(0),
            Err(e) if e.kind() == io::ErrorKind::NotFound => true,
            Err(_) => self.pids().is_ok_and(|p| p.is_empty()),
        }
    }

    pub(crate) async fn kill_all(&self) -> Result<(), CgroupError> {
        let kill_file = self.dir.join("cgroup.kill");
        if !(kill_file.exists() && write_control(&kill_file, "1", "kill").is_ok()) {
            self.freeze_kill_thaw().await;
        }
        kill_until_empty(&self.dir, || self.pids(), || self.is_empty()).await
    }

    /// Kernels before 5.14 have no cgroup.kill.
    async fn freeze_kill_thaw(&self) {
        let freeze = self.dir.join("cgroup.freeze");
        if write_control(&freeze, "1", "freeze").is_ok() {
            let events = self.dir.join("cgroup.events");
            poll_until(FREEZE_TIMEOUT, || {
                read_control(&events).is_ok_and(|e| keyed_value(&e, "frozen") == Some(1))
            })
            .await;
        }
        if let Ok(pids) = self.pids() {
            kill_pids(&pids);
        }
        let _ = write_control(&freeze, "0", "thaw");
    }

    pub(crate) fn kill_now(&self) {
        let kill_file = self.dir.join("cgroup.kill");
        if !(kill_file.exists() && write_control(&kill_file, "1", "kill").is_ok()) {
            if let Ok(pids) = self.pids() {
                kill_pids(&pids);
            }
        }
    }

    pub(crate) fn counters(&self) -> Counters {
        let oom_kills = read_control(self.dir.join("memory.events"))
            .ok()
            .and_then(|text| keyed_value(&text, "oom_kill"))
            .unwrap_or(0);
        Counters {
            oom_kills,
            // memory.peak exists from Linux 5.19.
            peak_memory_bytes: read_u64(&self.dir.join("memory.peak")),
        }
    }
}

/// Which cgroup (relative to the mount) becomes the base; see the module docs.
fn base_path(root_hint: Option<&Path>, own: &Path, under_systemd: bool) -> PathBuf {
    if let Some(hint) = root_hint {
        return Path::new("/").join(hint);
    }
    if own.file_name().is_some_and(|n| n == WORKER_LEAF) {
        // Moved there by an earlier detect in this process (or by the previous start).
        if let Some(parent) = own.parent() {
            return parent.to_path_buf();
        }
    }
    if under_systemd && own != Path::new("/") {
        own.to_path_buf()
    } else {
        PathBuf::from(DEFAULT_BASE)
    }
}

fn under(mount: &Path, rel: &Path) -> PathBuf {
    mount.join(rel.strip_prefix("/").unwrap_or(rel))
}

fn controllers(dir: &Path) -> Result<Vec<String>, SandboxError> {
    let path = dir.join("cgroup.controllers");
    read_control(&path)
        .map(|s| s.split_whitespace().map(str::to_owned).collect())
        .map_err(|source| SandboxError::Proc {
            action: "read",
            path,
            source,
        })
}

/// Writes `+memory +pids`-style lines to `dir/cgroup.subtree_control`, one controller at a time
/// (a line with one unavailable controller would fail whole).
fn enable(dir: &Path, wanted: &str) -> Result<(), SandboxError> {
    let path = dir.join("cgroup.subtree_control");
    for controller in wanted.split_whitespace() {
        if let Err(err) = write_control(&path, controller, "enable controllers in") {
            return Err(if err.source.raw_os_error() == Some(Errno::EBUSY as i32) {
                SandboxError::BaseHasProcesses {
                    path: dir.to_path_buf(),
                    pids: read_pids(&dir.join("cgroup.procs")).unwrap_or_default(),
                }
            } else {
                SandboxError::CannotCreate { source: err }
            });
        }
    }
    Ok(())
}

/// Enables memory (and pids where offered) for the base's parent's children. A cgroup
/// namespace root that holds processes (a container) has them moved into `init` first.
fn enable_in_parent(parent: &Path, mount: &Path) -> Result<(), SandboxError> {
    let offered = controllers(parent)?;
    let wanted: Vec<&str> = ["+memory", "+pids"]
        .into_iter()
        .filter(|c| offered.iter().any(|o| o == &c[1..]))
        .collect();
    match enable(parent, &wanted.join(" ")) {
        Err(SandboxError::BaseHasProcesses { .. }) if parent == mount => {
            evacuate(parent, INIT_LEAF)?;
            enable(parent, &wanted.join(" "))
        }
        other => other,
    }
}

/// Moves every process of `dir` into `dir/leaf`, so `dir` may delegate controllers.
fn evacuate(dir: &Path, leaf: &str) -> Result<(), SandboxError> {
    let target = dir.join(leaf);
    if let Err(source) = std::fs::create_dir(&target) {
        if source.kind() != io::ErrorKind::AlreadyExists {
            return Err(SandboxError::CannotCreate {
                source: CgroupError {
                    action: "create the leaf cgroup".into(),
                    path: target,
                    source,
                },
            });
        }
    }
    let procs = target.join("cgroup.procs");
    let pids = read_pids(&dir.join("cgroup.procs")).unwrap_or_default();
    for pid in pids {
        match write_control(&procs, &pid.to_string(), "move a process into") {
            Ok(()) => {
                info!(
                    pid,
                    to = %target.display(),
                    "moved into a leaf cgroup so the parent can delegate controllers"
                )
            }
            // Gone meanwhile, or a kernel thread: neither blocks delegation.
            Err(e) if e.source.raw_os_error() == Some(Errno::ESRCH as i32) => {}
            Err(e) if e.source.raw_os_error() == Some(Errno::EINVAL as i32) => {}
            Err(source) => return Err(SandboxError::CannotCreate { source }),
        }
    }
    Ok(())
}

fn collect_pids(dir: &Path, into: &mut Vec<i32>) -> io::Result<()> {
    match read_pids(&dir.join("cgroup.procs")) {
        Ok(p) => into.extend(p),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    }
    for entry in std::fs::read_dir(dir)?.filter_map(Result::ok) {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            collect_pids(&entry.path(), into)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_choice() {
        let p = |s: &str| PathBuf::from(s);
        // A delegated systemd service: its own cgroup.
        let service = p("/system.slice/drover-worker.service");
        assert_eq!(base_path(None, &service, true), service);
        // Already moved into the leaf by an earlier call.
        assert_eq!(base_path(None, &service.join("worker"), true), service);
        assert_eq!(base_path(None, &service.join("worker"), false), service);
        // By hand (a login session): beside systemd's slices.
        let session = p("/user.slice/user-0.slice/session-1.scope");
        assert_eq!(base_path(None, &session, false), p("/drover"));
        // The root of a cgroup namespace (a container) is never the base itself.
        assert_eq!(base_path(None, &p("/"), true), p("/drover"));
        // A hint wins, with or without its leading slash.
        assert_eq!(base_path(Some(&p("x/y")), &session, true), p("/x/y"));
        assert_eq!(base_path(Some(&p("/x")), &session, true), p("/x"));
        assert_eq!(
            under(Path::new("/sys/fs/cgroup"), &p("/a/b")),
            p("/sys/fs/cgroup/a/b")
        );
    }
}
