//! Standby helpers: an attempt's first process started before the attempt, so that the
//! dispatch path hands it its plan instead of forking it.
//!
//! Why: on the dispatch path of a sandboxed attempt, getting from the worker's request to a
//! running outer helper took 0.83 ms of the 3 ms goal (docs/benchmarks.md, seventh round): the
//! spawner wakes a warm thread (0.16 ms), the thread forks the spawner's memory — a first fork
//! after a pause, 0.3–0.4 ms of cold page tables and page counts — and the copy is scheduled
//! (0.14 ms). A process that already runs in the cgroup and only waits for its plan takes all
//! three off the path; handing it the plan is one message.
//!
//! How: a warm thread (see the `warm` module), once inside its cgroup, vforks a child that
//! execs the worker's own binary (`/proc/self/exe`: the same build, even after an upgrade
//! replaced the file) with [`HELPER_ARG`] ([`super::child::start_standby`]). The result is a
//! fresh single-threaded process — so, unlike a fork of the multi-threaded spawner, it may
//! allocate — born in the cgroup, and the worker's child (`CLONE_PARENT`), exactly where a
//! forked outer helper would be. It waits on [`STANDBY_FD`] for one message: its
//! [`ChildPlan`] (postcard) and the attempt's descriptors (SCM_RIGHTS, in the order of
//! `spawner::adopt`). It then runs the plan as the forked helper does ([`child::run`]). The
//! end of the socket closing without a message (its warm cgroup given up) makes it exit; the
//! spawner then has the worker reap it (`Reply`'s `reap`).
//!
//! If the spawner itself dies (a bug), its idle helpers see their sockets close and exit, but
//! no reply names them: they stay the worker's zombies until it exits (at most two per
//! spawner death).
//!
//! The cost moves off the path, not off the CPU: an exec of the worker binary per helper
//! (docs/benchmarks.md, eighth round, has the figures). So a pool holds at most two, and
//! starts them only while sandboxed attempts come at least 10 ms apart (see the `warm`
//! module). A failed hand-off (the helper gone, a plan too large for one message) falls back
//! to a fresh cgroup and a fork, as when no warm cgroup is ready. Only a binary whose `main`
//! calls [`run_helper_or_enable`] first has the mode: test binaries do not, and their
//! spawners fork.

use std::ffi::{CStr, CString};
use std::io::Write;
use std::sync::OnceLock;

use nix::libc;

use super::child::{self, ChildPlan, STANDBY_FD};
use super::spawner;

/// The argument that runs the worker binary as a standby helper (never typed by anyone).
pub const HELPER_ARG: &str = "--drover-standby-helper";

/// A standby helper's process name.
pub const COMM: &str = "drover-standby";

/// The binary standby helpers exec, once enabled.
static EXE: OnceLock<CString> = OnceLock::new();

/// Call first in `main` of the worker binary: runs the standby helper and never returns when
/// this process was started as one; otherwise enables standby helpers (this binary has the
/// mode) and returns.
pub fn run_helper_or_enable() {
    if std::env::args_os().nth(1).is_some_and(|a| a == HELPER_ARG) {
        helper_main()
    }
    enable_with(c"/proc/self/exe");
}

/// Enables standby helpers that exec `exe` (a binary whose `main` calls
/// [`run_helper_or_enable`]). For tests, whose own binary has no helper mode; affects
/// sandboxes detected afterwards.
pub fn enable_with(exe: &CStr) {
    let _ = EXE.set(exe.to_owned());
}

/// The binary to exec, when standby helpers are enabled.
pub(super) fn exe() -> Option<&'static CStr> {
    EXE.get().map(CString::as_c_str)
}

/// A started standby helper, as its warm cgroup holds it.
#[derive(Debug)]
pub(super) struct Standby {
    pub(super) pid: i32,
    /// Our end of its socket: one message hands it an attempt; closing it lets it go.
    pub(super) sock: std::os::fd::OwnedFd,
}

/// The helper's life: one plan, then [`child::run`] (which never returns).
fn helper_main() -> ! {
    // Rust's runtime catches SIGSEGV and SIGBUS (to report stack overflows); the sandbox's
    // init, started from this process with its dispositions, must die of them like any
    // process.
    child::default_fault_signals();
    // Its name in `ps` and /proc (an exec of /proc/self/exe would be called "exe"); the
    // sandbox's init, started from it, has it too.
    let _ = std::fs::write("/proc/thread-self/comm", COMM);
    let mut buf = vec![0u8; spawner::MESSAGE_MAX];
    let (n, fds) = loop {
        match spawner::receive(STANDBY_FD, &mut buf) {
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => quit(&format!("cannot read its plan: {e}")),
            Ok(got) => break got,
        }
    };
    if n == 0 {
        // Let go before any attempt came.
        child::exit(0);
    }
    let mut plan: ChildPlan = match postcard::from_bytes(&buf[..n]) {
        Ok(plan) => plan,
        Err(e) => quit(&format!("cannot decode its plan: {e}")),
    };
    let raw: Vec<_> = fds.iter().map(std::os::fd::AsRawFd::as_raw_fd).collect();
    if let Err(why) = spawner::adopt(&mut plan, &raw, true) {
        quit(&why);
    }
    if plan.sandbox.is_some() {
        match child::Stacks::helpers() {
            Ok(stacks) => plan.stacks = Some(stacks),
            Err(e) => quit(&format!("cannot map the helpers' stacks: {e}")),
        }
    }
    // The spawner's dispositions came with the exec: what it ignores is ignored here too.
    plan.from_spawner = true;
    // Open until `run` has moved them where the plan says (it closes the rest).
    std::mem::forget(fds);
    child::run(&plan)
}

/// Ends a helper that cannot run its plan, saying why on the worker's stderr (the journal).
/// The attempt's setup pipe then reaches EOF without a record and the helper's exit status
/// is its failure, as when a forked helper cannot arrange its descriptors.
fn quit(why: &str) -> ! {
    let _ = writeln!(std::io::stderr(), "drover-worker standby helper: {why}");
    child::exit(126)
}
