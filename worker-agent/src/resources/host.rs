//! What the host lets the worker do, probed once at start-up.
//!
//! Owns: the cgroup hierarchy in use (from `/proc/self/mountinfo`), whether the worker can create
//! user/pid/mount/net/uts/ipc namespaces (tried in a forked child), and finding programs on
//! `PATH` (browsers for the `browser` label, `nvidia-smi`). Probes never fail: a probe that cannot
//! run reports "no" and says why at debug level.

use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use drover_protocol::CgroupVersion;
use nix::sched::{unshare, CloneFlags};
use tracing::debug;

/// Where the unified (or, on v1 hosts, the tmpfs of legacy) hierarchy is mounted.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Program names that earn the `browser` label.
const BROWSERS: [&str; 5] = [
    "chromium",
    "chromium-browser",
    "google-chrome",
    "google-chrome-stable",
    "chrome",
];

/// The cgroup hierarchy this worker can limit memory with.
pub(crate) fn cgroup_version() -> CgroupVersion {
    let Ok(mountinfo) = fs::read_to_string("/proc/self/mountinfo") else {
        debug!("cannot read /proc/self/mountinfo; assuming no cgroups");
        return CgroupVersion::None;
    };
    cgroup_version_from(&mountinfo, |mount_point| {
        fs::read_to_string(Path::new(mount_point).join("cgroup.controllers"))
            .map_err(|err| debug!(mount_point, %err, "cannot read cgroup.controllers"))
            .ok()
    })
}

/// Decides from mountinfo text: `V2` when a cgroup2 mount sits at /sys/fs/cgroup and its
/// `cgroup.controllers` (read through `controllers(mount_point)`) lists `memory`; else `V1` when a
/// v1 hierarchy with the memory controller is mounted; else `None`.
pub(crate) fn cgroup_version_from(
    mountinfo: &str,
    controllers: impl Fn(&str) -> Option<String>,
) -> CgroupVersion {
    let mounts: Vec<Mount<'_>> = mountinfo.lines().filter_map(parse_mountinfo_line).collect();
    // A later mount on the same point hides the earlier ones.
    let at_root = mounts.iter().rev().find(|m| m.mount_point == CGROUP_ROOT);
    if let Some(m) = at_root.filter(|m| m.fs_type == "cgroup2") {
        let has_memory = controllers(m.mount_point)
            .is_some_and(|c| c.split_whitespace().any(|name| name == "memory"));
        if has_memory {
            return CgroupVersion::V2;
        }
        debug!("cgroup2 at {CGROUP_ROOT} has no memory controller");
    }
    let v1_memory = mounts
        .iter()
        .any(|m| m.fs_type == "cgroup" && m.super_options.split(',').any(|o| o == "memory"));
    if v1_memory {
        CgroupVersion::V1
    } else {
        debug!("no cgroup hierarchy with a memory controller");
        CgroupVersion::None
    }
}

#[derive(Debug)]
pub(crate) struct Mount<'a> {
    pub(crate) mount_point: &'a str,
    pub(crate) fs_type: &'a str,
    pub(crate) super_options: &'a str,
}

/// `36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue`
/// (see proc(5)): optional fields end at the lone `-`.
pub(crate) fn parse_mountinfo_line(line: &str) -> Option<Mount<'_>> {
    let (left, right) = line.split_once(" - ")?;
    let mount_point = left.split(' ').nth(4)?;
    let mut right = right.split(' ');
    let fs_type = right.next()?;
    let _source = right.next()?;
    let super_options = right.next().unwrap_or("");
    Some(Mount {
        mount_point,
        fs_type,
        super_options,
    })
}

/// Whether a child of this process can create new user, pid, mount, net, uts and ipc namespaces.
/// As root, namespaces without a new user namespace count too (root needs none to isolate).
pub(crate) fn can_create_namespaces() -> bool {
    let Some(true_bin) = find_on_path("true").or_else(|| {
        ["/bin/true", "/usr/bin/true"]
            .iter()
            .map(PathBuf::from)
            .find(|p| is_executable(p))
    }) else {
        debug!("no `true` program to probe namespaces with");
        return false;
    };
    let others = CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWNET
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWIPC;
    match probe_unshare(&true_bin, others | CloneFlags::CLONE_NEWUSER) {
        Ok(()) => return true,
        Err(err) => debug!(%err, "cannot create namespaces with a user namespace"),
    }
    if !nix::unistd::geteuid().is_root() {
        return false;
    }
    match probe_unshare(&true_bin, others) {
        Ok(()) => true,
        Err(err) => {
            debug!(%err, "cannot create namespaces as root without a user namespace");
            false
        }
    }
}

/// Runs `program` in a child that first unshares `flags`; Ok when it exits 0.
/// A fork is needed: CLONE_NEWUSER fails with EINVAL in a multithreaded process such as ours.
fn probe_unshare(program: &Path, flags: CloneFlags) -> io::Result<()> {
    let mut cmd = Command::new(program);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    unshare_before_exec(&mut cmd, flags);
    let status = cmd.status()?;
    if status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "probe child {} exited with {status}",
            program.display()
        )))
    }
}

#[allow(unsafe_code)]
fn unshare_before_exec(cmd: &mut Command, flags: CloneFlags) {
    // SAFETY: the closure runs in the forked child before exec, where only async-signal-safe
    // calls are allowed. It makes one unshare(2) syscall and builds an io::Error from the raw
    // errno (no allocation, no locks); it touches no shared state.
    unsafe {
        cmd.pre_exec(move || {
            unshare(flags).map_err(|errno| io::Error::from_raw_os_error(errno as i32))
        });
    }
}

/// Whether a Chromium-family browser is on `PATH`.
pub(crate) fn has_browser() -> bool {
    match BROWSERS.iter().find_map(|name| find_on_path(name)) {
        Some(path) => {
            debug!(path = %path.display(), "browser found");
            true
        }
        None => false,
    }
}

/// The first executable file called `name` in the directories of `$PATH`.
pub(crate) fn find_on_path(name: &str) -> Option<PathBuf> {
    find_in_path(name, &std::env::var_os("PATH")?)
}

fn find_in_path(name: &str, path_var: &OsStr) -> Option<PathBuf> {
    std::env::split_paths(path_var)
        // An empty entry means the current directory: never trust that for a daemon.
        .filter(|dir| dir.is_absolute())
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const V2: &str = "\
22 28 0:21 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
25 22 0:22 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
28 1 179:2 / / rw,relatime shared:1 - ext4 /dev/mmcblk0p2 rw
";

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    const V1: &str = "\
24 18 0:20 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
27 24 0:23 / /sys/fs/cgroup/systemd rw,nosuid shared:10 - cgroup cgroup rw,xattr,name=systemd
31 24 0:27 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:13 - cgroup cgroup rw,cpu,cpuacct
33 24 0:29 / /sys/fs/cgroup/memory rw,nosuid shared:15 - cgroup cgroup rw,memory
";

    const NONE: &str = "\
22 28 0:21 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
28 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
";

    fn controllers(list: &'static str) -> impl Fn(&str) -> Option<String> {
        move |mount_point| {
            assert_eq!(mount_point, "/sys/fs/cgroup");
            Some(list.to_owned())
        }
    }

    #[test]
    fn cgroup_v2_with_memory() {
        assert_eq!(
            cgroup_version_from(
                V2,
                controllers("cpuset cpu io memory hugetlb pids rdma misc\n")
            ),
            CgroupVersion::V2
        );
    }

    #[test]
    fn cgroup_v2_without_memory_controller() {
        assert_eq!(
            cgroup_version_from(V2, controllers("cpuset cpu io pids\n")),
            CgroupVersion::None
        );
        assert_eq!(cgroup_version_from(V2, |_| None), CgroupVersion::None);
    }

    #[test]
    fn cgroup_hybrid_is_v1() {
        // The unified mount is not at /sys/fs/cgroup, so its controllers are never consulted.
        let never = |_: &str| -> Option<String> { panic!("controllers read on hybrid") };
        assert_eq!(cgroup_version_from(HYBRID, never), CgroupVersion::V1);
    }

    #[test]
    fn cgroup_v1() {
        assert_eq!(cgroup_version_from(V1, |_| None), CgroupVersion::V1);
    }

    #[test]
    fn cgroup_none() {
        assert_eq!(cgroup_version_from(NONE, |_| None), CgroupVersion::None);
        assert_eq!(cgroup_version_from("", |_| None), CgroupVersion::None);
        // A v1 hierarchy without memory does not count.
        let cpu_only = "32 31 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(cgroup_version_from(cpu_only, |_| None), CgroupVersion::None);
    }

    #[test]
    fn mountinfo_line_with_optional_fields() {
        let m = parse_mountinfo_line(
            "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 shared:2 - ext3 /dev/root rw,errors=continue",
        )
        .expect("parsed");
        assert_eq!(
            (m.mount_point, m.fs_type, m.super_options),
            ("/mnt2", "ext3", "rw,errors=continue")
        );
        assert!(parse_mountinfo_line("garbage").is_none());
    }

    #[test]
    fn path_search_needs_executable_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bin = dir.path().join("bin");
        let other = dir.path().join("other");
        fs::create_dir_all(&bin).expect("mkdir");
        fs::create_dir_all(other.join("chromium")).expect("mkdir"); // a directory: not a program
        fs::write(bin.join("chrome"), "").expect("write");
        fs::write(bin.join("chromium"), "").expect("write");
        fs::set_permissions(bin.join("chromium"), fs::Permissions::from_mode(0o755))
            .expect("chmod");
        fs::set_permissions(bin.join("chrome"), fs::Permissions::from_mode(0o644)).expect("chmod");
        let path_var = std::env::join_paths([&other, &bin]).expect("join");
        assert_eq!(
            find_in_path("chromium", &path_var),
            Some(bin.join("chromium"))
        );
        assert_eq!(find_in_path("chrome", &path_var), None);
        assert_eq!(find_in_path("chromium", OsStr::new("")), None);
    }

    #[test]
    fn namespace_probe_answers() {
        // Whether namespaces are allowed depends on where the tests run (a container without
        // CAP_SYS_ADMIN says no), so only check that the probe answers and leaves no child.
        let first = can_create_namespaces();
        assert_eq!(can_create_namespaces(), first);
    }
}
