//! The cgroup v1 backend: separate hierarchies per controller, as on hybrid hosts (memory at
//! `/sys/fs/cgroup/memory`, cgroup2 beside it without memory).
//!
//! An attempt gets a directory in the memory hierarchy (required: limit and OOM counter), the
//! pids hierarchy (if mounted: otherwise a pids limit is not enforced and the caller says so)
//! and the freezer hierarchy (if mounted: it makes killing a forking tree race-free). Each
//! lives under `<mount point>/<this process's path in that hierarchy>` unless a root hint
//! names another path.

use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tracing::warn;

use super::{
    keyed_value, kill_pids, kill_until_empty, make_dir, poll_until, read_control, read_pids,
    read_u64, undo, write_control, CgroupLimits, Counters,
};
use crate::resources::host::parse_mountinfo_line;
use crate::sandbox::error::{CgroupError, SandboxError};

/// Most memory an emptied cgroup may still have charged to be reused for another attempt
/// ([`Group::reset_for_reuse`]), and so what the next attempt's peak may over-count at most.
/// An attempt that ran a shell left 0.7–1.6 MiB here (measured by hand): kernel objects
/// (dentries, inodes) and the charge batches the kernel keeps per CPU, which a new cgroup's
/// peak counts as well. Reclaiming them first (`memory.force_empty`) took 18 ms.
pub(crate) const RECYCLE_MAX_CHARGE: u64 = 4 * 1024 * 1024;

/// How long to wait for the freezer to report FROZEN before killing anyway.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(2);

/// Base directories, one per controller in use.
#[derive(Debug, Clone)]
pub(crate) struct Bases {
    pub(crate) memory: PathBuf,
    pub(crate) pids: Option<PathBuf>,
    pub(crate) freezer: Option<PathBuf>,
}

impl Bases {
    /// `mountinfo`, `own`: the text of /proc/self/mountinfo and /proc/self/cgroup.
    pub(crate) fn detect(
        root_hint: Option<&Path>,
        mountinfo: &str,
        own: &str,
    ) -> Result<Bases, SandboxError> {
        let base = |controller: &'static str| -> Result<Option<PathBuf>, SandboxError> {
            let Some(mount) = mount_point(mountinfo, controller) else {
                return Ok(None);
            };
            let rel = match root_hint {
                Some(hint) => hint.to_path_buf(),
                None => own_path(own, controller).ok_or_else(|| SandboxError::OwnCgroup {
                    controller,
                    path: PathBuf::from("/proc/self/cgroup"),
                })?,
            };
            let dir = mount.join(rel.strip_prefix("/").unwrap_or(&rel));
            if root_hint.is_some() {
                std::fs::create_dir_all(&dir).map_err(|source| SandboxError::CannotCreate {
                    source: CgroupError {
                        action: "create the cgroup root hint".into(),
                        path: dir.clone(),
                        source,
                    },
                })?;
            } else if !dir.is_dir() {
                return Err(SandboxError::OwnCgroupMissing {
                    controller,
                    path: dir,
                });
            }
            Ok(Some(dir))
        };
        let memory = base("memory")?.ok_or(SandboxError::NoCgroups)?;
        let pids = base("pids")?;
        if pids.is_none() {
            warn!("no cgroup v1 pids hierarchy is mounted: pids limits will not be enforced");
        }
        let freezer = base("freezer")?;
        Ok(Bases {
            memory,
            pids,
            freezer,
        })
    }

    pub(crate) fn dirs(&self) -> Vec<&Path> {
        let mut dirs = vec![self.memory.as_path()];
        dirs.extend(self.pids.as_deref());
        dirs.extend(self.freezer.as_deref());
        dirs
    }

    pub(crate) fn create(&self, name: &str, limits: CgroupLimits) -> Result<Group, CgroupError> {
        let group = self.existing(name);
        let mut made = Vec::new();
        let result = (|| {
            make_dir(&group.memory)?;
            made.push(group.memory.clone());
            if let Some(bytes) = limits.memory_bytes {
                group.set_memory_limit(bytes)?;
            }
            if let Some(dir) = &group.pids {
                make_dir(dir)?;
                made.push(dir.clone());
                if let Some(max) = limits.pids {
                    group.set_pids_limit(max)?;
                }
            }
            if let Some(dir) = &group.freezer {
                make_dir(dir)?;
                made.push(dir.clone());
            }
            Ok(())
        })();
        match result {
            Ok(()) => Ok(group),
            Err(e) => {
                undo(&made);
                Err(e)
            }
        }
    }

    pub(crate) fn existing(&self, name: &str) -> Group {
        Group {
            memory: self.memory.join(name),
            pids: self.pids.as_ref().map(|d| d.join(name)),
            freezer: self.freezer.as_ref().map(|d| d.join(name)),
        }
    }
}

/// One attempt's directories.
#[derive(Debug)]
pub(crate) struct Group {
    pub(crate) memory: PathBuf,
    pub(crate) pids: Option<PathBuf>,
    pub(crate) freezer: Option<PathBuf>,
}

impl Group {
    /// Memory limit (and memory+swap where the hierarchy has it), bytes.
    pub(crate) fn set_memory_limit(&self, bytes: u64) -> Result<(), CgroupError> {
        let value = bytes.to_string();
        write_control(
            &self.memory.join("memory.limit_in_bytes"),
            &value,
            "set the memory limit in",
        )?;
        // memory+swap: without it a task could page out past its limit. Only present with
        // swap accounting; it must be set after (and >=) the memory limit.
        let memsw = self.memory.join("memory.memsw.limit_in_bytes");
        if memsw.exists() {
            write_control(&memsw, &value, "set the memory+swap limit in")?;
        }
        Ok(())
    }

    /// The cgroup's name (its directory's, the same in every hierarchy).
    pub(crate) fn name(&self) -> String {
        self.memory
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// `pids.max`, where the pids hierarchy is mounted.
    pub(crate) fn set_pids_limit(&self, max: u32) -> Result<(), CgroupError> {
        match &self.pids {
            Some(dir) => write_control(&dir.join("pids.max"), &max.to_string(), "set pids.max in"),
            None => Ok(()),
        }
    }

    pub(crate) fn dirs(&self) -> Vec<&Path> {
        let mut dirs = vec![self.memory.as_path()];
        dirs.extend(self.pids.as_deref());
        dirs.extend(self.freezer.as_deref());
        dirs
    }

    /// Every pid in any of the attempt's hierarchies (they should agree; a process that is
    /// half-way through joining is in some of them).
    pub(crate) fn pids(&self) -> io::Result<Vec<i32>> {
        let mut all = BTreeSet::new();
        for dir in self.dirs() {
            match read_pids(&dir.join("cgroup.procs")) {
                Ok(p) => all.extend(p),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(all.into_iter().collect())
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.pids().is_ok_and(|p| p.is_empty())
    }

    /// Freeze (so nothing forks while we look), SIGKILL every listed pid, thaw (a frozen
    /// process dies only once thawed), then re-kill until empty.
    pub(crate) async fn kill_all(&self) -> Result<(), CgroupError> {
        if let Some(freezer) = &self.freezer {
            let state = freezer.join("freezer.state");
            match write_control(&state, "FROZEN", "freeze") {
                Ok(()) => {
                    let frozen = poll_until(FREEZE_TIMEOUT, || {
                        read_control(&state).is_ok_and(|s| s.trim() == "FROZEN")
                    })
                    .await;
                    if !frozen {
                        warn!(
                            path = %state.display(),
                            "attempt cgroup did not freeze; killing it anyway"
                        );
                    }
                }
                Err(err) => warn!(%err, "cannot freeze an attempt cgroup; killing it anyway"),
            }
            if let Ok(pids) = self.pids() {
                kill_pids(&pids);
            }
            if let Err(err) = write_control(&state, "THAWED", "thaw") {
                warn!(%err, "cannot thaw a killed attempt cgroup");
            }
        }
        kill_until_empty(&self.memory, || self.pids(), || self.is_empty()).await
    }

    pub(crate) fn kill_now(&self) {
        let state = self.freezer.as_ref().map(|f| f.join("freezer.state"));
        if let Some(state) = &state {
            let _ = write_control(state, "FROZEN", "freeze");
        }
        if let Ok(pids) = self.pids() {
            kill_pids(&pids);
        }
        if let Some(state) = &state {
            let _ = write_control(state, "THAWED", "thaw");
        }
        if let Ok(pids) = self.pids() {
            kill_pids(&pids);
        }
    }

    /// Makes this emptied cgroup as good as a new one for another attempt (`sandbox::warm`
    /// re-enters it instead of making a fresh one: the mkdir and rmdir in three hierarchies
    /// cost about 0.2 ms of the machine's CPU per attempt here, docs/benchmarks.md), or says
    /// why it cannot be:
    /// - never after an OOM kill: `oom_kill` cannot be reset, and the next attempt would read
    ///   it as its own;
    /// - never while `pids.current` is not 0: a killed process the last attempt left (a
    ///   daemon reparented to the host's init) counts until it is reaped, and would take a
    ///   place of the next attempt's pids limit;
    /// - never holding shared memory (a file the task left in /dev/shm or another tmpfs stays
    ///   charged, and without swap nothing can reclaim it under the next attempt's limit);
    /// - never with child cgroups in it (a task made them), frozen, or still charged more
    ///   than [`RECYCLE_MAX_CHARGE`] (reclaimable: kernel objects and cache, which the next
    ///   attempt's limit reclaims when it needs the room, but which its peak may count);
    ///
    /// then lifts the limits (the next attempt writes its own, as into a new cgroup) and
    /// resets the peak and fail counters. The caller has seen it empty; `oom_kills`: the
    /// counter if the caller read it after that ([`Group::counters`]), else it is read here.
    pub(crate) fn reset_for_reuse(&self, oom_kills: Option<u64>) -> Result<(), String> {
        let oom = oom_kills.or_else(|| {
            read_control(self.memory.join("memory.oom_control"))
                .ok()
                .and_then(|text| keyed_value(&text, "oom_kill"))
        });
        match oom {
            Some(0) => {}
            Some(n) => return Err(format!("{n} OOM kills counted")),
            None => return Err("no readable oom_kill counter".into()),
        }
        match read_u64(&self.memory.join("memory.usage_in_bytes")) {
            Some(bytes) if bytes <= RECYCLE_MAX_CHARGE => {}
            Some(bytes) => return Err(format!("{bytes} bytes still charged")),
            None => return Err("memory.usage_in_bytes unreadable".into()),
        }
        let stat = read_control(self.memory.join("memory.stat")).unwrap_or_default();
        match keyed_value(&stat, "shmem") {
            Some(0) => {}
            Some(bytes) => return Err(format!("{bytes} bytes of shared memory charged")),
            None => return Err("no shmem line in memory.stat".into()),
        }
        if let Some(pids) = &self.pids {
            match read_u64(&pids.join("pids.current")) {
                Some(0) => {}
                Some(n) => return Err(format!("{n} processes still counted")),
                None => return Err("pids.current unreadable".into()),
            }
        }
        if let Some(freezer) = &self.freezer {
            let state = read_control(freezer.join("freezer.state")).unwrap_or_default();
            if state.trim() != "THAWED" {
                return Err(format!("freezer state {:?}", state.trim()));
            }
        }
        for dir in self.dirs() {
            if has_child_cgroups(dir)? {
                return Err(format!("child cgroups in {}", dir.display()));
            }
        }
        // memory+swap first: it may never be below the memory limit.
        let writes = [
            (&self.memory, "memory.memsw.limit_in_bytes", "-1", true),
            (&self.memory, "memory.limit_in_bytes", "-1", false),
            (&self.memory, "memory.max_usage_in_bytes", "0", false),
            (&self.memory, "memory.failcnt", "0", false),
            (&self.memory, "memory.memsw.max_usage_in_bytes", "0", true),
            (&self.memory, "memory.memsw.failcnt", "0", true),
        ];
        for (dir, file, value, optional) in writes {
            match write_control(&dir.join(file), value, "reset for reuse") {
                Ok(()) => {}
                // Only with swap accounting.
                Err(e) if optional && e.source.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.to_string()),
            }
        }
        if let Some(pids) = &self.pids {
            write_control(&pids.join("pids.max"), "max", "reset for reuse")
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    pub(crate) fn counters(&self) -> Counters {
        let oom_kills = read_control(self.memory.join("memory.oom_control"))
            .ok()
            .and_then(|text| keyed_value(&text, "oom_kill"))
            .unwrap_or(0);
        Counters {
            oom_kills,
            peak_memory_bytes: read_u64(&self.memory.join("memory.max_usage_in_bytes")),
        }
    }
}

/// Whether the cgroup directory `dir` has directories (child cgroups) in it. One `statx`: a
/// cgroup file system (kernfs) sets a directory's link count to 2 plus its subdirectories
/// (`kernfs_refresh_inode`, on every stat), so no listing of its thirty-odd control files is
/// needed.
fn has_child_cgroups(dir: &Path) -> Result<bool, String> {
    use std::os::unix::fs::MetadataExt;
    let links = std::fs::metadata(dir)
        .map_err(|e| format!("cannot stat {}: {e}", dir.display()))?
        .nlink();
    Ok(links != 2)
}

/// Where the v1 hierarchy holding `controller` is mounted.
fn mount_point(mountinfo: &str, controller: &str) -> Option<PathBuf> {
    mountinfo
        .lines()
        .filter_map(parse_mountinfo_line)
        // A later mount on the same controller hides the earlier ones.
        .rfind(|m| m.fs_type == "cgroup" && m.super_options.split(',').any(|o| o == controller))
        .map(|m| PathBuf::from(m.mount_point))
}

/// This process's path in the v1 hierarchy holding `controller`, from /proc/self/cgroup
/// (`4:memory:/a/b`, or `2:cpu,cpuacct:/`).
fn own_path(own: &str, controller: &str) -> Option<PathBuf> {
    own.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let _id = parts.next()?;
        let controllers = parts.next()?;
        let path = parts.next()?;
        controllers
            .split(',')
            .any(|c| c == controller)
            .then(|| PathBuf::from(path))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const OWN: &str = "\
9:name=systemd:/
8:pids:/
4:memory:/process_api/abc
2:cpu,cpuacct:/x
0::/
";

    #[test]
    fn finds_mounts_and_own_paths() {
        assert_eq!(
            mount_point(MOUNTINFO, "memory"),
            Some(PathBuf::from("/sys/fs/cgroup/memory"))
        );
        assert_eq!(
            mount_point(MOUNTINFO, "cpuacct"),
            Some(PathBuf::from("/sys/fs/cgroup/cpu,cpuacct"))
        );
        assert_eq!(mount_point(MOUNTINFO, "freezer"), None);
        assert_eq!(
            own_path(OWN, "memory"),
            Some(PathBuf::from("/process_api/abc"))
        );
        assert_eq!(own_path(OWN, "cpuacct"), Some(PathBuf::from("/x")));
        assert_eq!(own_path(OWN, "pids"), Some(PathBuf::from("/")));
        assert_eq!(own_path(OWN, "freezer"), None);
        // `name=systemd` is not the `systemd` controller, and the v2 line has no name.
        assert_eq!(own_path(OWN, "systemd"), None);
    }
}
