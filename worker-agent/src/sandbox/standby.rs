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
//! Sandboxes made ahead: once a sandboxed attempt has run, the helpers started after it are
//! sent its [`View`] first — everything of its sandbox but the workspace: the namespaces, the
//! read-only tree, /proc, /sys, /dev, the masks and the kept files. The helper makes it while
//! it waits ([`child::run_prepared`]): it unshares the namespaces (a network namespace of its
//! own included) and forks the sandbox's init, which opens the directory the workspaces are
//! made in, builds the view, says so with a byte on the socket (`Standby::made`), and waits
//! for the plan. With the plan it binds the workspace (opened through that directory, which
//! the masks do not hide from it), sets the hostname and starts the task. That took the
//! namespaces and mounts, about 0.6 ms, off the dispatch path (docs/benchmarks.md, ninth
//! round). An attempt whose view differs (another network policy, say) is not handed to such
//! a helper: the pool lets the helpers with the old view go and the attempt is forked, or
//! handed to a helper that made nothing; the helpers after it make the new view. No view is
//! made where the attempt has a user namespace of its own (its id maps are written by S). A
//! helper found gone at its hand-off, which may have failed at making its view (it says why
//! on stderr), turns making views off for the pool. The init's process name is
//! [`READY_COMM`].
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

use super::child::{self, ChildPlan, Mask, Rebind, SandboxSetup, SysMount, STANDBY_FD};
use super::spawner;

/// The argument that runs the worker binary as a standby helper (never typed by anyone).
pub const HELPER_ARG: &str = "--drover-standby-helper";

/// A standby helper's process name.
pub const COMM: &str = "drover-standby";

/// The process name of a standby helper's init while it holds a sandbox made ahead (see
/// [`View`]), and so of pid 1 in the sandbox of an attempt it takes.
pub const READY_COMM: &str = "drover-ready";

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
    /// The view it was sent to make ahead, if any.
    pub(super) prepared: Option<View>,
}

/// First byte of a message to a standby helper: a [`View`] to make ahead.
pub(super) const PREPARE: u8 = b'P';
/// First byte of a message to a standby helper: its [`ChildPlan`] (with the descriptors).
pub(super) const RUN: u8 = b'R';

/// What a standby helper can make of an attempt's sandbox before the attempt exists: the
/// namespaces and the file system view but for the workspace (see [`child::run_prepared`]).
/// Made from one attempt's plan ([`View::of`]) for helpers started after it; an attempt whose
/// plan gives the same view is handed to such a helper, any other to a fresh one.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct View {
    pub(crate) unshare_flags: libc::c_int,
    pub(crate) sys: SysMount,
    /// The plan's masks, without the workspace itself among what they create.
    pub(crate) masks: Vec<Mask>,
    /// The mask the workspace is made in, left writable until it is.
    pub(crate) workspace_mask: Option<usize>,
    /// What is bound back besides the workspace (kept files, read-only).
    pub(crate) keep: Vec<Rebind>,
    /// The directory the workspace is in (the same for every attempt of a worker).
    pub(crate) workspaces: CString,
}

impl View {
    /// The view of a sandboxed attempt's `setup` with its `workspace`, as its helper would
    /// make it; `None` where one cannot be made ahead: a user namespace (its id maps are
    /// written by S), a network namespace already chosen, a workspace that is not the first
    /// rebind or has no parent.
    pub(crate) fn of(setup: &SandboxSetup, workspace: &CStr) -> Option<View> {
        if setup.id_maps.is_some() || setup.net_ns.is_some() {
            return None;
        }
        let (first, keep) = setup.rebinds.split_first()?;
        if first.path.as_c_str() != workspace || !first.writable {
            return None;
        }
        let bytes = workspace.to_bytes();
        let cut = bytes.iter().rposition(|b| *b == b'/')?;
        if cut + 1 == bytes.len() {
            return None;
        }
        let workspaces = CString::new(if cut == 0 { &b"/"[..] } else { &bytes[..cut] }).ok()?;
        let mut workspace_mask = None;
        let masks = setup
            .masks
            .iter()
            .enumerate()
            .map(|(i, mask)| {
                let mut mask = mask.clone();
                let before = mask.creates.len();
                mask.creates
                    .retain(|(path, _)| path.as_c_str() != workspace);
                if mask.creates.len() != before {
                    workspace_mask = Some(i);
                }
                mask
            })
            .collect();
        Some(View {
            unshare_flags: setup.unshare_flags,
            sys: setup.sys,
            masks,
            workspace_mask,
            keep: keep.to_vec(),
            workspaces,
        })
    }
}

impl Standby {
    /// Whether the sandbox it was sent to make ahead is made: its init says so with a byte on
    /// the socket, read here without waiting (and left there).
    pub(super) fn made(&self) -> bool {
        use nix::sys::socket::{recv, MsgFlags};
        use std::os::fd::AsRawFd;
        let mut byte = [0u8; 1];
        let flags = MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT;
        recv(self.sock.as_raw_fd(), &mut byte, flags) == Ok(1)
    }
}

/// The helper's life: one plan, then [`child::run`] (which never returns); or first a view to
/// make ahead, then [`child::run_prepared`].
fn helper_main() -> ! {
    // Rust's runtime catches SIGSEGV and SIGBUS (to report stack overflows); the sandbox's
    // init, started from this process with its dispositions, must die of them like any
    // process.
    child::default_fault_signals();
    // Its name in `ps` and /proc (an exec of /proc/self/exe would be called "exe"); the
    // sandbox's init, started from it, has it too.
    let _ = std::fs::write("/proc/thread-self/comm", COMM);
    let mut buf = vec![0u8; spawner::MESSAGE_MAX + 1];
    let (tag, n, fds) = next_message(&mut buf);
    match tag {
        PREPARE => {
            drop(fds);
            let view: View = match postcard::from_bytes(&buf[1..n]) {
                Ok(view) => view,
                Err(e) => quit(&format!("cannot decode its view: {e}")),
            };
            // The same buffer for the plan: its pages are there already, in the init's copy.
            let mut next = move || match next_message(&mut buf) {
                (RUN, n, fds) => Some(plan_of(&buf[1..n], fds)),
                _ => quit("a second view came instead of a plan"),
            };
            child::run_prepared(&view, &mut next)
        }
        RUN => child::run(&plan_of(&buf[1..n], fds)),
        _ => quit("a message of an unknown kind came"),
    }
}

/// The next message: its tag, length and descriptors. The end of the socket (let go) exits.
fn next_message(buf: &mut [u8]) -> (u8, usize, Vec<std::os::fd::OwnedFd>) {
    let (n, fds) = loop {
        match spawner::receive(STANDBY_FD, buf) {
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            // The spawner closed its end with the init's byte unread (see `Standby::made`):
            // said once, before what is queued (a plan, or the end).
            Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => continue,
            Err(e) => quit(&format!("cannot read its plan: {e}")),
            Ok(got) => break got,
        }
    };
    if n == 0 {
        // Let go before any attempt came.
        child::exit(0);
    }
    (buf[0], n, fds)
}

/// The plan in `bytes`, with `fds` in its fields and stacks for its helpers.
fn plan_of(bytes: &[u8], fds: Vec<std::os::fd::OwnedFd>) -> ChildPlan {
    let mut plan: ChildPlan = match postcard::from_bytes(bytes) {
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
    // Open until the plan's run has moved them where the plan says (it closes the rest).
    std::mem::forget(fds);
    plan
}

/// Ends a helper that cannot run its plan, saying why on the worker's stderr (the journal).
/// The attempt's setup pipe then reaches EOF without a record and the helper's exit status
/// is its failure, as when a forked helper cannot arrange its descriptors.
fn quit(why: &str) -> ! {
    let _ = writeln!(std::io::stderr(), "drover-worker standby helper: {why}");
    child::exit(126)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::child::MaskKind;

    fn c(s: &str) -> CString {
        CString::new(s).expect("no NUL")
    }

    fn setup(workspace: &str, network_ns: bool) -> SandboxSetup {
        SandboxSetup {
            unshare_flags: libc::CLONE_NEWNS | libc::CLONE_NEWPID,
            net_ns: network_ns.then_some(9),
            proxy_port: None,
            id_maps: None,
            hostname: b"drover-t".to_vec(),
            sys: SysMount::Fresh,
            masks: vec![
                Mask {
                    path: c("/run"),
                    kind: MaskKind::Empty,
                    creates: vec![(c("/run/resolv"), true), (c("/run/resolv/conf"), false)],
                },
                Mask {
                    path: c("/srv/drover"),
                    kind: MaskKind::Empty,
                    creates: vec![(c("/srv/drover/tasks"), true), (c(workspace), true)],
                },
            ],
            rebinds: vec![
                Rebind {
                    path: c(workspace),
                    writable: true,
                },
                Rebind {
                    path: c("/run/resolv/conf"),
                    writable: false,
                },
            ],
        }
    }

    #[test]
    fn a_view_is_the_sandbox_but_its_workspace() {
        let ws = c("/srv/drover/tasks/t-1");
        let view = View::of(&setup("/srv/drover/tasks/t-1", false), &ws).expect("a view");
        assert_eq!(view.workspaces, c("/srv/drover/tasks"));
        assert_eq!(view.workspace_mask, Some(1));
        assert_eq!(view.masks[1].creates, [(c("/srv/drover/tasks"), true)]);
        assert_eq!(view.masks[0], setup("/x/y", false).masks[0], "untouched");
        assert_eq!(view.keep.len(), 1);
        assert_eq!(view.keep[0].path, c("/run/resolv/conf"));
        // Another attempt of the same worker: the same view, so its helper fits.
        let other = c("/srv/drover/tasks/t-2");
        assert_eq!(
            View::of(&setup("/srv/drover/tasks/t-2", false), &other),
            Some(view.clone())
        );
        // Another sandbox: another view.
        let mut host = setup("/srv/drover/tasks/t-2", false);
        host.sys = SysMount::Rebind;
        assert_ne!(View::of(&host, &other), Some(view));
    }

    #[test]
    fn no_view_where_it_cannot_be_made_ahead() {
        let ws = c("/srv/drover/tasks/t-1");
        let mut user = setup("/srv/drover/tasks/t-1", false);
        user.id_maps = Some((b"0 1000 1".to_vec(), b"0 1000 1".to_vec()));
        assert_eq!(View::of(&user, &ws), None, "a user namespace");
        assert_eq!(
            View::of(&setup("/srv/drover/tasks/t-1", true), &ws),
            None,
            "a network namespace chosen already"
        );
        assert_eq!(
            View::of(&setup("/srv/drover/tasks/t-1", false), &c("/elsewhere/w")),
            None,
            "the workspace is not the first rebind"
        );
        let mut root = setup("/", false);
        root.masks.clear();
        assert_eq!(View::of(&root, &c("/")), None, "no parent");
        // A workspace under no mask: bound onto itself, nothing made.
        let mut plain = setup("/w/t-1", false);
        plain.masks.truncate(1);
        let view = View::of(&plain, &c("/w/t-1")).expect("a view");
        assert_eq!((view.workspace_mask, view.workspaces), (None, c("/w")));
    }
}
