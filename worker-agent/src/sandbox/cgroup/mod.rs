//! Per-attempt cgroups: one interface ([`Hierarchy`] at start-up, [`AttemptCgroup`] per
//! attempt) over the cgroup v2 backend ([`v2`]) and the v1 backend ([`v1`]) that hybrid hosts
//! such as these build machines need.
//!
//! Owns: choosing where attempt cgroups live (detected once), creating one cgroup per attempt
//! with its memory and pids limits, killing everything in it, reading its OOM and peak-memory
//! counters, and removing it.
//!
//! Invariants:
//! - an attempt cgroup is named `drover-<worker pid>-<seq>-<task>-a<attempt>`, directly under
//!   the base directory of each hierarchy, so a later worker can recognise (and remove) the
//!   leftovers of a dead one;
//! - processes join the cgroup themselves, before they unshare or exec (the forked child writes
//!   `0` to each `cgroup.procs` listed by [`AttemptCgroup::procs_files`]), so nothing an attempt
//!   starts can ever run outside it — or, on v1, are born in it, forked by a worker thread that
//!   waits inside the cgroup ahead of the attempt (`sandbox::warm`);
//! - a cgroup is removed only after [`AttemptCgroup::kill_all`] saw it empty; one that cannot be
//!   emptied is kept as a leftover and retried later, never forgotten;
//! - on v1 a warm cgroup seen empty may instead be reset and re-entered for a later attempt
//!   (`v1::Group::reset_for_reuse` says which qualify: no OOM kill, no process still counted,
//!   no shared memory charged); it then carries the next attempt's limits only and counts as a
//!   new one would, except that up to `v1::RECYCLE_MAX_CHARGE` of reclaimable memory the last
//!   attempt left may still be charged (in its peak, and against its limit until reclaimed).

pub(crate) mod v1;
pub(crate) mod v2;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use drover_protocol::CgroupVersion;
use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tracing::{debug, warn};

use super::error::{CgroupError, SandboxError};
use crate::resources::host;

/// Where cgroup filesystems are mounted.
pub(crate) const CGROUP_MOUNT: &str = "/sys/fs/cgroup";
/// Prefix of every attempt cgroup's name.
pub(crate) const NAME_PREFIX: &str = "drover-";
/// How long [`AttemptCgroup::kill_all`] waits for a killed cgroup to empty.
const EMPTY_TIMEOUT: Duration = Duration::from_secs(10);

/// Limits written into an attempt cgroup when it is created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct CgroupLimits {
    /// Memory (and, where the hierarchy has it, memory+swap) limit, bytes.
    pub(crate) memory_bytes: Option<u64>,
    /// Most processes at once, drover's own helper processes included.
    pub(crate) pids: Option<u32>,
}

/// What the cgroup counted while the attempt ran.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Counters {
    /// Processes the kernel OOM-killed in this cgroup.
    pub(crate) oom_kills: u64,
    /// Highest memory use, bytes, where the kernel records it.
    pub(crate) peak_memory_bytes: Option<u64>,
}

/// The hierarchy attempt cgroups are created in, found once by [`Hierarchy::detect`].
#[derive(Debug, Clone)]
pub(crate) enum Hierarchy {
    V1(v1::Bases),
    V2(v2::Base),
}

impl Hierarchy {
    /// Finds a hierarchy this process can create attempt cgroups in.
    ///
    /// `root_hint`: a cgroup path (as in `/proc/self/cgroup`, e.g. `/drover`) to use as the
    /// base instead of the detected one; v2 reads it under `/sys/fs/cgroup`, v1 under each
    /// controller's mount point.
    pub(crate) fn detect(root_hint: Option<&Path>) -> Result<Hierarchy, SandboxError> {
        let mountinfo = read("/proc/self/mountinfo", "read")?;
        let own = read("/proc/self/cgroup", "read")?;
        let hierarchy = match host::cgroup_version() {
            CgroupVersion::V2 => Hierarchy::V2(v2::Base::detect(root_hint, &own)?),
            CgroupVersion::V1 => Hierarchy::V1(v1::Bases::detect(root_hint, &mountinfo, &own)?),
            CgroupVersion::None => return Err(SandboxError::NoCgroups),
        };
        hierarchy.probe()?;
        Ok(hierarchy)
    }

    /// Which cgroup version this is.
    pub(crate) fn version(&self) -> CgroupVersion {
        match self {
            Hierarchy::V1(_) => CgroupVersion::V1,
            Hierarchy::V2(_) => CgroupVersion::V2,
        }
    }

    /// Whether a pids limit can be enforced.
    pub(crate) fn has_pids(&self) -> bool {
        match self {
            Hierarchy::V1(b) => b.pids.is_some(),
            Hierarchy::V2(b) => b.pids,
        }
    }

    /// The directories attempt cgroups are created in (one per v1 controller).
    pub(crate) fn bases(&self) -> Vec<&Path> {
        match self {
            Hierarchy::V1(b) => b.dirs(),
            Hierarchy::V2(b) => vec![b.dir.as_path()],
        }
    }

    /// Creates the cgroup `name` (see the module invariants) with `limits`. On failure nothing
    /// is left behind.
    pub(crate) fn create(
        &self,
        name: &str,
        limits: CgroupLimits,
    ) -> Result<AttemptCgroup, CgroupError> {
        match self {
            Hierarchy::V1(b) => b.create(name, limits).map(AttemptCgroup::V1),
            Hierarchy::V2(b) => b.create(name, limits).map(AttemptCgroup::V2),
        }
    }

    /// Creates and removes a child, so a hierarchy we may not write to fails at start-up with
    /// the path and the reason rather than at the first task.
    fn probe(&self) -> Result<(), SandboxError> {
        // Unique per call: several sandboxes may be detected at once (tests do).
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("{NAME_PREFIX}probe-{}-{n}", std::process::id());
        let cgroup = self
            .create(&name, CgroupLimits::default())
            .map_err(|source| SandboxError::CannotCreate { source })?;
        cgroup
            .remove()
            .map_err(|source| SandboxError::CannotCreate { source })
    }

    /// Attempt cgroups left by workers that are no longer running (their pid is in the name),
    /// and probes of dead workers. The caller kills and removes them.
    pub(crate) fn stale(&self) -> Vec<AttemptCgroup> {
        // Every base: a crash half-way through a removal can leave a name in some only.
        let names: std::collections::BTreeSet<String> = self
            .bases()
            .iter()
            .filter_map(|base| fs::read_dir(base).ok())
            .flat_map(|entries| entries.filter_map(Result::ok))
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|name| owner_pid(name).is_some_and(|pid| !process_alive(pid)))
            .collect();
        names.iter().map(|name| self.existing(name)).collect()
    }

    /// The handle of an attempt cgroup that already exists.
    pub(crate) fn existing(&self, name: &str) -> AttemptCgroup {
        match self {
            Hierarchy::V1(b) => AttemptCgroup::V1(b.existing(name)),
            Hierarchy::V2(b) => AttemptCgroup::V2(b.existing(name)),
        }
    }
}

/// One attempt's cgroup (one directory per v1 controller, one on v2).
#[derive(Debug)]
pub(crate) enum AttemptCgroup {
    V1(v1::Group),
    V2(v2::Group),
}

impl AttemptCgroup {
    /// The `cgroup.procs` files a process writes `0` to, to join this cgroup.
    pub(crate) fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs().iter().map(|d| d.join("cgroup.procs")).collect()
    }

    /// The cgroup's directories.
    pub(crate) fn dirs(&self) -> Vec<&Path> {
        match self {
            AttemptCgroup::V1(g) => g.dirs(),
            AttemptCgroup::V2(g) => vec![g.dir.as_path()],
        }
    }

    /// Host pids of every process in the cgroup.
    #[cfg(test)]
    pub(crate) fn pids(&self) -> io::Result<Vec<i32>> {
        match self {
            AttemptCgroup::V1(g) => g.pids(),
            AttemptCgroup::V2(g) => g.pids(),
        }
    }

    /// Kills every process in the cgroup (daemonized ones included: leaving a process group,
    /// a session or the parent does not leave a cgroup) and waits, bounded, until it is empty.
    pub(crate) async fn kill_all(&self) -> Result<(), CgroupError> {
        // Fast path, the common case of a task whose processes have all exited: a process
        // enters an attempt cgroup only by forking from a member (the worker writes the helper
        // in before any task code runs), so an empty cgroup stays empty and there is nothing
        // to freeze or kill. Saves the freeze/thaw writes and polls on every attempt end.
        if self.is_empty() {
            return Ok(());
        }
        match self {
            AttemptCgroup::V1(g) => g.kill_all().await,
            AttemptCgroup::V2(g) => g.kill_all().await,
        }
    }

    /// Best-effort synchronous kill for `Drop`: signals everything once, waits for nothing.
    pub(crate) fn kill_now(&self) {
        match self {
            AttemptCgroup::V1(g) => g.kill_now(),
            AttemptCgroup::V2(g) => g.kill_now(),
        }
    }

    /// Whether no process is left in the cgroup.
    pub(crate) fn is_empty(&self) -> bool {
        match self {
            AttemptCgroup::V1(g) => g.is_empty(),
            AttemptCgroup::V2(g) => g.is_empty(),
        }
    }

    /// The OOM-kill and peak-memory counters (zero / `None` where unreadable).
    pub(crate) fn counters(&self) -> Counters {
        match self {
            AttemptCgroup::V1(g) => g.counters(),
            AttemptCgroup::V2(g) => g.counters(),
        }
    }

    /// Removes the (empty) cgroup, child cgroups a task may have made included.
    pub(crate) fn remove(&self) -> Result<(), CgroupError> {
        for dir in self.dirs() {
            remove_tree(dir)?;
        }
        Ok(())
    }
}

/// `drover-<pid>-...` → pid of the worker that made it.
fn owner_pid(name: &str) -> Option<i32> {
    let rest = name.strip_prefix(NAME_PREFIX)?;
    let rest = rest.strip_prefix("probe-").unwrap_or(rest);
    rest.split('-').next()?.parse().ok()
}

fn process_alive(pid: i32) -> bool {
    // EPERM means it exists but is not ours to signal.
    !matches!(kill(Pid::from_raw(pid), None), Err(Errno::ESRCH))
}

/// A cgroup name for attempt `attempt` of `task`: the module's naming invariant, with the task
/// id reduced to characters that are safe in a path and bounded in length.
pub(crate) fn attempt_name(seq: u64, task: &str, attempt: u32) -> String {
    attempt_name_of(std::process::id(), seq, task, attempt)
}

/// [`attempt_name`] for the worker `owner` (the spawner names cgroups for its worker).
pub(crate) fn attempt_name_of(owner: u32, seq: u64, task: &str, attempt: u32) -> String {
    let task: String = task
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    format!("{NAME_PREFIX}{owner}-{seq}-{task}-a{attempt}")
}

fn read(path: &str, action: &'static str) -> Result<String, SandboxError> {
    fs::read_to_string(path).map_err(|source| SandboxError::Proc {
        action,
        path: PathBuf::from(path),
        source,
    })
}

/// Writes `value` to an existing control file (never creates one).
pub(crate) fn write_control(
    path: &Path,
    value: &str,
    action: &'static str,
) -> Result<(), CgroupError> {
    use std::io::Write;
    fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .map_err(|source| CgroupError {
            action: action.into(),
            path: path.to_path_buf(),
            source,
        })
}

/// What a control file (or any small file that reports its size as 0) holds: an open, one read
/// into a buffer already large enough for the files read at an attempt's end (the largest, v1's
/// `memory.stat`, is about 1.5 KiB), a read that finds the end, and a close. Unlike
/// `fs::read_to_string`, no `statx` for a size hint these files never give, and no
/// reads of 32, 64, 128... bytes while the buffer grows: an attempt's end reads some ten such
/// files on the worker's thread. A longer file is still read whole.
pub(crate) fn read_control(path: impl AsRef<Path>) -> io::Result<String> {
    use std::io::Read;
    let mut text = String::with_capacity(CONTROL_READ_HINT);
    // Through `Take`'s `read`/`read_buf`: not `File`'s own `read_to_string`, which asks for
    // a size hint first.
    fs::File::open(path)?
        .take(u64::MAX)
        .read_to_string(&mut text)?;
    Ok(text)
}

/// The buffer [`read_control`] starts with.
const CONTROL_READ_HINT: usize = 4096;

/// The pids listed in a `cgroup.procs` file.
pub(crate) fn read_pids(procs: &Path) -> io::Result<Vec<i32>> {
    Ok(read_control(procs)?
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect())
}

/// SIGKILL each pid; ones already gone are fine. Never the worker itself (defence in depth: no
/// thread of the worker's is ever in an attempt cgroup; the spawner's warm threads leave theirs
/// before the worker learns of it).
pub(crate) fn kill_pids(pids: &[i32]) {
    let me = std::process::id() as i32;
    for &pid in pids {
        if pid > 0 && pid != me {
            match kill(Pid::from_raw(pid), Signal::SIGKILL) {
                Ok(()) | Err(Errno::ESRCH) => {}
                Err(err) => warn!(pid, %err, "cannot SIGKILL a process of an attempt cgroup"),
            }
        }
    }
}

/// The number in a `key N` line of a flat-keyed file (`memory.events`, `memory.oom_control`).
pub(crate) fn keyed_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// A single number file (`memory.peak`, `memory.max_usage_in_bytes`).
pub(crate) fn read_u64(path: &Path) -> Option<u64> {
    read_control(path)
        .map_err(|err| debug!(path = %path.display(), %err, "cgroup counter unreadable"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Polls `done` with a growing pause (1 ms up to 50 ms) until it holds or `limit` has passed.
pub(crate) async fn poll_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    let mut pause = Duration::from_millis(1);
    loop {
        if done() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// Kills and waits until `is_empty`, re-killing what `pids` lists each round (a process forked
/// between two reads is caught by the next one).
pub(crate) async fn kill_until_empty(
    dir: &Path,
    pids: impl Fn() -> io::Result<Vec<i32>>,
    is_empty: impl Fn() -> bool,
) -> Result<(), CgroupError> {
    let emptied = poll_until(EMPTY_TIMEOUT, || {
        if is_empty() {
            return true;
        }
        if let Ok(p) = pids() {
            kill_pids(&p);
        }
        false
    })
    .await;
    if emptied {
        Ok(())
    } else {
        Err(CgroupError {
            action: "empty (processes survive SIGKILL, e.g. stuck in uninterruptible I/O)".into(),
            path: dir.to_path_buf(),
            source: io::Error::from(io::ErrorKind::TimedOut),
        })
    }
}

/// rmdir `dir` after its sub-directories (child cgroups), deepest first. Already gone is fine.
/// The common case has none: rmdir first, and list the directory only when that fails busy.
fn remove_tree(dir: &Path) -> Result<(), CgroupError> {
    match fs::remove_dir(dir) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(_) => {}
    }
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.filter_map(Result::ok) {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&entry.path())?;
            }
        }
    }
    match fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(CgroupError {
            action: "remove".into(),
            path: dir.to_path_buf(),
            source,
        }),
    }
}

/// mkdir for a new attempt cgroup.
pub(crate) fn make_dir(dir: &Path) -> Result<(), CgroupError> {
    fs::create_dir(dir).map_err(|source| CgroupError {
        action: "create".into(),
        path: dir.to_path_buf(),
        source,
    })
}

/// Removes the directories made so far when creating a cgroup failed half-way.
pub(crate) fn undo(dirs: &[PathBuf]) {
    for dir in dirs.iter().rev() {
        if let Err(err) = fs::remove_dir(dir) {
            warn!(path = %dir.display(), %err, "cannot remove a half-made attempt cgroup");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_owner_and_are_path_safe() {
        let name = attempt_name(7, "t/../x y", 2);
        assert!(name.starts_with(&format!("drover-{}-7-", std::process::id())));
        assert!(name.ends_with("-a2"));
        assert!(!name.contains('/') && !name.contains(' '), "{name}");
        assert_eq!(owner_pid(&name), Some(std::process::id() as i32));
        assert_eq!(owner_pid("drover-probe-42-1"), Some(42));
        assert_eq!(owner_pid("worker"), None);
        assert_eq!(owner_pid("drover-x-1"), None);
        assert!(attempt_name(1, &"x".repeat(500), 1).len() < 120);
    }

    /// Whole, past the buffer it starts with, and from files that give no size (procfs).
    #[test]
    fn control_files_are_read_whole() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let long = tmp.path().join("long");
        let text: String = (0..3 * CONTROL_READ_HINT)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        fs::write(&long, &text).expect("write");
        assert_eq!(read_control(&long).expect("read"), text);
        let empty = tmp.path().join("empty");
        fs::write(&empty, "").expect("write");
        assert_eq!(read_control(&empty).expect("read"), "");
        let status = read_control("/proc/self/status").expect("read");
        assert!(
            status.starts_with("Name:") && status.ends_with('\n'),
            "{status}"
        );
        assert_eq!(
            read_control(tmp.path().join("missing"))
                .expect_err("missing")
                .kind(),
            io::ErrorKind::NotFound
        );
    }

    #[test]
    fn keyed_values() {
        let events = "low 0\nhigh 0\nmax 3\noom 2\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(keyed_value(events, "oom_kill"), Some(1));
        assert_eq!(keyed_value(events, "oom"), Some(2));
        assert_eq!(keyed_value(events, "nope"), None);
        let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 4\n";
        assert_eq!(keyed_value(v1, "oom_kill"), Some(4));
    }
}
