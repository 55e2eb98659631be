//! The forked side of an attempt: everything that runs between `fork` and `exec`.
//!
//! The worker is a multithreaded tokio process, so a forked child may only make
//! async-signal-safe calls until it execs (another thread may have held the allocator's lock at
//! the fork). This module therefore works from a [`ChildPlan`] the parent prepared completely
//! (every path, argv, envp and id map as C data) and makes raw syscalls only: no allocation, no
//! locks, no panics, no `std` I/O. All of the crate's `unsafe` for the sandbox lives here.
//!
//! Processes (sandbox isolation):
//! ```text
//! worker ─fork→ S (host pid ns): join cgroup, unshare(user?, mnt, uts, ipc, net?, pid, cgroup),
//!        │        make / private, set hostname; waits for I, reports I's status, exits
//!        └─fork→ I (pid 1 of the new pid ns, init): mount /proc, /sys, /tmp; reaps orphans;
//!                 │ when the task exits, reports its wait status and exits — the kernel then
//!                 │ SIGKILLs everything left in the pid namespace
//!                 └─fork→ T (pid 2): setsid, drop capabilities, no_new_privs, chdir, exec
//! ```
//! The task is not pid 1 on purpose: pid 1 ignores signals it has no handler for, so a task's
//! `kill -TERM $$` would do nothing. With process isolation S is T: it joins the cgroup, makes
//! its own process group and execs.
//!
//! File descriptors in every helper: 0-2 stdio (set by std), [`EVENTS_FD`] the events pipe (the
//! only one the task inherits besides stdio), 4 the setup pipe (close-on-exec: it reaches EOF in
//! the parent once the task has exec'd, or carries an error record), 5 the status pipe (S and I
//! only). Everything else inherited from the worker is closed first thing.
//!
//! Records on the setup and status pipes are [`RECORD_LEN`] bytes: a tag, a step, an index, a
//! pad byte, then an i32 (errno or wait status) in little endian.

#![allow(unsafe_code)]

use std::ffi::{CStr, CString};
use std::fmt;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::ptr;

use nix::errno::Errno;
use nix::libc::{self, c_char, c_int, c_void};

/// The task's events pipe (its `DROVER_EVENTS_FD`).
pub(crate) const EVENTS_FD: RawFd = 3;
const SETUP_FD: RawFd = 4;
const STATUS_FD: RawFd = 5;
/// Holds the workspace while /tmp is replaced; must match [`WORKSPACE_FD_PATH`].
const WORKSPACE_FD: RawFd = 6;
const WORKSPACE_FD_PATH: &CStr = c"/proc/self/fd/6";
/// Scratch copies are made at or above this, clear of the fixed numbers.
const SCRATCH_FD: RawFd = 10;

/// Bytes per record on the setup and status pipes.
pub(crate) const RECORD_LEN: usize = 8;
const TAG_ERROR: u8 = b'E';
const TAG_TASK: u8 = b'X';
const TAG_INIT: u8 = b'I';

/// Exit codes of the helper processes (never reported as the task's).
const EXIT_SETUP: c_int = 126;
const EXIT_EXEC: c_int = 127;

/// Everything the forked side needs, prepared by the parent.
#[derive(Debug)]
pub(crate) struct ChildPlan {
    /// `cgroup.procs` files to write `0` to.
    pub(crate) cgroup_procs: Vec<CString>,
    pub(crate) workspace: CString,
    /// Paths to try `execve` on, in order (the PATH search, done in the sandbox's view).
    pub(crate) candidates: Vec<CString>,
    pub(crate) argv: CArray,
    pub(crate) envp: CArray,
    /// Parent's numbers of the pipe write ends.
    pub(crate) setup_fd: RawFd,
    pub(crate) events_fd: RawFd,
    /// Present with sandbox isolation.
    pub(crate) status_fd: Option<RawFd>,
    /// `None`: process isolation.
    pub(crate) sandbox: Option<SandboxSetup>,
}

/// The namespace part of a [`ChildPlan`].
#[derive(Debug)]
pub(crate) struct SandboxSetup {
    pub(crate) unshare_flags: c_int,
    /// `/proc/self/uid_map` and `gid_map` contents when a user namespace is made.
    pub(crate) id_maps: Option<(Vec<u8>, Vec<u8>)>,
    pub(crate) hostname: Vec<u8>,
    pub(crate) sys: SysMount,
    /// When the workspace is under /tmp: the directories from /tmp down to it, outermost
    /// first, to recreate in the new /tmp before binding the workspace back.
    pub(crate) tmp_mkdirs: Vec<CString>,
}

/// What the sandbox's /sys becomes; read-only in both mounting cases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
}

impl Step {
    const ALL: [Step; 21] = [
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
    ];

    fn from_u8(v: u8) -> Option<Step> {
        Step::ALL.into_iter().find(|s| *s as u8 == v)
    }

    /// What the step does, with its paths, for an error message ("cannot <this>").
    pub(crate) fn describe(self, index: u8, cgroup_procs: &[PathBuf], workspace: &Path) -> String {
        let ws = workspace.display();
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
            Step::OpenWorkspace => format!("open the workspace {ws}"),
            Step::MountTmp => "mount a private tmpfs on /tmp".to_owned(),
            Step::MkdirWorkspace => {
                format!("recreate the path of the workspace {ws} in the new /tmp")
            }
            Step::BindWorkspace => format!("bind the workspace {ws} into the new /tmp"),
            Step::ForkTask => "fork the task".to_owned(),
            Step::Setsid => "start a session (setsid)".to_owned(),
            Step::NoNewPrivs => "set no_new_privs".to_owned(),
            Step::Chdir => format!("enter the workspace {ws}"),
            Step::Exec => "exec the command".to_owned(),
            Step::DropCaps => {
                "drop capabilities (the worker needs CAP_SETPCAP for that)".to_owned()
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

/// Runs in the child std forked, in place of its exec. Never returns: it execs the task or
/// `_exit`s (after an error record).
pub(crate) fn run(plan: &ChildPlan) -> ! {
    reset_signal_dispositions();
    if arrange_fds(plan).is_err() {
        exit(EXIT_SETUP);
    }
    for (i, procs) in plan.cgroup_procs.iter().enumerate() {
        if let Err(errno) = write_path(procs, b"0") {
            fail(Step::JoinCgroup, i, errno);
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

/// S: creates the namespaces, forks the init, waits for it.
fn outer(plan: &ChildPlan, setup: &SandboxSetup) -> ! {
    // SAFETY: unshare has no memory arguments.
    check(Step::Unshare, unsafe { libc::unshare(setup.unshare_flags) });
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
    // Without this, the mounts below would propagate back to the host's mount namespace.
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
    // SAFETY: pointer and length of a live buffer.
    check(Step::Hostname, unsafe {
        libc::sethostname(setup.hostname.as_ptr().cast(), setup.hostname.len())
    });
    // SAFETY: fork in a single-threaded process; the child only continues with this module's
    // async-signal-safe code.
    let init = unsafe { libc::fork() };
    if init < 0 {
        fail(Step::ForkInit, 0, Errno::last());
    }
    if init == 0 {
        run_init(plan, setup);
    }
    close_range(0, (STATUS_FD - 1) as u32);
    close_range((STATUS_FD + 1) as u32, u32::MAX);
    let status = wait_for(init);
    write_record(STATUS_FD, TAG_INIT, status);
    exit(0)
}

/// I: pid 1 of the new pid namespace.
fn run_init(plan: &ChildPlan, setup: &SandboxSetup) -> ! {
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
        // This process is a copy of the worker's memory: keep /proc/1/{mem,environ,...}
        // closed to a task that lacks CAP_SYS_PTRACE in the worker's user namespace.
        libc::prctl(libc::PR_SET_DUMPABLE, 0 as libc::c_ulong, 0, 0, 0);
    }
    let nodev = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    check(
        Step::MountProc,
        mount(c"proc", c"/proc", c"proc", nodev, None),
    );
    let sys_mounted = match setup.sys {
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
    let rebind = !setup.tmp_mkdirs.is_empty();
    if rebind {
        // SAFETY: valid NUL-terminated path.
        let fd = unsafe {
            libc::open(
                plan.workspace.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        check(Step::OpenWorkspace, fd);
        // Every number above STATUS_FD is free here, so open usually returns WORKSPACE_FD.
        if fd != WORKSPACE_FD {
            // SAFETY: plain fd syscalls.
            check(Step::OpenWorkspace, unsafe {
                libc::dup3(fd, WORKSPACE_FD, libc::O_CLOEXEC)
            });
            // SAFETY: as above.
            unsafe { libc::close(fd) };
        }
    }
    check(
        Step::MountTmp,
        mount(
            c"tmpfs",
            c"/tmp",
            c"tmpfs",
            libc::MS_NOSUID | libc::MS_NODEV,
            Some(c"mode=1777"),
        ),
    );
    if rebind {
        for (i, dir) in setup.tmp_mkdirs.iter().enumerate() {
            // SAFETY: valid NUL-terminated path.
            if unsafe { libc::mkdir(dir.as_ptr(), 0o755) } < 0 && Errno::last() != Errno::EEXIST {
                fail(Step::MkdirWorkspace, i, Errno::last());
            }
        }
        // SAFETY: valid NUL-terminated paths; bind mounts take no fs type or data.
        check(Step::BindWorkspace, unsafe {
            libc::mount(
                WORKSPACE_FD_PATH.as_ptr(),
                plan.workspace.as_ptr(),
                ptr::null(),
                libc::MS_BIND | libc::MS_REC,
                ptr::null(),
            )
        });
        // SAFETY: plain fd syscall.
        unsafe { libc::close(WORKSPACE_FD) };
    }
    // SAFETY: fork in a single-threaded process, as in `outer`.
    let task = unsafe { libc::fork() };
    if task < 0 {
        fail(Step::ForkTask, 0, Errno::last());
    }
    if task == 0 {
        // SAFETY: plain syscalls.
        unsafe { libc::close(STATUS_FD) };
        // SAFETY: as above.
        check(Step::Setsid, unsafe { libc::setsid() });
        drop_capabilities();
        exec_task(plan);
    }
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

/// T: the task's own process until exec.
fn exec_task(plan: &ChildPlan) -> ! {
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
        // EINVAL: past the kernel's last capability.
        if r < 0 && Errno::last() != Errno::EINVAL {
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
    // SAFETY: a zeroed sigaction is a valid value (SIG_DFL, empty mask, no flags).
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = libc::SIG_DFL;
    for signal in 1..65 {
        if signal != libc::SIGKILL && signal != libc::SIGSTOP {
            // SAFETY: `action` is a live, initialised sigaction; errors (reserved signals)
            // are harmless.
            unsafe { libc::sigaction(signal, &action, ptr::null_mut()) };
        }
    }
}

/// Moves the pipes to their fixed numbers and closes every other inherited descriptor.
fn arrange_fds(plan: &ChildPlan) -> Result<(), Errno> {
    let scratch = |fd: RawFd| {
        // SAFETY: fcntl on an fd number; failure is reported.
        Errno::result(unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, SCRATCH_FD) })
    };
    let setup = scratch(plan.setup_fd)?;
    let events = scratch(plan.events_fd)?;
    let status = match plan.status_fd {
        Some(fd) => Some(scratch(fd)?),
        None => None,
    };
    // SAFETY: plain fd syscalls; sources (>= SCRATCH_FD) never equal targets (< SCRATCH_FD).
    unsafe {
        Errno::result(libc::dup3(setup, SETUP_FD, libc::O_CLOEXEC))?;
        // Not close-on-exec: this is the one the task inherits.
        Errno::result(libc::dup2(events, EVENTS_FD))?;
        if let Some(status) = status {
            Errno::result(libc::dup3(status, STATUS_FD, libc::O_CLOEXEC))?;
        }
    }
    let first_free = if status.is_some() {
        STATUS_FD + 1
    } else {
        STATUS_FD
    };
    close_range(first_free as u32, u32::MAX);
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
    if result < 0 {
        fail(step, 0, Errno::last());
    }
}

fn exit(code: c_int) -> ! {
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
            .describe(0, &procs, Path::new("/w"))
            .contains("/sys/fs/cgroup/x/cgroup.procs"));
        assert!(Step::Chdir
            .describe(0, &procs, Path::new("/w"))
            .contains("/w"));
    }

    #[test]
    fn workspace_fd_path_matches() {
        assert_eq!(
            WORKSPACE_FD_PATH.to_str().ok(),
            Some(format!("/proc/self/fd/{WORKSPACE_FD}").as_str())
        );
    }
}
