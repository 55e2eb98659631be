//! The forked side of an attempt: everything that runs between `fork` and `exec`.
//!
//! The processes here are forked from the spawner (a multi-threaded process: see the
//! `spawner` module) or, where it cannot, from the worker, so they may only make
//! async-signal-safe calls until they exec (another thread may have held the allocator's lock
//! at the fork). This module therefore works from a [`ChildPlan`] prepared completely
//! beforehand (every path, argv, envp and id map as C data, the helpers' stacks) and makes raw
//! syscalls only: no allocation, no locks, no panics, no `std` I/O. All of the crate's `unsafe`
//! for the sandbox lives here.
//!
//! Processes (sandbox isolation):
//! ```text
//! spawner ─fork→ S (host pid ns): (cgroup), unshare(user?, mnt, uts, ipc, net?, pid, cgroup),
//!         │        make / private, set hostname; sleeps until I is gone, reports its status
//!         └─vfork→ I (pid 1 of the new pid ns, init; shares S's memory and descriptors):
//!                  │ builds the task's file system view (below); reaps orphans; when the
//!                  │ task exits, reports its wait status and exits — the kernel then
//!                  │ SIGKILLs everything left in the pid namespace
//!                  └─vfork→ T (pid 2; shares I's memory until exec): setsid, drop
//!                           capabilities, no_new_privs, chdir, exec
//! ```
//! "vfork" is `clone(CLONE_VM | CLONE_VFORK)` ([`vm_child`]): one copy of memory per attempt
//! (S's, of the spawner's), none for I and T. On cgroup v1 hosts, while sandboxed attempts
//! come at least 10 ms apart, S is instead a standby helper: the worker binary exec'd ahead in
//! the warm cgroup, which receives its plan and then runs [`run`] as the fork would (see the
//! `standby` module and [`start_standby`]). Such a helper started after a sandboxed attempt
//! makes that attempt's namespaces and file system view before its own attempt exists
//! ([`run_prepared`]: S unshares, I is then a fork of S sharing its descriptor table, and
//! builds steps 1-4 below and the kept files of step 5); when the plan comes, I binds the
//! workspace and starts T. The task is not pid 1 on purpose: pid 1 ignores
//! signals it has no handler for, so a task's `kill -TERM $$` would do nothing. With process
//! isolation the first process is T: it makes its own process group and execs (and is
//! vforked itself when its pids limit allows, see the `spawner` module).
//!
//! The task's file system view, built by I in its mount namespace (see [`SandboxSetup`]):
//! 1. open (O_PATH) everything that is bound back later — the workspace, kept files, the few
//!    device nodes — before anything covers it;
//! 2. the whole inherited tree becomes read-only, nosuid and nodev in one `mount_setattr`
//!    (recursive, Linux 5.12+): the task can write nowhere on the host's file systems, and a
//!    block device node anywhere cannot be opened;
//! 3. a new /proc (its machine-wide parts read-only or hidden, as Docker does) and /sys; a new /dev (read-only tmpfs with null, zero, full, random, urandom
//!    and tty bound in, its own devpts and /dev/shm);
//! 4. masks: an empty tmpfs over each private directory (read-only, or the writable /tmp), the
//!    null device over each private file;
//! 5. rebinds: the workspace, writable, at its own path (inside a mask the path is recreated
//!    first), and kept files read-only.
//!
//! File descriptors in every helper: 0-2 stdio (/dev/null and the output pipes, moved there
//! first thing), [`EVENTS_FD`] the events pipe (the
//! only one the task inherits besides stdio), 4 the setup pipe (close-on-exec: it reaches EOF in
//! the parent once the task has exec'd, or carries an error record), 5 the status pipe (S and I
//! only), 6 a socket to the worker (S only, `network = proxy`), 7 the spawner's go pipe and 8
//! the attempt's `pids.max` (until the limit is written; see [`PidsOnceAlone`]), 9 the network
//! namespace made ahead (until joined) and 10 a prepared attempt's confirm pipe (T reads it
//! right before its exec; see [`ChildPlan::confirm_fd`]). Everything else inherited is closed
//! first thing.
//!
//! With `network = proxy`, S brings up `lo` in the new network namespace, listens on
//! 127.0.0.1:3128 there, and sends that listening socket to the worker over fd 6 (SCM_RIGHTS)
//! before the task exists: the worker's egress proxy serves it from outside, and the
//! namespace has no other way out.
//!
//! Records on the setup and status pipes are [`RECORD_LEN`] bytes: a tag, a step, an index, a
//! pad byte, then an i32 (errno or wait status) in little endian.

#![allow(unsafe_code)]

use std::ffi::{CStr, CString};
use std::fmt;
use std::io;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::ptr;

use nix::errno::Errno;
use nix::libc::{self, c_char, c_int, c_void};

use super::standby::View;

/// The task's events pipe (its `DROVER_EVENTS_FD`).
pub(crate) const EVENTS_FD: RawFd = 3;
const SETUP_FD: RawFd = 4;
const STATUS_FD: RawFd = 5;
const PROXY_FD: RawFd = 6;
/// The go pipe of [`PidsOnceAlone`], until it has been read.
const GO_FD: RawFd = 7;
/// `pids.max` of [`PidsOnceAlone`], open until written.
const PIDS_MAX_FD: RawFd = 8;
/// The network namespace of [`SandboxSetup::net_ns`], until joined.
const NETNS_FD: RawFd = 9;
/// The confirm pipe of [`ChildPlan::confirm_fd`] (close-on-exec).
const CONFIRM_FD: RawFd = 10;
/// Most paths an attempt binds back over its masks (the workspace and kept files).
pub(crate) const MAX_REBINDS: usize = 4;
/// Device nodes of the sandbox's /dev, bound from the host's; [`NULL_DEVICE`] also masks files.
const DEVICES: [&CStr; 6] = [
    c"/dev/null",
    c"/dev/zero",
    c"/dev/full",
    c"/dev/random",
    c"/dev/urandom",
    c"/dev/tty",
];
const NULL_DEVICE: usize = 0;
/// Parts of the sandbox's /proc that reach the whole machine, made read-only (as Docker does):
/// global sysctls, the magic SysRq trigger, IRQ affinity, ...
const PROC_READ_ONLY: [&CStr; 5] = [
    c"/proc/sys",
    c"/proc/sysrq-trigger",
    c"/proc/irq",
    c"/proc/bus",
    c"/proc/fs",
];
/// Files of /proc that show kernel memory or other machine-wide state, covered by the null
/// device (missing ones are skipped).
const PROC_HIDDEN: [&CStr; 5] = [
    c"/proc/kcore",
    c"/proc/keys",
    c"/proc/timer_list",
    c"/proc/sched_debug",
    c"/proc/latency_stats",
];
/// Symbolic links of the sandbox's /dev.
const DEV_LINKS: [(&CStr, &CStr); 5] = [
    (c"/proc/self/fd", c"/dev/fd"),
    (c"/proc/self/fd/0", c"/dev/stdin"),
    (c"/proc/self/fd/1", c"/dev/stdout"),
    (c"/proc/self/fd/2", c"/dev/stderr"),
    (c"pts/ptmx", c"/dev/ptmx"),
];
/// Scratch copies are made at or above this, clear of the fixed numbers.
const SCRATCH_FD: RawFd = 11;

/// Bytes per record on the setup and status pipes.
pub(crate) const RECORD_LEN: usize = 8;
const TAG_ERROR: u8 = b'E';
const TAG_TASK: u8 = b'X';
const TAG_INIT: u8 = b'I';

/// Exit codes of the helper processes (never reported as the task's).
const EXIT_SETUP: c_int = 126;
const EXIT_EXEC: c_int = 127;

/// Everything the forked side needs, prepared by the worker and carried to the spawner (see
/// the `spawner` module), whose fork runs it. Descriptor fields hold the worker's numbers until
/// the spawner replaces them with its own (they travel with SCM_RIGHTS).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct ChildPlan {
    /// `cgroup.procs` files to write `0` to.
    pub(crate) cgroup_procs: Vec<CString>,
    pub(crate) workspace: CString,
    /// Paths to try `execve` on, in order (the PATH search, done in the sandbox's view).
    pub(crate) candidates: Vec<CString>,
    pub(crate) argv: CArray,
    pub(crate) envp: CArray,
    /// The task's stdin (/dev/null), stdout and stderr (pipe write ends), moved to 0, 1, 2.
    pub(crate) stdio: [RawFd; 3],
    /// Parent's numbers of the pipe write ends.
    pub(crate) setup_fd: RawFd,
    pub(crate) events_fd: RawFd,
    /// Present with sandbox isolation.
    pub(crate) status_fd: Option<RawFd>,
    /// The worker's end is kept; S sends the proxy's listening socket over this one
    /// (`network = proxy` only).
    pub(crate) proxy_fd: Option<RawFd>,
    /// Present when a warm thread forks this process in its cgroup and a pids limit applies:
    /// see [`PidsOnceAlone`].
    pub(crate) pids_once_alone: Option<PidsOnceAlone>,
    /// A prepared attempt's confirm pipe (the worker keeps the write end): the task, its
    /// sandbox all built, waits for a byte on it right before it execs; EOF instead means the
    /// attempt was dropped unconfirmed ([`Step::Confirm`]). Sandbox isolation only.
    pub(crate) confirm_fd: Option<RawFd>,
    /// `None`: process isolation.
    pub(crate) sandbox: Option<SandboxSetup>,
    /// Stacks of the sandbox's init and of the task until its exec, which share the outer
    /// helper's memory: made by whoever forks the outer helper (set with `sandbox`), so that no
    /// helper allocates.
    #[serde(skip)]
    pub(crate) stacks: Option<Stacks>,
    /// Set by the spawner on the plans it forks: its signal dispositions are all default but
    /// [`SPAWNER_IGNORED`], so a child has only those to restore (5 calls instead of 62).
    /// Unset, the child resets every signal (the worker's handlers are installed).
    #[serde(skip)]
    pub(crate) from_spawner: bool,
}

/// Bytes of each helper stack (see [`Stacks::helpers`]): the init and the task's set-up keep
/// small frames.
const HELPER_STACK: usize = 128 * 1024;

/// Stacks for children started with `clone` on memory of ours, mapped fresh and never
/// touched here: a child faults in only the few pages it uses, and a fork copies no page
/// table entries for them. (A zeroed heap buffer cost 64 page faults before every sandbox
/// fork, and its pages then had to be copied by the fork.) Each stack sits above a guard page,
/// so an overflow faults instead of writing over its neighbour.
pub(crate) struct Stacks {
    base: *mut u8,
    len: usize,
    each: usize,
}

/// Size of the inaccessible page below each stack.
const GUARD: usize = 4096;

impl Stacks {
    /// The two stacks of a sandbox's helpers: 0 for the init, 1 for the task until its exec.
    pub(crate) fn helpers() -> io::Result<Stacks> {
        Stacks::new(2, HELPER_STACK)
    }

    pub(crate) fn new(count: usize, bytes: usize) -> io::Result<Stacks> {
        let each = GUARD + bytes.next_multiple_of(GUARD);
        let len = count * each;
        // SAFETY: a fresh anonymous mapping; no existing memory is named.
        let base = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let stacks = Stacks {
            base: base.cast::<u8>(),
            len,
            each,
        };
        for i in 0..count {
            // SAFETY: the guard page lies inside the mapping made above.
            let guarded = unsafe {
                libc::mprotect(
                    stacks.base.add(i * each).cast::<c_void>(),
                    GUARD,
                    libc::PROT_NONE,
                )
            };
            if guarded < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(stacks)
    }

    /// The top of stack `i`, 16-byte aligned: stacks grow down.
    fn top(&self, i: usize) -> *mut c_void {
        let top = self.base as usize + (i + 1) * self.each;
        (top & !15) as *mut c_void
    }
}

impl Drop for Stacks {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, of this length; no child runs on it any more
        // (its owner outlives them).
        unsafe { libc::munmap(self.base.cast::<c_void>(), self.len) };
    }
}

// SAFETY: the memory is only written by helper processes, each on its own stack, while the
// process that made it waits (vfork) or in a copy of its memory; nothing here reads it.
unsafe impl Send for Stacks {}
// SAFETY: as above: `&Stacks` hands out nothing but addresses.
unsafe impl Sync for Stacks {}

impl fmt::Debug for Stacks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Stacks({} bytes)", self.len)
    }
}

/// The pids limit of a warm spawn (`warm` module), set by the attempt's own processes: the
/// spawner thread that forked them still counts in the cgroup at first, so the limit can only
/// be exact once that thread is gone. The spawner writes a byte to the `go` pipe once it is (it
/// joined the thread and saw its id leave the cgroup). The task's process waits for that byte
/// and writes the limit before it execs; in a sandbox the init does, just before it forks the
/// task, so the sandbox's set-up overlaps the wait. No task code runs before.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct PidsOnceAlone {
    /// The attempt's `pids.max`, and what to write there.
    pub(crate) max: CString,
    pub(crate) value: Vec<u8>,
    /// Read end of the spawner's go pipe (the spawner's number; moved to [`GO_FD`]).
    pub(crate) go: RawFd,
}

/// The namespace part of a [`ChildPlan`].
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct SandboxSetup {
    pub(crate) unshare_flags: c_int,
    /// A network namespace made ahead (the spawner's `netns` pool) to join instead of making
    /// one (then `unshare_flags` lacks `CLONE_NEWNET`): the spawner's number, moved to
    /// [`NETNS_FD`].
    pub(crate) net_ns: Option<RawFd>,
    /// `network = proxy`: bring up `lo`, listen on 127.0.0.1:`proxy_port`, send the socket.
    pub(crate) proxy_port: Option<u16>,
    /// `/proc/self/uid_map` and `gid_map` contents when a user namespace is made.
    pub(crate) id_maps: Option<(Vec<u8>, Vec<u8>)>,
    pub(crate) hostname: Vec<u8>,
    pub(crate) sys: SysMount,
    /// What covers the host's tree, outermost only (none is inside another), in order.
    pub(crate) masks: Vec<Mask>,
    /// What is bound back over the masks; the first is the workspace (writable). At most
    /// [`MAX_REBINDS`].
    pub(crate) rebinds: Vec<Rebind>,
}

/// One path covered in the sandbox.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Mask {
    pub(crate) path: CString,
    pub(crate) kind: MaskKind,
    /// Paths to create in the covering tmpfs (before it turns read-only) so that rebinds have
    /// a target: outermost first, `true` for a directory, `false` for an empty file.
    pub(crate) creates: Vec<(CString, bool)>,
}

/// How a [`Mask`] covers its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) enum MaskKind {
    /// A writable tmpfs, mode 1777 (the private /tmp).
    Scratch,
    /// An empty tmpfs, read-only once its `creates` exist.
    Empty,
    /// The null device bound over a file.
    File,
}

/// A path bound back into the sandbox from the host.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Rebind {
    pub(crate) path: CString,
    pub(crate) writable: bool,
}

/// What the sandbox's /sys becomes; read-only in both mounting cases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) enum SysMount {
    /// A new sysfs, so /sys/class/net shows the sandbox's own network namespace.
    Fresh,
    /// The host's sysfs bound without its sub-mounts (the host's network namespace).
    Rebind,
    /// The host's /sys as it is (a user namespace with the host's network may do neither).
    Keep,
}

/// A NULL-terminated array of C strings for `execve`.
pub(crate) struct CArray {
    owned: Vec<CString>,
    ptrs: Vec<*const c_char>,
}

impl CArray {
    pub(crate) fn new(owned: Vec<CString>) -> CArray {
        let mut ptrs: Vec<*const c_char> = owned.iter().map(|s| s.as_ptr()).collect();
        ptrs.push(ptr::null());
        CArray { owned, ptrs }
    }

    fn as_ptr(&self) -> *const *const c_char {
        self.ptrs.as_ptr()
    }
}

impl serde::Serialize for CArray {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.owned.serialize(s)
    }
}

impl<'de> serde::Deserialize<'de> for CArray {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Vec::<CString>::deserialize(d).map(CArray::new)
    }
}

impl fmt::Debug for CArray {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(&self.owned).finish()
    }
}

// SAFETY: `ptrs` point into the heap buffers of `owned`, which is never modified after
// construction; moving a CString does not move its buffer. The array is only read.
unsafe impl Send for CArray {}
// SAFETY: as above; shared access is read-only.
unsafe impl Sync for CArray {}

/// Setup steps, as reported in error records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Step {
    JoinCgroup = 1,
    Setpgid,
    Unshare,
    Setgroups,
    UidMap,
    GidMap,
    MountPrivate,
    Hostname,
    ForkInit,
    MountProc,
    MountSys,
    OpenWorkspace,
    MountTmp,
    MkdirWorkspace,
    BindWorkspace,
    ForkTask,
    Setsid,
    NoNewPrivs,
    Chdir,
    Exec,
    DropCaps,
    ReadOnly,
    MountDev,
    Mask,
    Loopback,
    ProxySocket,
    PidsLimit,
    JoinNetwork,
    Confirm,
}

impl Step {
    const ALL: [Step; 29] = [
        Step::JoinCgroup,
        Step::Setpgid,
        Step::Unshare,
        Step::Setgroups,
        Step::UidMap,
        Step::GidMap,
        Step::MountPrivate,
        Step::Hostname,
        Step::ForkInit,
        Step::MountProc,
        Step::MountSys,
        Step::OpenWorkspace,
        Step::MountTmp,
        Step::MkdirWorkspace,
        Step::BindWorkspace,
        Step::ForkTask,
        Step::Setsid,
        Step::NoNewPrivs,
        Step::Chdir,
        Step::Exec,
        Step::DropCaps,
        Step::ReadOnly,
        Step::MountDev,
        Step::Mask,
        Step::Loopback,
        Step::ProxySocket,
        Step::PidsLimit,
        Step::JoinNetwork,
        Step::Confirm,
    ];

    fn from_u8(v: u8) -> Option<Step> {
        Step::ALL.into_iter().find(|s| *s as u8 == v)
    }

    /// What the step does, with its paths, for an error message ("cannot <this>").
    /// `masks` and `rebinds` are the paths of the plan's [`Mask`]s and [`Rebind`]s.
    pub(crate) fn describe(
        self,
        index: u8,
        cgroup_procs: &[PathBuf],
        workspace: &Path,
        masks: &[PathBuf],
        rebinds: &[PathBuf],
    ) -> String {
        let ws = workspace.display();
        let nth = |paths: &[PathBuf]| {
            paths
                .get(usize::from(index))
                .map_or_else(|| "?".to_owned(), |p| p.display().to_string())
        };
        match self {
            Step::JoinCgroup => match cgroup_procs.get(usize::from(index)) {
                Some(p) => format!("join the attempt cgroup (write 0 to {})", p.display()),
                None => "join the attempt cgroup".to_owned(),
            },
            Step::Setpgid => "make a process group (setpgid)".to_owned(),
            Step::Unshare => "create namespaces (unshare)".to_owned(),
            Step::Setgroups => "write /proc/self/setgroups".to_owned(),
            Step::UidMap => "write /proc/self/uid_map".to_owned(),
            Step::GidMap => "write /proc/self/gid_map".to_owned(),
            Step::MountPrivate => {
                "make the mount tree private (mount --make-rprivate /)".to_owned()
            }
            Step::Hostname => "set the sandbox's hostname".to_owned(),
            Step::ForkInit => "fork the sandbox's init".to_owned(),
            Step::MountProc => "mount a new proc on /proc".to_owned(),
            Step::MountSys => "mount a new sysfs on /sys".to_owned(),
            Step::OpenWorkspace => format!("open {} to bind it into the sandbox", nth(rebinds)),
            Step::MountTmp => format!("mount a tmpfs over {}", nth(masks)),
            Step::MkdirWorkspace => {
                format!("recreate the path of {} in the tmpfs over it", nth(rebinds))
            }
            Step::BindWorkspace => format!("bind {} back into the sandbox", nth(rebinds)),
            Step::ReadOnly => "make the host's file systems read-only, nosuid and nodev for the \
                               task (mount_setattr; needs Linux 5.12 or later)"
                .to_owned(),
            Step::MountDev => "build the sandbox's /dev (tmpfs, device binds, devpts)".to_owned(),
            Step::Mask => format!("hide {} (bind the null device over it)", nth(masks)),
            Step::ForkTask => "fork the task".to_owned(),
            Step::Setsid => "start a session (setsid)".to_owned(),
            Step::NoNewPrivs => "set no_new_privs".to_owned(),
            Step::Chdir => format!("enter the workspace {ws}"),
            Step::Exec => "exec the command".to_owned(),
            Step::DropCaps => {
                "drop capabilities (the worker needs CAP_SETPCAP for that)".to_owned()
            }
            Step::Loopback => "bring up lo in the sandbox's network namespace".to_owned(),
            Step::ProxySocket => {
                "make the egress proxy's socket on 127.0.0.1 in the sandbox and hand it to the worker"
                    .to_owned()
            }
            Step::JoinNetwork => {
                "join the network namespace made ahead for the attempt (setns)".to_owned()
            }
            Step::Confirm => {
                "wait for the coordinator to confirm the attempt (it was dropped unconfirmed)"
                    .to_owned()
            }
            Step::PidsLimit => {
                "set the attempt's pids limit once the spawner thread that forked it has left \
                 the cgroup (pids.max)"
                    .to_owned()
            }
        }
    }
}

/// A record read back from a setup or status pipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Record {
    /// A setup step failed.
    Error {
        step: Option<Step>,
        index: u8,
        errno: Errno,
    },
    /// The task's raw wait status, from the sandbox's init.
    Task(c_int),
    /// The init's raw wait status, from the outer helper.
    Init(c_int),
}

/// Whole records in `bytes` (a trailing fragment is ignored; records are written atomically).
pub(crate) fn parse_records(bytes: &[u8]) -> Vec<Record> {
    bytes
        .chunks_exact(RECORD_LEN)
        .filter_map(|r| {
            let value = c_int::from_le_bytes([r[4], r[5], r[6], r[7]]);
            match r[0] {
                TAG_ERROR => Some(Record::Error {
                    step: Step::from_u8(r[1]),
                    index: r[2],
                    errno: Errno::from_raw(value),
                }),
                TAG_TASK => Some(Record::Task(value)),
                TAG_INIT => Some(Record::Init(value)),
                _ => None,
            }
        })
        .collect()
}

/// fork(2) through glibc (its fork handlers keep malloc usable in the child of a multi-threaded
/// process): `Ok(0)` in the child, which must then keep to what the `spawner` module allows.
pub(crate) fn fork_process() -> Result<libc::pid_t, Errno> {
    // SAFETY: fork has no memory arguments; what the child does is the caller's contract.
    Errno::result(unsafe { libc::fork() })
}

/// Turns the freshly forked spawner into a process of its own: default signal dispositions
/// (the worker's handlers would write to its descriptors), Ctrl-C, SIGTERM, SIGHUP, SIGQUIT
/// and SIGPIPE ignored (they are the worker's to act on; the spawner goes when its socket
/// closes), no blocked signals, its socket moved to `to` (close-on-exec) and every other
/// descriptor but stdio closed.
pub(crate) fn become_spawner(sock: RawFd, to: RawFd) -> Result<(), Errno> {
    reset_signal_dispositions();
    set_disposition(&SPAWNER_IGNORED, libc::SIG_IGN);
    // SAFETY: a zeroed sigset is valid input for sigemptyset; then an empty mask is set.
    unsafe {
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, ptr::null_mut());
    }
    if sock != to {
        // SAFETY: plain fd syscall.
        Errno::result(unsafe { libc::dup3(sock, to, libc::O_CLOEXEC) })?;
    }
    close_range((to + 1) as u32, u32::MAX);
    Ok(())
}

/// Forks the calling thread with `CLONE_PARENT`: the child's parent is this process's parent
/// (the spawner's: the worker, which waits for it). `Ok(0)` in the child, the child's pid in
/// the caller.
pub(crate) fn fork_for_parent() -> Result<libc::pid_t, Errno> {
    let flags = (libc::CLONE_PARENT | libc::SIGCHLD) as libc::c_ulong;
    // SAFETY: clone without CLONE_VM is a fork; the other arguments (stack, tids, TLS) are
    // unused without their flags. glibc's fork handlers do not run, so the child may only make
    // async-signal-safe calls until it execs or exits — which is all [`run`] does.
    let r = unsafe { libc::syscall(libc::SYS_clone, flags, 0usize, 0usize, 0usize, 0usize) };
    Errno::result(r).map(|pid| pid as libc::pid_t)
}

/// Stack of a [`vfork_for_parent`] child until it execs: [`run`] keeps its buffers small.
const VFORK_STACK: usize = 128 * 1024;

/// Like [`fork_for_parent`], but the child shares the caller's memory until it execs, and the
/// calling thread sleeps until then (`CLONE_VM | CLONE_VFORK`, as posix_spawn does): no page
/// tables are copied and none of the caller's pages is write-protected, so nothing faults
/// afterwards. Only for a plan whose first process execs (process isolation): the sandbox's
/// outer helper lives on without exec'ing, and the caller would sleep as long.
///
/// The child runs [`run`] on a stack of its own; it writes nothing else of the caller's memory
/// but the calling thread's errno, and that thread is asleep until the exec.
pub(crate) fn vfork_for_parent(plan: &ChildPlan) -> Result<libc::pid_t, Errno> {
    extern "C" fn start(arg: *mut c_void) -> c_int {
        // SAFETY: `arg` is the `&ChildPlan` passed below, alive until the caller wakes, which
        // is after this process has exec'd or exited.
        let plan = unsafe { &*(arg as *const ChildPlan) };
        run(plan)
    }
    // SAFETY: `start` never returns into the caller's frames (it execs or _exits) and only
    // reads `plan`, which outlives the call.
    unsafe { vfork_parent_child(start, plan as *const ChildPlan as *mut c_void) }
}

/// `clone(CLONE_VM | CLONE_VFORK | CLONE_PARENT)` of `f(arg)` on a stack from
/// [`VFORK_STACKS`]; returns once the child has exec'd or exited.
///
/// # Safety
/// `f` must exec or `_exit`, never return into the caller's frames, and write no memory of
/// the caller's but its own stack, errno and what `arg` lets it; `arg` must outlive the call.
unsafe fn vfork_parent_child(
    f: extern "C" fn(*mut c_void) -> c_int,
    arg: *mut c_void,
) -> Result<libc::pid_t, Errno> {
    let free = || VFORK_STACKS.lock().unwrap_or_else(|e| e.into_inner());
    let stack = match free().pop() {
        Some(stack) => stack,
        None => Stacks::new(1, VFORK_STACK)
            .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::ENOMEM)))?,
    };
    let top = stack.top(0);
    let flags = libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_PARENT | libc::SIGCHLD;
    // SAFETY: per this function's contract; `stack` outlives the call, which returns only
    // once the child has exec'd or exited.
    let pid = unsafe { libc::clone(f, top, flags, arg) };
    // The child has exec'd or exited: its stack is free for the next one.
    let mut free = free();
    if free.len() < VFORK_STACKS_KEPT {
        free.push(stack);
    }
    Errno::result(pid)
}

/// The descriptor a standby helper waits on for its plan (see the `standby` module).
pub(crate) const STANDBY_FD: RawFd = 3;

/// What a standby helper's vforked child needs to exec (see [`start_standby`]).
struct StandbyExec<'a> {
    exe: &'a CStr,
    argv: [*const c_char; 3],
    envp: [*const c_char; 1],
    sock: RawFd,
    /// Set by the child when its exec failed.
    errno: std::sync::atomic::AtomicI32,
}

/// Starts a standby helper (see the `standby` module) in the calling thread's cgroups, as a
/// child of this process's parent (`CLONE_PARENT`: the worker, which reaps it): a vforked
/// child moves `sock` to [`STANDBY_FD`], closes every other descriptor but stdio and execs
/// `exe` with `argv0` and `arg`, an empty environment and the spawner's signal dispositions
/// (what it ignores stays ignored across the exec). Returns its pid once it has exec'd; when
/// the exec failed, the errno and the pid of the child, which has exited and is the worker's
/// to reap.
pub(crate) fn start_standby(
    exe: &CStr,
    argv0: &CStr,
    arg: &CStr,
    sock: RawFd,
) -> Result<libc::pid_t, (Errno, Option<libc::pid_t>)> {
    extern "C" fn start(arg: *mut c_void) -> c_int {
        // SAFETY: `arg` is the `StandbyExec` below, alive until the caller wakes.
        let s = unsafe { &*(arg as *const StandbyExec<'_>) };
        // SAFETY: plain fd syscalls on this child's own descriptor table, then the exec.
        let errno = unsafe {
            let moved = if s.sock == STANDBY_FD {
                libc::fcntl(STANDBY_FD, libc::F_SETFD, 0)
            } else {
                libc::dup2(s.sock, STANDBY_FD)
            };
            if moved < 0 {
                Errno::last_raw()
            } else {
                close_range((STANDBY_FD + 1) as u32, u32::MAX);
                libc::execve(s.exe.as_ptr(), s.argv.as_ptr(), s.envp.as_ptr());
                Errno::last_raw()
            }
        };
        s.errno
            .store(errno.max(1), std::sync::atomic::Ordering::Relaxed);
        exit(EXIT_EXEC)
    }
    let s = StandbyExec {
        exe,
        argv: [argv0.as_ptr(), arg.as_ptr(), ptr::null()],
        envp: [ptr::null()],
        sock,
        errno: std::sync::atomic::AtomicI32::new(0),
    };
    // SAFETY: `start` execs or _exits and writes only `s.errno`; `s` outlives the call.
    let pid = unsafe { vfork_parent_child(start, &s as *const StandbyExec<'_> as *mut c_void) }
        .map_err(|e| (e, None))?;
    match s.errno.load(std::sync::atomic::Ordering::Relaxed) {
        0 => Ok(pid),
        errno => Err((Errno::from_raw(errno), Some(pid))),
    }
}

/// Stacks of [`vfork_for_parent`] children, reused: mapping a fresh one per spawn costs an
/// mmap, page faults in the child and a munmap.
static VFORK_STACKS: std::sync::Mutex<Vec<Stacks>> = std::sync::Mutex::new(Vec::new());

/// How many free [`VFORK_STACKS`] are kept: one per concurrent spawn (warm cgroups).
const VFORK_STACKS_KEPT: usize = 8;

/// A new network namespace, returned as a descriptor, made by the calling thread (which is
/// back in `home` afterwards): for the spawner's pool of namespaces made ahead. Its only
/// interface is `lo`, down, as in a namespace the sandbox makes itself.
pub(crate) fn make_netns(home: std::os::fd::BorrowedFd<'_>) -> Result<std::os::fd::OwnedFd, Errno> {
    use std::os::fd::AsRawFd;
    // SAFETY: unshare and setns change only this thread's network namespace.
    Errno::result(unsafe { libc::unshare(libc::CLONE_NEWNET) })?;
    // SAFETY: a valid NUL-terminated path.
    let made = Errno::result(unsafe {
        libc::open(
            c"/proc/thread-self/ns/net".as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        )
    });
    // SAFETY: as above; back home whatever happened.
    let back = Errno::result(unsafe { libc::setns(home.as_raw_fd(), libc::CLONE_NEWNET) });
    let made = owned_fd(made?);
    back?;
    Ok(made)
}

/// Starts helper `f(plan)` with [`vm_child`] on the plan's stack `stack`; its pid, or the
/// attempt fails at `step`.
fn start_helper(
    plan: &ChildPlan,
    stack: usize,
    files: bool,
    f: extern "C" fn(*mut c_void) -> c_int,
    step: Step,
) -> libc::pid_t {
    let Some(stacks) = &plan.stacks else {
        fail(step, 1, Errno::EFAULT)
    };
    let arg = plan as *const ChildPlan as *mut c_void;
    match vm_child(stacks.top(stack), files, f, arg) {
        Ok(pid) => pid,
        Err(errno) => fail(step, 0, errno),
    }
}

/// Starts `f(arg)` in a child that shares this process's memory — and, with `files`, its
/// descriptor table — on the stack whose top is `stack`; the calling thread sleeps until the
/// child execs or exits (`CLONE_VM | CLONE_VFORK`). No page tables are copied and nothing of
/// the caller's is write-protected. The child must not return into the caller's frames, and
/// writes the caller's memory only on its own stack and through errno (the caller is asleep).
///
/// Not glibc's fork: that takes malloc's locks first, and in a helper forked from the
/// multi-threaded spawner one of them may be held forever (copied from a thread that held it);
/// `sandbox_spawns_in_a_row_never_hang` caught that. clone runs no fork handlers.
fn vm_child(
    stack: *mut c_void,
    files: bool,
    f: extern "C" fn(*mut c_void) -> c_int,
    arg: *mut c_void,
) -> Result<libc::pid_t, Errno> {
    let mut flags = libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD;
    if files {
        flags |= libc::CLONE_FILES;
    }
    // SAFETY: per the contract above; `stack` is the top of memory that outlives the child's
    // use of it (the helpers' stacks live as long as the plan, which outlives the attempt's
    // helpers in their memory).
    Errno::result(unsafe { libc::clone(f, stack, flags, arg) })
}

/// Runs in the forked child, in place of its exec. Never returns: it execs the task or
/// `_exit`s (after an error record).
pub(crate) fn run(plan: &ChildPlan) -> ! {
    if plan.from_spawner {
        set_disposition(&SPAWNER_IGNORED, libc::SIG_DFL);
    } else {
        reset_signal_dispositions();
    }
    if arrange_fds(plan, None).is_err() {
        exit(EXIT_SETUP);
    }
    for (i, procs) in plan.cgroup_procs.iter().enumerate() {
        if let Err(errno) = write_path(procs, b"0") {
            fail(Step::JoinCgroup, i, errno);
        }
    }
    if let Some(limit) = &plan.pids_once_alone {
        // Opened now, while the host's cgroup file system is still in view; written once the
        // spawner's thread is gone: right away for a task that execs next, or, in a sandbox,
        // by the init just before it forks the task (the set-up in between overlaps the wait).
        let max = check_fd(
            Step::PidsLimit,
            1,
            // SAFETY: a valid NUL-terminated path.
            unsafe { libc::open(limit.max.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) },
        );
        move_fd(max, PIDS_MAX_FD, Step::PidsLimit);
        if plan.sandbox.is_none() {
            pids_once_alone(limit);
        }
    }
    match &plan.sandbox {
        None => {
            // SAFETY: setpgid has no memory arguments.
            check(Step::Setpgid, unsafe { libc::setpgid(0, 0) });
            exec_task(plan)
        }
        Some(setup) => outer(plan, setup),
    }
}

/// Moves descriptor `fd` to number `to` (close-on-exec), or fails `step`. The lowest free
/// number may be `to` already (dup3 refuses that).
fn move_fd(fd: c_int, to: RawFd, step: Step) {
    if fd != to {
        // SAFETY: plain fd syscalls on descriptors this process owns.
        unsafe {
            check(step, libc::dup3(fd, to, libc::O_CLOEXEC));
            libc::close(fd);
        }
    }
}

/// Waits until the spawner says its thread has left the cgroup (a byte on [`GO_FD`]), then
/// writes the limit to `pids.max` (open at [`PIDS_MAX_FD`]). See [`PidsOnceAlone`].
fn pids_once_alone(limit: &PidsOnceAlone) {
    // EOF: the spawner died before it could say, and its thread may still count.
    await_byte(GO_FD, Step::PidsLimit, Errno::EPIPE);
    // SAFETY: a live buffer; then closing descriptors this process owns.
    let written = unsafe {
        let n = libc::write(
            PIDS_MAX_FD,
            limit.value.as_ptr().cast::<c_void>(),
            limit.value.len(),
        );
        libc::close(GO_FD);
        libc::close(PIDS_MAX_FD);
        n
    };
    if written < 0 {
        fail(Step::PidsLimit, 1, Errno::last());
    }
}

/// S: creates the namespaces, forks the init, waits for it.
fn outer(plan: &ChildPlan, setup: &SandboxSetup) -> ! {
    // SAFETY: unshare has no memory arguments.
    check(Step::Unshare, unsafe { libc::unshare(setup.unshare_flags) });
    if setup.net_ns.is_some() {
        // SAFETY: setns and close on a descriptor this process owns.
        check(Step::JoinNetwork, unsafe {
            libc::setns(NETNS_FD, libc::CLONE_NEWNET)
        });
        // SAFETY: as above.
        unsafe { libc::close(NETNS_FD) };
    }
    if let Some((uid_map, gid_map)) = &setup.id_maps {
        // gid_map may only be written by an unprivileged process once setgroups is denied.
        if let Err(e) = write_path(c"/proc/self/setgroups", b"deny") {
            fail(Step::Setgroups, 0, e);
        }
        if let Err(e) = write_path(c"/proc/self/uid_map", uid_map) {
            fail(Step::UidMap, 0, e);
        }
        if let Err(e) = write_path(c"/proc/self/gid_map", gid_map) {
            fail(Step::GidMap, 0, e);
        }
    }
    proxy_and_hostname(setup);
    make_private();
    // I shares this process's memory and descriptor table, and this process sleeps until I
    // is gone (vfork): nothing is copied, and I closes what the attempt no longer needs in the
    // one table both hold — so the worker sees the setup pipe end when the task has exec'd.
    extern "C" fn init_start(arg: *mut c_void) -> c_int {
        // SAFETY: `arg` is the plan passed below, in memory this process shares and that
        // outlives it (the outer helper waits until the init is gone).
        let plan = unsafe { &*(arg as *const ChildPlan) };
        match &plan.sandbox {
            Some(setup) => run_init(plan, setup),
            None => exit(EXIT_SETUP),
        }
    }
    let init = start_helper(plan, 0, true, init_start, Step::ForkInit);
    // The init has exited (vfork); what is left is to learn how it ended. 0 says it was
    // reaped, and with it every process of its pid namespace (the worker may then give the
    // attempt's network namespace back to the spawner's pool).
    let status = report_init(init);
    exit(if status < 0 { EXIT_SETUP } else { 0 })
}

/// S: waits for its init to exit, then keeps only the status pipe of the descriptor table
/// they shared (there if a plan came) and reports the init's wait status there; returns it.
fn report_init(init: libc::pid_t) -> c_int {
    let status = wait_for(init);
    close_range(0, (STATUS_FD - 1) as u32);
    close_range((STATUS_FD + 1) as u32, u32::MAX);
    write_record(STATUS_FD, TAG_INIT, status);
    status
}

/// Descriptors a prepared init holds while it waits for its plan are at or above this: clear
/// of the fixed numbers and of where the plan's own descriptors arrive.
const PREPARED_FD: RawFd = 64;

/// Set in a prepared init until its plan comes: no attempt's pipes exist yet, so a failed
/// step is said on stderr (the worker's journal) instead of in a record.
static PREPARING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// A standby helper's sandbox made before its attempt (see the `standby` module): S makes the
/// namespaces of `view` and forks the init, which builds the file system view, then calls
/// `next` for the plan and runs it (`None`: let go; it exits). S waits for the init and
/// reports how it ended, as [`outer`] does. S is the worker binary exec'd, single-threaded,
/// and the init a fork of it (sharing its descriptor table), so both may allocate.
pub(crate) fn run_prepared(view: &View, next: &mut dyn FnMut() -> Option<ChildPlan>) -> ! {
    PREPARING.store(true, std::sync::atomic::Ordering::Relaxed);
    // SAFETY: unshare has no memory arguments.
    check(Step::Unshare, unsafe { libc::unshare(view.unshare_flags) });
    make_private();
    let flags = (libc::CLONE_FILES | libc::SIGCHLD) as libc::c_ulong;
    // SAFETY: clone without CLONE_VM is a fork (of a single-threaded process: the child may
    // do what this one may); the other arguments are unused without their flags.
    let init = unsafe { libc::syscall(libc::SYS_clone, flags, 0usize, 0usize, 0usize, 0usize) };
    match init {
        0 => prepared_init(view, next),
        init if init < 0 => fail(Step::ForkInit, 0, Errno::last()),
        init => {
            let status = report_init(init as libc::pid_t);
            exit(if status == 0 { 0 } else { EXIT_SETUP })
        }
    }
}

/// The init of [`run_prepared`]: everything of the view that does not depend on the attempt
/// now, the rest once the plan has come.
fn prepared_init(view: &View, next: &mut dyn FnMut() -> Option<ChildPlan>) -> ! {
    init_first();
    let name = CString::new(super::standby::READY_COMM).unwrap_or_default();
    // SAFETY: prctl with a NUL-terminated name.
    unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr(), 0, 0, 0) };
    // 1. Opened before anything covers them: the directory the workspace will be made in,
    // kept files, devices.
    let parent = check_fd(Step::OpenWorkspace, 0, open_path(&view.workspaces));
    move_fd(parent, PREPARED_FD, Step::OpenWorkspace);
    let mut keep_fds: [c_int; MAX_REBINDS] = [-1; MAX_REBINDS];
    for (i, rebind) in view.keep.iter().take(MAX_REBINDS - 1).enumerate() {
        keep_fds[i] = check_fd(Step::OpenWorkspace, i + 1, open_high(&rebind.path));
    }
    let device_fds = open_devices(true);
    // 2.-4., the workspace's mask left writable.
    build_view(&device_fds, view.sys, &view.masks, view.workspace_mask);
    // 5. What the attempt does not change: kept files.
    let kept = view.keep.len().min(MAX_REBINDS - 1);
    bind_back(&view.keep[..kept], &keep_fds[..kept], 1);
    close_all(&device_fds);
    PREPARING.store(false, std::sync::atomic::Ordering::Relaxed);
    // Tell the spawner the sandbox is made (see `Standby::made`); if it is gone, `next` says.
    // SAFETY: a one-byte live buffer on this process's socket.
    unsafe {
        libc::send(
            STANDBY_FD,
            b"r".as_ptr().cast::<c_void>(),
            1,
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
    let Some(plan) = next() else { exit(0) };
    // From here on as `run` and `outer` with the plan, but for what is already done.
    set_disposition(&SPAWNER_IGNORED, libc::SIG_DFL);
    if arrange_fds(&plan, Some(PREPARED_FD)).is_err() {
        exit(EXIT_SETUP);
    }
    let Some(setup) = &plan.sandbox else {
        fail(Step::ForkInit, 2, Errno::EINVAL)
    };
    proxy_and_hostname(setup);
    // The workspace: made in its mask (the path down to it is there), opened through the
    // directory opened before the masks, bound.
    if view.workspace_mask.is_some() {
        if let Err(errno) = create(&plan.workspace, true) {
            fail(Step::MkdirWorkspace, 0, errno);
        }
    }
    let name = plan
        .workspace
        .as_bytes()
        .rsplit(|b| *b == b'/')
        .next()
        .and_then(|leaf| CString::new(leaf).ok())
        .unwrap_or_default();
    // SAFETY: a valid NUL-terminated name relative to a directory this process holds.
    let workspace = check_fd(Step::OpenWorkspace, 0, unsafe {
        libc::openat(
            PREPARED_FD,
            name.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    });
    // SAFETY: closing a descriptor this process owns.
    unsafe { libc::close(PREPARED_FD) };
    bind_back(&setup.rebinds[..1], &[workspace], 0);
    if let Some(i) = view.workspace_mask {
        if view.masks[i].kind == MaskKind::Empty {
            check_at(
                Step::MountTmp,
                i,
                set_attributes(&view.masks[i].path, MOUNT_ATTR_RDONLY, 0, false),
            );
        }
    }
    start_task_and_wait(&plan)
}

/// [`open_path`], moved to a number at or above [`PREPARED_FD`] (-1 on failure).
fn open_high(path: &CStr) -> c_int {
    let fd = open_path(path);
    if fd < 0 {
        return fd;
    }
    // SAFETY: plain fd syscalls on a descriptor this process owns.
    unsafe {
        let high = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, PREPARED_FD + 1);
        libc::close(fd);
        high
    }
}

/// In the attempt's new network and UTS namespaces: the egress proxy's socket (`network =
/// proxy`) and the hostname.
fn proxy_and_hostname(setup: &SandboxSetup) {
    if let Some(port) = setup.proxy_port {
        check(Step::Loopback, loopback_up());
        let listener = check_fd(Step::ProxySocket, 0, proxy_listener(port));
        check_at(Step::ProxySocket, 1, send_fd(PROXY_FD, listener));
        // SAFETY: closing descriptors this process owns; the worker holds its own copy now.
        unsafe {
            libc::close(listener);
            libc::close(PROXY_FD);
        }
    }
    // SAFETY: pointer and length of a live buffer.
    check(Step::Hostname, unsafe {
        libc::sethostname(setup.hostname.as_ptr().cast(), setup.hostname.len())
    });
}

/// In a new mount namespace: without this, the mounts made in it would propagate back to the
/// host's.
fn make_private() {
    // SAFETY: valid NUL-terminated target; the other pointers may be null for MS_PRIVATE.
    check(Step::MountPrivate, unsafe {
        libc::mount(
            ptr::null(),
            c"/".as_ptr(),
            ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            ptr::null(),
        )
    });
}

/// I: pid 1 of the new pid namespace.
fn run_init(plan: &ChildPlan, setup: &SandboxSetup) -> ! {
    init_first();
    // 1. Everything bound back later, opened before anything covers it.
    let mut rebind_fds: [c_int; MAX_REBINDS] = [-1; MAX_REBINDS];
    for (i, rebind) in setup.rebinds.iter().take(MAX_REBINDS).enumerate() {
        rebind_fds[i] = check_fd(Step::OpenWorkspace, i, open_path(&rebind.path));
    }
    let device_fds = open_devices(false);
    // 2.-4.
    build_view(&device_fds, setup.sys, &setup.masks, None);
    // 5. Rebinds: the workspace writable, the rest read-only.
    bind_back(&setup.rebinds, &rebind_fds, 0);
    close_all(&device_fds);
    if let Some(limit) = &plan.pids_once_alone {
        pids_once_alone(limit);
    }
    start_task_and_wait(plan)
}

/// The init's first step: it dies with the outer helper, and its memory stays closed to the
/// task.
fn init_first() {
    // SAFETY: prctl with integer arguments only.
    unsafe {
        // If S dies (the worker killed it), the whole namespace goes with us.
        libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        );
        // This process shares the outer helper's memory (a copy of the spawner's) or is a
        // fork of a standby helper: keep /proc/1/{mem,environ,...} closed to a task that
        // lacks CAP_SYS_PTRACE in the worker's user namespace.
        libc::prctl(libc::PR_SET_DUMPABLE, 0 as libc::c_ulong, 0, 0, 0);
    }
}

/// The host's device nodes of [`DEVICES`], opened (O_PATH) before anything covers them; -1
/// for one the host lacks (the sandbox then lacks it).
/// With `high`, at or above [`PREPARED_FD`] (see [`open_high`]).
fn open_devices(high: bool) -> [c_int; DEVICES.len()] {
    let mut device_fds: [c_int; DEVICES.len()] = [-1; DEVICES.len()];
    for (i, device) in DEVICES.iter().enumerate() {
        device_fds[i] = if high {
            open_high(device)
        } else {
            open_path(device)
        };
    }
    device_fds
}

fn close_all(fds: &[c_int]) {
    for fd in fds {
        if *fd >= 0 {
            // SAFETY: closing an fd this process opened.
            unsafe { libc::close(*fd) };
        }
    }
}

/// Steps 2-4 of the task's file system view (see the module docs): the inherited tree
/// read-only; /proc, /sys and /dev; the masks. The mask at `writable_mask` (a prepared
/// sandbox's, where the workspace is still to be made) is left writable.
fn build_view(
    device_fds: &[c_int; DEVICES.len()],
    sys: SysMount,
    masks: &[Mask],
    writable_mask: Option<usize>,
) {
    // 2. The inherited tree: read-only, nosuid, nodev, every mount of it.
    check(
        Step::ReadOnly,
        set_attributes(
            c"/",
            MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
            0,
            true,
        ),
    );
    // 3. /proc, /sys, /dev of the sandbox.
    let nodev = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    check(
        Step::MountProc,
        mount(c"proc", c"/proc", c"proc", nodev, None),
    );
    let sys_mounted = match sys {
        SysMount::Keep => false,
        SysMount::Fresh => {
            check(
                Step::MountSys,
                mount(c"sysfs", c"/sys", c"sysfs", nodev, None),
            );
            true
        }
        SysMount::Rebind => {
            // The host's network namespace already has its sysfs mounted here (a second mount
            // is EBUSY): bind it without the mounts below it (cgroupfs, ...) instead.
            check(
                Step::MountSys,
                mount(c"/sys", c"/sys", c"", libc::MS_BIND, None),
            );
            true
        }
    };
    if sys_mounted {
        let read_only = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | nodev;
        check(Step::MountSys, mount(c"", c"/sys", c"", read_only, None));
    }
    let mut fd_buf = [0u8; FD_PATH_LEN];
    for (i, path) in PROC_READ_ONLY.iter().enumerate() {
        if mount(path, path, c"", libc::MS_BIND | libc::MS_REC, None) < 0 {
            if Errno::last() == Errno::ENOENT {
                continue;
            }
            fail(Step::MountProc, 10 + i, Errno::last());
        }
        check_at(
            Step::MountProc,
            10 + i,
            set_attributes(
                path,
                MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC,
                0,
                true,
            ),
        );
    }
    if device_fds[NULL_DEVICE] >= 0 {
        for (i, path) in PROC_HIDDEN.iter().enumerate() {
            let source = fd_path(device_fds[NULL_DEVICE], &mut fd_buf);
            if mount(source, path, c"", libc::MS_BIND, None) < 0 && Errno::last() != Errno::ENOENT {
                fail(Step::MountProc, 20 + i, Errno::last());
            }
        }
    }
    build_dev(device_fds);
    // 4. Masks.
    for (i, mask) in masks.iter().enumerate() {
        match mask.kind {
            MaskKind::File => {
                let null = device_fds[NULL_DEVICE];
                if null < 0 {
                    fail(Step::Mask, i, Errno::ENOENT);
                }
                let source = fd_path(null, &mut fd_buf);
                check_at(
                    Step::Mask,
                    i,
                    mount(source, &mask.path, c"", libc::MS_BIND, None),
                );
                continue;
            }
            MaskKind::Scratch => check_at(
                Step::MountTmp,
                i,
                mount(
                    c"tmpfs",
                    &mask.path,
                    c"tmpfs",
                    libc::MS_NOSUID | libc::MS_NODEV,
                    Some(c"mode=1777"),
                ),
            ),
            MaskKind::Empty => check_at(
                Step::MountTmp,
                i,
                mount(c"tmpfs", &mask.path, c"tmpfs", nodev, Some(c"mode=755")),
            ),
        }
        for (path, dir) in &mask.creates {
            if let Err(errno) = create(path, *dir) {
                fail(Step::MkdirWorkspace, i, errno);
            }
        }
        if mask.kind == MaskKind::Empty && writable_mask != Some(i) {
            check_at(
                Step::MountTmp,
                i,
                set_attributes(&mask.path, MOUNT_ATTR_RDONLY, 0, false),
            );
        }
    }
}

/// Step 5: binds `rebinds` (opened at `fds`, which are closed here) back at their paths, a
/// writable one writable and the rest read-only. `first` is the index of `rebinds[0]` in the
/// attempt's rebinds, for error records.
fn bind_back(rebinds: &[Rebind], fds: &[c_int], first: usize) {
    let mut fd_buf = [0u8; FD_PATH_LEN];
    for (i, (rebind, fd)) in rebinds.iter().zip(fds).enumerate() {
        let i = first + i;
        let source = fd_path(*fd, &mut fd_buf);
        check_at(
            Step::BindWorkspace,
            i,
            mount(
                source,
                &rebind.path,
                c"",
                libc::MS_BIND | libc::MS_REC,
                None,
            ),
        );
        let (set, clear) = if rebind.writable {
            (MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, MOUNT_ATTR_RDONLY)
        } else {
            (MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, 0)
        };
        check_at(
            Step::BindWorkspace,
            i,
            set_attributes(&rebind.path, set, clear, true),
        );
        // SAFETY: closing an fd this process opened.
        unsafe { libc::close(*fd) };
    }
}

/// The init's last part: starts the task (T) and waits for it, reaping orphans; reports the
/// task's wait status on the status pipe and exits.
fn start_task_and_wait(plan: &ChildPlan) -> ! {
    // T shares the init's memory until its exec (vfork), with a descriptor table of its own.
    extern "C" fn task_start(arg: *mut c_void) -> c_int {
        // SAFETY: as for `init_start`: the init sleeps until this process has exec'd.
        let plan = unsafe { &*(arg as *const ChildPlan) };
        // SAFETY: plain syscalls.
        unsafe { libc::close(STATUS_FD) };
        // SAFETY: as above.
        check(Step::Setsid, unsafe { libc::setsid() });
        drop_capabilities();
        exec_task(plan)
    }
    let task = start_helper(plan, 1, false, task_start, Step::ForkTask);
    // The task has exec'd: the table the outer helper shares keeps only the status pipe.
    close_range(0, (STATUS_FD - 1) as u32);
    loop {
        let mut status: c_int = 0;
        // SAFETY: `status` is a live local.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid == task {
            write_record(STATUS_FD, TAG_TASK, status);
            exit(0);
        }
        if pid < 0 && Errno::last() != Errno::EINTR {
            exit(0);
        }
    }
}

/// The sandbox's /dev: a tmpfs (read-only once built) with the host's harmless device nodes
/// bound in (read-only mounts: the nodes work, their inodes cannot be changed), its own devpts
/// instance and /dev/shm, and the usual links.
fn build_dev(device_fds: &[c_int; DEVICES.len()]) {
    check(
        Step::MountDev,
        mount(
            c"tmpfs",
            c"/dev",
            c"tmpfs",
            libc::MS_NOSUID | libc::MS_NOEXEC,
            Some(c"mode=755"),
        ),
    );
    let mut fd_buf = [0u8; FD_PATH_LEN];
    for (i, (device, fd)) in DEVICES.iter().zip(device_fds).enumerate() {
        if *fd < 0 {
            continue;
        }
        if let Err(errno) = create(device, false) {
            fail(Step::MountDev, i, errno);
        }
        let source = fd_path(*fd, &mut fd_buf);
        check_at(
            Step::MountDev,
            i,
            mount(source, device, c"", libc::MS_BIND, None),
        );
        check_at(
            Step::MountDev,
            i,
            set_attributes(
                device,
                MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NOEXEC,
                MOUNT_ATTR_NODEV,
                false,
            ),
        );
    }
    for (i, (target, link)) in DEV_LINKS.iter().enumerate() {
        // SAFETY: valid NUL-terminated paths.
        if unsafe { libc::symlink(target.as_ptr(), link.as_ptr()) } < 0 {
            fail(Step::MountDev, 10 + i, Errno::last());
        }
    }
    for (i, dir) in [c"/dev/shm", c"/dev/pts"].iter().enumerate() {
        if let Err(errno) = create(dir, true) {
            fail(Step::MountDev, 20 + i, errno);
        }
    }
    check_at(
        Step::MountDev,
        30,
        mount(
            c"tmpfs",
            c"/dev/shm",
            c"tmpfs",
            libc::MS_NOSUID | libc::MS_NODEV,
            Some(c"mode=1777"),
        ),
    );
    check_at(
        Step::MountDev,
        31,
        mount(
            c"devpts",
            c"/dev/pts",
            c"devpts",
            libc::MS_NOSUID | libc::MS_NOEXEC,
            Some(c"newinstance,ptmxmode=0666,mode=620"),
        ),
    );
    check_at(
        Step::MountDev,
        32,
        set_attributes(c"/dev", MOUNT_ATTR_RDONLY, 0, false),
    );
}

/// T: the task's own process until exec.
fn exec_task(plan: &ChildPlan) -> ! {
    if plan.confirm_fd.is_some() {
        await_confirm();
    }
    // SAFETY: prctl with integer arguments only.
    check(Step::NoNewPrivs, unsafe {
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1 as libc::c_ulong, 0, 0, 0)
    });
    // SAFETY: valid NUL-terminated path.
    check(Step::Chdir, unsafe { libc::chdir(plan.workspace.as_ptr()) });
    // The PATH search of execvp(3), over candidates the parent listed.
    let mut errno = Errno::ENOENT;
    let mut saw_eacces = false;
    for candidate in &plan.candidates {
        // SAFETY: NUL-terminated path and NULL-terminated arrays of NUL-terminated strings,
        // all owned by `plan`.
        unsafe { libc::execve(candidate.as_ptr(), plan.argv.as_ptr(), plan.envp.as_ptr()) };
        match Errno::last() {
            Errno::ENOENT | Errno::ENOTDIR | Errno::ESTALE | Errno::ENODEV | Errno::ETIMEDOUT => {}
            Errno::EACCES => saw_eacces = true,
            other => {
                errno = other;
                break;
            }
        }
    }
    if errno == Errno::ENOENT && saw_eacces {
        errno = Errno::EACCES;
    }
    report(Step::Exec, 0, errno);
    exit(EXIT_EXEC)
}

/// Waits for one byte on `fd`: EOF fails `step` with `at_eof`, an error with its errno.
fn await_byte(fd: RawFd, step: Step, at_eof: Errno) {
    let mut byte = [0u8; 1];
    loop {
        // SAFETY: a live one-byte buffer.
        let n = unsafe { libc::read(fd, byte.as_mut_ptr().cast::<c_void>(), 1) };
        match n {
            1 => return,
            0 => fail(step, 0, at_eof),
            _ if Errno::last() == Errno::EINTR => {}
            _ => fail(step, 0, Errno::last()),
        }
    }
}

/// Waits for the worker's byte on [`CONFIRM_FD`] (see [`ChildPlan::confirm_fd`]); EOF (the
/// worker dropped the attempt) fails [`Step::Confirm`].
fn await_confirm() {
    await_byte(CONFIRM_FD, Step::Confirm, Errno::ECANCELED);
    // SAFETY: closing a descriptor this process owns (close-on-exec anyway).
    unsafe { libc::close(CONFIRM_FD) };
}

/// Capabilities a sandboxed task keeps (Docker's default set): enough for ordinary root work
/// in its own namespaces (chown, setuid, binding low ports, chroot), not enough to undo them —
/// no CAP_SYS_ADMIN (mount, remount read-only file systems rw), CAP_SYS_PTRACE (reading the
/// init's memory, a copy of the worker's), CAP_NET_ADMIN, CAP_SYS_MODULE, CAP_SYS_RAWIO, ...
const KEPT_CAPABILITIES: [u32; 14] = [
    0,  // CAP_CHOWN
    1,  // CAP_DAC_OVERRIDE
    3,  // CAP_FOWNER
    4,  // CAP_FSETID
    5,  // CAP_KILL
    6,  // CAP_SETGID
    7,  // CAP_SETUID
    8,  // CAP_SETPCAP
    10, // CAP_NET_BIND_SERVICE
    13, // CAP_NET_RAW
    18, // CAP_SYS_CHROOT
    27, // CAP_MKNOD
    29, // CAP_AUDIT_WRITE
    31, // CAP_SETFCAP
];

/// Limits what the task can hold after exec to [`KEPT_CAPABILITIES`]: for root, exec grants
/// the bounding set (plus the inheritable set, cleared too); ambient capabilities are cleared.
fn drop_capabilities() {
    for cap in 0..64u32 {
        if KEPT_CAPABILITIES.contains(&cap) {
            continue;
        }
        // SAFETY: prctl with integer arguments only.
        let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        if r < 0 {
            // EINVAL: past the kernel's last capability (they are numbered without gaps).
            if Errno::last() == Errno::EINVAL {
                break;
            }
            fail(Step::DropCaps, cap as usize, Errno::last());
        }
    }
    // SAFETY: prctl with integer arguments only; EINVAL before Linux 4.3 (no ambient set).
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    #[repr(C)]
    struct Header {
        version: u32,
        pid: c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let mut header = Header {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let mut data = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: header and two data words, as capget(2) expects for version 3.
    let got = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    if got < 0 {
        fail(Step::DropCaps, 64, Errno::last());
    }
    for word in &mut data {
        word.inheritable = 0;
    }
    // SAFETY: as above; lowering the inheritable set is always allowed.
    let set = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
    if set < 0 {
        fail(Step::DropCaps, 65, Errno::last());
    }
}

/// Signal handlers installed by the worker (tokio's) must not run in a helper: they would
/// write to file descriptors whose numbers now mean something else.
fn reset_signal_dispositions() {
    for signal in 1..65 {
        if signal != libc::SIGKILL && signal != libc::SIGSTOP {
            set_disposition(&[signal], libc::SIG_DFL);
        }
    }
}

/// Signals the spawner ignores (the worker's to handle); everything else is default there.
/// Ignoring survives exec, so its children restore these before the task runs.
const SPAWNER_IGNORED: [c_int; 5] = [
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGPIPE,
    libc::SIGQUIT,
];

/// Sets `signals` to `disposition` (SIG_DFL or SIG_IGN), empty mask, no flags. The raw
/// syscall: glibc's wrapper refuses the signals it reserves (32 and 33) and so would leave an
/// inherited SIG_IGN on them in place, through the exec, for the task.
/// SIGSEGV and SIGBUS back to their default action (a standby helper's runtime caught them).
pub(crate) fn default_fault_signals() {
    set_disposition(&[libc::SIGSEGV, libc::SIGBUS], libc::SIG_DFL);
}

fn set_disposition(signals: &[c_int], disposition: libc::sighandler_t) {
    // The kernel's struct sigaction on x86_64 and arm64: handler, flags, restorer, mask.
    let action: [u64; 4] = [disposition as u64, 0, 0, 0];
    for &signal in signals {
        // SAFETY: rt_sigaction reading a live struct of the kernel's layout (the old action
        // is not asked for); errors (SIGKILL, SIGSTOP, numbers past the last) are harmless.
        unsafe {
            libc::syscall(
                libc::SYS_rt_sigaction,
                signal,
                action.as_ptr(),
                ptr::null_mut::<c_void>(),
                8usize,
            )
        };
    }
}

/// Moves the pipes to their fixed numbers and closes every other inherited descriptor.
/// With `keep` (a prepared init's [`PREPARED_FD`]), that descriptor stays open too.
fn arrange_fds(plan: &ChildPlan, keep: Option<RawFd>) -> Result<(), Errno> {
    let scratch = |fd: RawFd| {
        // SAFETY: fcntl on an fd number; failure is reported.
        Errno::result(unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, SCRATCH_FD) })
    };
    let stdin = scratch(plan.stdio[0])?;
    let stdout = scratch(plan.stdio[1])?;
    let stderr = scratch(plan.stdio[2])?;
    let setup = scratch(plan.setup_fd)?;
    let events = scratch(plan.events_fd)?;
    let status = match plan.status_fd {
        Some(fd) => Some(scratch(fd)?),
        None => None,
    };
    let proxy = match plan.proxy_fd {
        Some(fd) => Some(scratch(fd)?),
        None => None,
    };
    let go = match &plan.pids_once_alone {
        Some(limit) => Some(scratch(limit.go)?),
        None => None,
    };
    let netns = match plan.sandbox.as_ref().and_then(|s| s.net_ns) {
        Some(fd) => Some(scratch(fd)?),
        None => None,
    };
    let confirm = match plan.confirm_fd {
        Some(fd) => Some(scratch(fd)?),
        None => None,
    };
    // SAFETY: plain fd syscalls; sources (>= SCRATCH_FD) never equal targets (< SCRATCH_FD).
    unsafe {
        // Not close-on-exec: the task's stdio.
        Errno::result(libc::dup2(stdin, 0))?;
        Errno::result(libc::dup2(stdout, 1))?;
        Errno::result(libc::dup2(stderr, 2))?;
        Errno::result(libc::dup3(setup, SETUP_FD, libc::O_CLOEXEC))?;
        // Not close-on-exec: this is the one the task inherits.
        Errno::result(libc::dup2(events, EVENTS_FD))?;
        if let Some(status) = status {
            Errno::result(libc::dup3(status, STATUS_FD, libc::O_CLOEXEC))?;
        }
        if let Some(proxy) = proxy {
            Errno::result(libc::dup3(proxy, PROXY_FD, libc::O_CLOEXEC))?;
        }
        if let Some(go) = go {
            Errno::result(libc::dup3(go, GO_FD, libc::O_CLOEXEC))?;
        }
        if let Some(netns) = netns {
            Errno::result(libc::dup3(netns, NETNS_FD, libc::O_CLOEXEC))?;
        }
        if let Some(confirm) = confirm {
            Errno::result(libc::dup3(confirm, CONFIRM_FD, libc::O_CLOEXEC))?;
        }
        // The fixed numbers not in use hold nothing of the parent's.
        for (fd, used) in [
            (STATUS_FD, status.is_some()),
            (PROXY_FD, proxy.is_some()),
            (GO_FD, go.is_some()),
            // Opened later, by `run`.
            (PIDS_MAX_FD, false),
            (NETNS_FD, netns.is_some()),
            (CONFIRM_FD, confirm.is_some()),
        ] {
            if !used {
                libc::close(fd);
            }
        }
    }
    match keep {
        Some(keep) => {
            close_range((CONFIRM_FD + 1) as u32, (keep - 1) as u32);
            close_range((keep + 1) as u32, u32::MAX);
        }
        None => close_range((CONFIRM_FD + 1) as u32, u32::MAX),
    }
    Ok(())
}

/// close_range(2) (Linux 5.9+), else a loop up to the descriptor limit.
fn close_range(first: u32, last: u32) {
    // SAFETY: a raw syscall with integer arguments.
    let r = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first as libc::c_uint,
            last as libc::c_uint,
            0 as libc::c_uint,
        )
    };
    if r == 0 {
        return;
    }
    // SAFETY: a zeroed rlimit is valid; getrlimit fills it.
    let mut limit: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: `limit` is a live local.
    let max = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        limit.rlim_cur.min(1 << 20) as u32
    } else {
        1024
    };
    for fd in first..=last.min(max) {
        // SAFETY: closing a number that may or may not be open.
        unsafe { libc::close(fd as c_int) };
    }
}

/// open + write + close.
fn write_path(path: &CStr, data: &[u8]) -> Result<(), Errno> {
    // SAFETY: valid NUL-terminated path.
    let fd = Errno::result(unsafe { libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) })?;
    // SAFETY: pointer and length of a live buffer.
    let written = unsafe { libc::write(fd, data.as_ptr().cast::<c_void>(), data.len()) };
    let result = if written < 0 {
        Err(Errno::last())
    } else if written as usize != data.len() {
        Err(Errno::EIO)
    } else {
        Ok(())
    };
    // SAFETY: closing the fd opened above.
    unsafe { libc::close(fd) };
    result
}

fn mount(
    source: &CStr,
    target: &CStr,
    fstype: &CStr,
    flags: libc::c_ulong,
    data: Option<&CStr>,
) -> c_int {
    let data = data.map_or(ptr::null(), |d| d.as_ptr().cast::<c_void>());
    // SAFETY: valid NUL-terminated strings (or null data).
    unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data,
        )
    }
}

const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;
const MOUNT_ATTR_NOEXEC: u64 = 0x8;
const AT_RECURSIVE: c_int = 0x8000;

/// `struct mount_attr` of mount_setattr(2).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// mount_setattr(2) on the mount at `path` (and every mount below it with `recursive`). Unlike
/// a bind remount it leaves the other flags alone (atime flags locked in a user namespace).
fn set_attributes(path: &CStr, set: u64, clear: u64, recursive: bool) -> c_int {
    let attr = MountAttr {
        attr_set: set,
        attr_clr: clear,
        propagation: 0,
        userns_fd: 0,
    };
    let flags = if recursive { AT_RECURSIVE } else { 0 };
    // SAFETY: valid NUL-terminated path; `attr` is a live struct of the size passed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            path.as_ptr(),
            flags as libc::c_uint,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    r as c_int
}

/// An O_PATH descriptor of `path`, or -1.
/// `struct ifreq` with the flags member of its union, padded to the largest size it has.
#[repr(C)]
struct IfReqFlags {
    name: [u8; 16],
    flags: libc::c_short,
    pad: [u8; 22],
}

/// `ip link set lo up` in the current network namespace; 0 or -1 with errno.
fn loopback_up() -> c_int {
    // SAFETY: socket with integer arguments.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return -1;
    }
    let mut req = IfReqFlags {
        name: [0; 16],
        flags: 0,
        pad: [0; 22],
    };
    req.name[..2].copy_from_slice(b"lo");
    // SAFETY: `req` is a live, properly sized ifreq for these two requests.
    let r = unsafe {
        if libc::ioctl(fd, libc::SIOCGIFFLAGS as _, &mut req as *mut IfReqFlags) < 0 {
            -1
        } else {
            req.flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            libc::ioctl(fd, libc::SIOCSIFFLAGS as _, &req as *const IfReqFlags)
        }
    };
    let errno = Errno::last();
    // SAFETY: closing the socket made above.
    unsafe { libc::close(fd) };
    if r < 0 {
        Errno::set_raw(errno as i32);
        return -1;
    }
    0
}

/// A TCP socket listening on 127.0.0.1:`port`; the descriptor, or -1 with errno.
fn proxy_listener(port: u16) -> c_int {
    // SAFETY: plain socket syscalls on a live local address structure.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return -1;
        }
        let one: c_int = 1;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&one as *const c_int).cast::<c_void>(),
            std::mem::size_of::<c_int>() as libc::socklen_t,
        );
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_be_bytes([127, 0, 0, 1]).to_be(),
            },
            sin_zero: [0; 8],
        };
        if libc::bind(
            fd,
            (&addr as *const libc::sockaddr_in).cast::<libc::sockaddr>(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        ) < 0
            || libc::listen(fd, 128) < 0
        {
            let errno = Errno::last();
            libc::close(fd);
            Errno::set_raw(errno as i32);
            return -1;
        }
        fd
    }
}

/// Send descriptor `fd` over the Unix socket `chan` (SCM_RIGHTS, one data byte).
fn send_fd(chan: RawFd, fd: RawFd) -> c_int {
    // Room for one descriptor's control message, aligned for cmsghdr.
    let mut control = [0u64; 4];
    let mut byte = [b'P'];
    // SAFETY: every pointer refers to a live local; the CMSG macros compute offsets inside
    // `control`, which is larger than CMSG_SPACE(sizeof(int)).
    unsafe {
        let mut iov = libc::iovec {
            iov_base: byte.as_mut_ptr().cast::<c_void>(),
            iov_len: 1,
        };
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast::<c_void>();
        msg.msg_controllen = libc::CMSG_SPACE(std::mem::size_of::<c_int>() as u32) as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<c_int>() as u32) as _;
        ptr::copy_nonoverlapping(
            (&fd as *const c_int).cast::<u8>(),
            libc::CMSG_DATA(cmsg),
            std::mem::size_of::<c_int>(),
        );
        if libc::sendmsg(chan, &msg, libc::MSG_NOSIGNAL) < 0 {
            -1
        } else {
            0
        }
    }
}

/// Take ownership of a descriptor the kernel just gave this process (received with
/// SCM_RIGHTS), so it is closed when dropped.
pub(crate) fn owned_fd(fd: RawFd) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: the caller passes a descriptor that was just installed in this process and
    // that nothing else owns.
    unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }
}

fn open_path(path: &CStr) -> c_int {
    // SAFETY: valid NUL-terminated path.
    unsafe { libc::open(path.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) }
}

/// Creates a directory (`dir`) or an empty file at `path`; an existing one is fine.
fn create(path: &CStr, dir: bool) -> Result<(), Errno> {
    if dir {
        // SAFETY: valid NUL-terminated path.
        if unsafe { libc::mkdir(path.as_ptr(), 0o755) } < 0 && Errno::last() != Errno::EEXIST {
            return Err(Errno::last());
        }
        return Ok(());
    }
    // SAFETY: valid NUL-terminated path.
    let fd = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
            0o644 as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(Errno::last());
    }
    // SAFETY: closing the fd opened above.
    unsafe { libc::close(fd) };
    Ok(())
}

/// Room for `/proc/self/fd/<any c_int>` and its NUL.
const FD_PATH_LEN: usize = 32;

/// `/proc/self/fd/<fd>` written into `buf`, without allocating.
fn fd_path(fd: c_int, buf: &mut [u8; FD_PATH_LEN]) -> &CStr {
    const PREFIX: &[u8] = b"/proc/self/fd/";
    buf[..PREFIX.len()].copy_from_slice(PREFIX);
    let mut digits = [0u8; 12];
    let mut n = fd.unsigned_abs();
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..len {
        buf[PREFIX.len() + i] = digits[len - 1 - i];
    }
    buf[PREFIX.len() + len] = 0;
    CStr::from_bytes_until_nul(&buf[..]).unwrap_or(c"/")
}

fn wait_for(pid: libc::pid_t) -> c_int {
    loop {
        let mut status: c_int = 0;
        // SAFETY: `status` is a live local.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            return status;
        }
        if r < 0 && Errno::last() != Errno::EINTR {
            return -1;
        }
    }
}

fn write_record(fd: RawFd, tag: u8, value: c_int) {
    write_raw(fd, tag, 0, 0, value);
}

fn write_raw(fd: RawFd, tag: u8, step: u8, index: u8, value: c_int) {
    let v = value.to_le_bytes();
    let record: [u8; RECORD_LEN] = [tag, step, index, 0, v[0], v[1], v[2], v[3]];
    // SAFETY: pointer and length of a live local; one write below PIPE_BUF is atomic.
    unsafe { libc::write(fd, record.as_ptr().cast::<c_void>(), RECORD_LEN) };
}

fn report(step: Step, index: usize, errno: Errno) {
    if PREPARING.load(std::sync::atomic::Ordering::Relaxed) {
        // A prepared init or its S, forks of a single-threaded process: they may allocate.
        eprintln!(
            "drover-worker standby helper: cannot make a sandbox ahead: step {step:?} (item \
             {index}): {errno}; the next attempts are started the usual way"
        );
        return;
    }
    write_raw(
        SETUP_FD,
        TAG_ERROR,
        step as u8,
        index.min(255) as u8,
        errno as c_int,
    );
}

fn fail(step: Step, index: usize, errno: Errno) -> ! {
    report(step, index, errno);
    exit(EXIT_SETUP)
}

/// Fails `step` with errno when a syscall returned -1.
fn check(step: Step, result: c_int) {
    check_at(step, 0, result);
}

/// [`check`] for the `index`th item of a step.
fn check_at(step: Step, index: usize, result: c_int) {
    if result < 0 {
        fail(step, index, Errno::last());
    }
}

/// [`check_at`] for a call that returns a descriptor; returns it.
fn check_fd(step: Step, index: usize, fd: c_int) -> c_int {
    check_at(step, index, fd);
    fd
}

pub(crate) fn exit(code: c_int) -> ! {
    // SAFETY: _exit is async-signal-safe and skips the worker's atexit handlers and buffers.
    unsafe { libc::_exit(code) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let mut bytes = Vec::new();
        for (tag, step, index, value) in [
            (TAG_ERROR, Step::MountTmp as u8, 0u8, libc::EPERM),
            (TAG_TASK, 0, 0, 0x0f00),
            (TAG_INIT, 0, 0, 9),
            (TAG_ERROR, 200, 3, libc::ENOENT),
        ] {
            let v = value.to_le_bytes();
            bytes.extend([tag, step, index, 0, v[0], v[1], v[2], v[3]]);
        }
        bytes.extend([TAG_TASK, 0, 0]); // a fragment
        assert_eq!(
            parse_records(&bytes),
            [
                Record::Error {
                    step: Some(Step::MountTmp),
                    index: 0,
                    errno: Errno::EPERM
                },
                Record::Task(0x0f00),
                Record::Init(9),
                Record::Error {
                    step: None,
                    index: 3,
                    errno: Errno::ENOENT
                },
            ]
        );
    }

    #[test]
    fn steps_are_numbered_uniquely() {
        for (i, step) in Step::ALL.iter().enumerate() {
            assert_eq!(*step as usize, i + 1);
            assert_eq!(Step::from_u8(*step as u8), Some(*step));
        }
        assert_eq!(Step::from_u8(0), None);
        let procs = [PathBuf::from("/sys/fs/cgroup/x/cgroup.procs")];
        assert!(Step::JoinCgroup
            .describe(0, &procs, Path::new("/w"), &[], &[])
            .contains("/sys/fs/cgroup/x/cgroup.procs"));
        assert!(Step::Chdir
            .describe(0, &procs, Path::new("/w"), &[], &[])
            .contains("/w"));
    }

    #[test]
    fn fd_paths() {
        let mut buf = [0u8; FD_PATH_LEN];
        for fd in [0, 6, 10, 1234, c_int::MAX] {
            assert_eq!(
                fd_path(fd, &mut buf).to_str().ok(),
                Some(format!("/proc/self/fd/{fd}").as_str())
            );
        }
    }
}
