//! A simulated worker host for fault injection: a memory cgroup of the test's own that a worker
//! runs in, standing for the host's memory and for "everything that runs on the host".
//!
//! The worker creates its attempt cgroups under its own cgroup (worker-agent/src/sandbox/cgroup),
//! so a worker started in a [`HostCgroup`] has its tasks inside it too:
//! - with a memory limit, the tasks' memory counts against the host's limit, and the kernel's OOM
//!   killer picks its victim among the worker and its tasks (scenario g of tests/tests/chaos.rs);
//! - [`HostCgroup::kill_all`] kills the worker and every task process at once, as a host that
//!   loses power does (scenario h).
//!
//! Layout, detected once:
//! - cgroup v1 (hybrid hosts like the build machines): `<memory mount>/<the test's own memory
//!   cgroup>/drchaos-<name>`. The worker runs in it directly and its attempt cgroups are its
//!   children. The kernel counts an OOM kill in the victim's own memory cgroup only (v1 events do
//!   not propagate upwards), so the host's `oom_kill` counter counts exactly the kills of the
//!   worker daemon.
//! - cgroup v2: `/sys/fs/cgroup/drchaos-<name>` (a child of the test's own cgroup could not get
//!   the memory controller while the test's processes sit in it). The worker is started with
//!   `INVOCATION_ID` set, as under systemd with `Delegate=yes`: it moves itself into the leaf
//!   `worker` and creates attempt cgroups beside it. The worker's own counter is then
//!   `worker/memory.events`.
//!
//! The name never starts with `drover-`: a worker would take such a cgroup for an attempt cgroup
//! left behind. Dropping the handle kills whatever is left in it and removes it.

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where cgroup file systems are mounted.
const CGROUP_MOUNT: &str = "/sys/fs/cgroup";

/// One simulated host's cgroup; removed on drop.
#[derive(Debug)]
pub struct HostCgroup {
    dir: PathBuf,
    v2: bool,
}

impl HostCgroup {
    /// Create the host cgroup `drchaos-<name>` (see the module doc for where), with a memory
    /// limit of `limit_bytes` (memory and memory+swap) if given.
    pub fn new(name: &str, limit_bytes: Option<u64>) -> Self {
        let mount = Path::new(CGROUP_MOUNT);
        let v1_memory = mount.join("memory");
        let (dir, v2) = if v1_memory.join("memory.limit_in_bytes").exists() {
            let own = std::fs::read_to_string("/proc/self/cgroup").expect("read /proc/self/cgroup");
            let rel = own
                .lines()
                .find_map(|l| {
                    let mut parts = l.splitn(3, ':');
                    let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
                    controllers
                        .split(',')
                        .any(|c| c == "memory")
                        .then(|| path.trim_start_matches('/').to_owned())
                })
                .expect("the test's own memory cgroup in /proc/self/cgroup");
            (v1_memory.join(rel).join(format!("drchaos-{name}")), false)
        } else {
            assert!(
                mount.join("cgroup.controllers").exists(),
                "neither a cgroup v1 memory hierarchy nor cgroup v2 is mounted at {CGROUP_MOUNT}"
            );
            (mount.join(format!("drchaos-{name}")), true)
        };
        let host = HostCgroup { dir, v2 };
        // A leftover of an earlier, aborted run of the same name.
        host.remove();
        std::fs::create_dir(&host.dir)
            .unwrap_or_else(|e| panic!("create {}: {e}", host.dir.display()));
        if let Some(bytes) = limit_bytes {
            let files: &[&str] = if v2 {
                &["memory.max", "memory.swap.max"]
            } else {
                // No swap on the build machines, but where there is, memory+swap must be
                // limited too, or the host pages out instead of running out of memory.
                &["memory.limit_in_bytes", "memory.memsw.limit_in_bytes"]
            };
            for (i, file) in files.iter().enumerate() {
                let path = host.dir.join(file);
                let value = if v2 && i == 1 {
                    "0".to_owned()
                } else {
                    bytes.to_string()
                };
                if i == 0 || path.exists() {
                    std::fs::write(&path, value)
                        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
                }
            }
        }
        host
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether this is cgroup v2.
    pub fn is_v2(&self) -> bool {
        self.v2
    }

    /// The command prefix that starts a program in this cgroup: `sh -c 'echo $$ > procs &&
    /// exec "$@"' procs`, so the pid the test holds is the program's own. Append the program.
    pub fn wrapper(&self) -> Vec<String> {
        vec![
            "sh".into(),
            "-c".into(),
            "echo $$ > \"$0\" && exec \"$@\"".into(),
            self.dir.join("cgroup.procs").display().to_string(),
        ]
    }

    /// Extra environment for a worker started in this cgroup: on v2, `INVOCATION_ID`, so the
    /// worker delegates from its own cgroup as under systemd (see the module doc).
    pub fn worker_env(&self) -> Vec<(&'static str, &'static str)> {
        if self.v2 {
            vec![("INVOCATION_ID", "drover-chaos-host")]
        } else {
            Vec::new()
        }
    }

    /// How many processes the kernel's OOM killer killed in the worker daemon's own cgroup (the
    /// host cgroup itself on v1, its `worker` leaf on v2): 0 while it never fired there.
    pub fn worker_oom_kills(&self) -> u64 {
        let (file, key) = if self.v2 {
            (self.dir.join("worker").join("memory.events"), "oom_kill")
        } else {
            (self.dir.join("memory.oom_control"), "oom_kill")
        };
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.trim().parse().ok())
            .unwrap_or(0)
    }

    /// The host cgroup and every cgroup below it, parents first.
    pub fn cgroups(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut todo = vec![self.dir.clone()];
        while let Some(dir) = todo.pop() {
            if let Ok(entries) = std::fs::read_dir(&dir) {
                todo.extend(
                    entries
                        .flatten()
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .map(|e| e.path()),
                );
            }
            out.push(dir);
        }
        out.sort_by_key(|p| p.components().count());
        out
    }

    /// Names of the cgroups directly below the host cgroup (attempt cgroups, on v2 also
    /// `worker`).
    pub fn children(&self) -> Vec<String> {
        std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().into_string().ok())
            .collect()
    }

    /// Every process in the host cgroup or below it.
    pub fn pids(&self) -> Vec<i32> {
        self.cgroups()
            .iter()
            .filter_map(|d| std::fs::read_to_string(d.join("cgroup.procs")).ok())
            .flat_map(|s| {
                s.lines()
                    .filter_map(|l| l.trim().parse().ok())
                    .collect::<Vec<i32>>()
            })
            .collect()
    }

    /// SIGKILL every process in the host cgroup and below, until none is left (bounded: a
    /// process forking while it is killed shows up in the next sweep). Returns how many
    /// processes were killed.
    pub fn kill_all(&self) -> usize {
        let start = Instant::now();
        let mut killed = std::collections::BTreeSet::new();
        loop {
            let pids = self.pids();
            if pids.is_empty() {
                return killed.len();
            }
            for pid in pids {
                if kill(Pid::from_raw(pid), Signal::SIGKILL).is_ok() {
                    killed.insert(pid);
                }
            }
            assert!(
                start.elapsed() < crate::DEADLINE,
                "processes are still left in {} after SIGKILL",
                self.dir.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kill everything left and remove the cgroups, children first; best effort.
    fn remove(&self) {
        if !self.dir.exists() {
            return;
        }
        let start = Instant::now();
        loop {
            let pids = self.pids();
            if pids.is_empty() || start.elapsed() > crate::DEADLINE {
                break;
            }
            for pid in pids {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for dir in self.cgroups().iter().rev() {
            // An emptied cgroup can still be busy for a moment while the last exit finishes.
            let start = Instant::now();
            while std::fs::remove_dir(dir).is_err() && dir.exists() {
                if start.elapsed() > Duration::from_secs(5) {
                    eprintln!("could not remove the cgroup {}", dir.display());
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

impl Drop for HostCgroup {
    fn drop(&mut self) {
        self.remove();
    }
}
