//! Warm attempt cgroups (cgroup v1): a cgroup of its own (new, or emptied and reset after an
//! earlier attempt) with a thread already waiting inside it, so the attempt's first process is
//! *born* in its cgroup instead of moving in. The pool lives in the spawner (see the `spawner`
//! module), whose threads do the forking.
//!
//! Why: moving a process into a cgroup (a write to `cgroup.procs`) takes the kernel's global
//! `cgroup_threadgroup_rwsem` for writing, and a writer of that per-CPU rwsem waits for an RCU
//! grace period when the lock was idle — 8–13 ms on an idle host of this kind, 10–40 ms on a
//! loaded one, on the path of every dispatch. A process forked by a thread that is already in
//! the cgroup starts in it (fork takes the rwsem for reading only). So the move is done ahead,
//! off the dispatch path, by a thread: v1 lets a single thread join a cgroup (its `tasks`
//! file), which v2 does not (v2 hosts have `clone3(CLONE_INTO_CGROUP)` for this; not used yet).
//!
//! How, per warm cgroup: a thread of the spawner creates a cgroup in every hierarchy (or takes
//! the recycled one it was given), writes its own thread id into each `tasks` file (the slow
//! move, while nothing waits for it), and waits for one job. [`Pool::take`] hands out a ready
//! one; [`Launcher::spawn`] runs the fork on that thread and the thread exits — leaving a
//! cgroup by exiting takes no migration — and `spawn` returns only once the thread is gone
//! from the cgroup, so nothing that kills or removes the attempt's cgroup can meet a spawner
//! thread in it.
//!
//! The pids limit cannot be in place while the thread still counts in the cgroup, and the
//! process the thread forked must not run task code before it is: [`Launcher::spawn`] returns
//! once the thread is joined and its id gone from the cgroup, the spawner then writes a byte to
//! a pipe the process waits on, and the process writes `pids.max` itself before anything else
//! (`child::PidsOnceAlone`). (Not "until `pids.current` reads 1": a process may have threads
//! of its own from its first instruction — a worker under qemu-user emulation forks a child
//! with qemu's threads.) The memory limit is written before the fork.
//!
//! With standby helpers enabled (see the `standby` module), the thread instead starts the
//! attempt's first process ahead, once inside, and exits: [`Warmed`] holds the helper, the
//! cgroup holds nothing else, and the spawner writes both limits before it hands the helper
//! its plan. A pool starts them while the attempts that take its cgroups are sandboxed and
//! come less often than every [`STANDBY_MIN_GAP`] ([`wants_standby`]): a helper's exec costs
//! more CPU than the fork it replaces (about 0.5 ms of the machine's per attempt), which only
//! pays while the dispatch is what an attempt waits for. Under a flood attempts wait in the
//! queue, and the CPU is what bounds the rate. A `process` attempt turns them off too: the
//! thread's vfork is as fast.
//!
//! The pool keeps up to [`Pool::want`] ready; the spawner tops it up when the worker says an
//! attempt's cgroup is gone (a thread moving into a cgroup holds the kernel's cgroup mutex
//! through its grace period, and an attempt's own rmdir would wait behind it), or hands it
//! back: an emptied warm cgroup the worker reset (`v1::Group::reset_for_reuse`) is re-entered
//! by a new thread instead of made anew. Making and removing a cgroup in three hierarchies
//! cost about 0.2 ms of this machine's CPU per attempt, the move in far less (measured with
//! C loops; docs/benchmarks.md, twelfth round). A spawn that finds none ready takes the cold
//! path (the child joins its cgroup itself). Every thread is owned by the pool and joined
//! when it is dropped. Nothing here logs (the spawner does not): what went wrong is kept in
//! [`Pool::take_notes`] for the worker to log.

use std::ffi::CStr;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::cgroup::{attempt_name_of, v1, write_control, CgroupLimits};
use super::child;
use super::spawner;
use super::standby::{Standby, View, HELPER_ARG, PREPARE};

/// A job for a warm thread: the fork it runs before it exits.
type Job = Box<dyn FnOnce() + Send>;

/// Attempts that come at least this far apart get standby helpers (see the module docs):
/// below 100 a second.
const STANDBY_MIN_GAP: Duration = Duration::from_millis(10);

/// Most standby helpers a pool holds at once: each is 0.6 MiB (Pss) of the worker's idle
/// footprint, and one attempt at a time, what they are for, needs one (two cover a refill
/// still under way).
const STANDBY_MAX: usize = 2;

/// Whether the cgroups made from now on get standby helpers, after a take for a `sandboxed`
/// attempt or not that came `gap` after the one before (`None`: the first).
fn wants_standby(sandboxed: bool, gap: Option<Duration>) -> bool {
    sandboxed && gap.is_none_or(|gap| gap >= STANDBY_MIN_GAP)
}

/// How well a ready warm cgroup fits an attempt, higher is better. A sandboxed attempt: a
/// standby helper that made its sandbox ahead, then one that made nothing, then one still
/// making it (the attempt would wait for the rest), then no helper (a fork); a helper that
/// made another sandbox is of no use to it. A `process` attempt: no helper (its vfork is as
/// fast), then a helper that made nothing.
fn fit(warmed: &Warmed, sandboxed: bool, view: Option<&View>) -> u8 {
    match (&warmed.standby, sandboxed) {
        (Some(s), true) if s.prepared.is_some() && s.prepared.as_ref() == view => {
            if s.made() {
                4
            } else {
                2
            }
        }
        (Some(s), _) if s.prepared.is_none() => 3,
        (None, false) => 4,
        (None, true) => 1,
        (Some(_), _) => 0,
    }
}

/// Stack of a warm thread: it forks and nothing else.
const STACK_BYTES: usize = 256 * 1024;

/// Warm cgroups of one sandbox; see the module docs.
#[derive(Debug)]
pub(super) struct Pool {
    bases: v1::Bases,
    want: usize,
    /// The worker's pid, for the cgroups' names (see the `cgroup` module's naming invariant).
    owner: u32,
    /// The binary standby helpers exec, when enabled.
    standby: Option<&'static CStr>,
    state: Arc<Mutex<State>>,
}

#[derive(Debug, Default)]
struct State {
    ready: Vec<Warmed>,
    /// Threads creating and entering a cgroup, not yet ready.
    starting: usize,
    /// Every thread started and not yet joined.
    threads: Vec<JoinHandle<()>>,
    /// Cgroups no attempt will get: of threads that found the pool closed or could not enter
    /// a recycled one, and recycled ones whose thread could not start. Removed at a later
    /// refill, once their threads are gone.
    orphans: Vec<v1::Group>,
    closed: bool,
    /// Set when a thread could not enter its cgroup: the pool stops trying.
    broken: bool,
    /// Warnings for the worker to log.
    notes: Vec<String>,
    /// Whether new warm cgroups get a standby helper ([`wants_standby`]).
    standby_wanted: bool,
    /// Threads starting a standby helper now.
    standby_starting: usize,
    /// When a warm cgroup was last taken.
    last_take: Option<std::time::Instant>,
    /// Set when a standby helper could not be started: the pool stops trying.
    standby_broken: bool,
    /// Standby helpers let go, for the worker to reap (they are its children).
    reap: Vec<i32>,
    /// What new standby helpers make ahead: the view of the last sandboxed attempt (see
    /// [`View`]).
    view: Option<View>,
    /// Set when a helper that was making its sandbox ahead was found gone: new ones are not
    /// asked to any more.
    prepare_broken: bool,
}

/// A ready warm cgroup: its directories and the thread waiting inside.
#[derive(Debug)]
pub(super) struct Warmed {
    pub(super) group: v1::Group,
    launcher: Launcher,
    standby: Option<Standby>,
}

/// The thread waiting inside a taken cgroup.
#[derive(Debug)]
pub(super) struct Launcher {
    tid: i32,
    thread: std::thread::ThreadId,
    jobs: SyncSender<Job>,
    /// Its handle, moved here from the pool when taken (joined once it has forked).
    handle: Option<JoinHandle<()>>,
}

impl Warmed {
    /// The view its standby helper made ahead, if any.
    pub(super) fn prepared(&self) -> Option<&View> {
        self.standby.as_ref().and_then(|s| s.prepared.as_ref())
    }

    pub(super) fn into_parts(self) -> (v1::Group, Launcher, Option<Standby>) {
        (self.group, self.launcher, self.standby)
    }
}

impl Pool {
    /// A pool keeping `want` warm cgroups under `bases` for the worker `owner`, filling up
    /// from now on.
    /// With `standby`, its cgroups get standby helpers that exec it (see the module docs).
    pub(super) fn new(
        bases: v1::Bases,
        want: usize,
        owner: u32,
        standby: Option<&'static CStr>,
    ) -> Pool {
        let pool = Pool {
            bases,
            want,
            owner,
            standby,
            state: Arc::new(Mutex::new(State {
                standby_wanted: true,
                ..State::default()
            })),
        };
        pool.refill(None);
        pool
    }

    /// Warm cgroups ready now.
    pub(super) fn ready(&self) -> usize {
        lock(&self.state).ready.len()
    }

    /// What went wrong since the last call, for the worker to log.
    pub(super) fn take_notes(&self) -> Vec<String> {
        std::mem::take(&mut lock(&self.state).notes)
    }

    /// Standby helpers let go since the last call, for the worker to reap.
    pub(super) fn take_reap(&self) -> Vec<i32> {
        std::mem::take(&mut lock(&self.state).reap)
    }

    /// Lets a standby helper go: its socket closes, it exits, and the worker reaps it.
    pub(super) fn let_go(&self, standby: Standby) {
        drop(standby.sock);
        lock(&self.state).reap.push(standby.pid);
    }

    /// New standby helpers make nothing ahead from now on (see [`State::prepare_broken`]).
    pub(super) fn stop_preparing(&self) {
        let mut state = lock(&self.state);
        state.prepare_broken = true;
        state.view = None;
    }

    /// A warning for the worker to log.
    pub(super) fn note(&self, note: String) {
        lock(&self.state).notes.push(note);
    }

    /// A taken cgroup not used after all, removed once it is empty (at a later refill).
    pub(super) fn orphan(&self, group: v1::Group) {
        lock(&self.state).orphans.push(group);
    }

    /// A ready warm cgroup, if there is one, for a `sandboxed` attempt or not (which, with
    /// the rate of takes, decides whether the cgroups made from now on get standby helpers)
    /// whose sandbox would be `view` (which new helpers then make ahead). Call
    /// [`Pool::refill`] after the spawn.
    pub(super) fn take(&self, sandboxed: bool, view: Option<&View>) -> Option<Warmed> {
        let mut state = lock(&self.state);
        let now = std::time::Instant::now();
        let gap = state.last_take.map(|t| now.duration_since(t));
        state.standby_wanted = wants_standby(sandboxed, gap);
        state.last_take = Some(now);
        if sandboxed && !state.prepare_broken && state.view.as_ref() != view {
            state.view = view.cloned();
            // Helpers that made another sandbox ahead would hold their places (at most
            // `STANDBY_MAX`) for attempts that no longer come: let them go, and their cgroups
            // with them (the threads are gone already).
            let (stale, ready): (Vec<_>, Vec<_>) = std::mem::take(&mut state.ready)
                .into_iter()
                .partition(|w| w.prepared().is_some_and(|made| Some(made) != view));
            state.ready = ready;
            for warmed in stale {
                let (group, _launcher, standby) = warmed.into_parts();
                if let Some(standby) = standby {
                    state.reap.push(standby.pid);
                }
                state.orphans.push(group);
            }
        }
        // The best fit (see `fit`); of equals, the newest.
        let (i, _) = state
            .ready
            .iter()
            .enumerate()
            .max_by_key(|(i, w)| (fit(w, sandboxed, view), *i))?;
        let mut warmed = state.ready.swap_remove(i);
        if let Some(i) = state
            .threads
            .iter()
            .position(|h| h.thread().id() == warmed.launcher.thread)
        {
            warmed.launcher.handle = Some(state.threads.swap_remove(i));
        }
        Some(warmed)
    }

    /// Start threads until ready + starting reaches `want` (each creates its cgroup and moves
    /// in by itself; the first re-enters `recycled`, an emptied attempt cgroup the worker
    /// reset, instead: see `v1::Group::reset_for_reuse`); join the ones that are done. A
    /// recycled cgroup the pool has no room for is removed.
    pub(super) fn refill(&self, recycled: Option<String>) {
        let mut state = lock(&self.state);
        let mut i = 0;
        while i < state.threads.len() {
            if state.threads[i].is_finished() {
                let _ = state.threads.swap_remove(i).join();
            } else {
                i += 1;
            }
        }
        let mut recycled = recycled;
        while !state.closed && !state.broken && state.ready.len() + state.starting < self.want {
            let (name, reuse) = match recycled.take() {
                Some(name) => (name, true),
                None => {
                    // Unique in the process: a worker has one sandbox, tests have many.
                    static NEXT: AtomicU64 = AtomicU64::new(1);
                    // Several spawners may serve one worker over its life (and tests run
                    // several at once), each counting from the same copy of NEXT: its pid
                    // keeps names apart.
                    let name = attempt_name_of(
                        self.owner,
                        NEXT.fetch_add(1, Ordering::Relaxed),
                        &format!("warm{}", std::process::id()),
                        0,
                    );
                    (name, false)
                }
            };
            let (bases, shared, standby) = (self.bases.clone(), self.state.clone(), self.standby);
            // A recycled cgroup whose thread cannot start is removed at a later refill.
            let unused = reuse.then(|| self.bases.existing(&name));
            let spawned = std::thread::Builder::new()
                .name("drover-warm".into())
                .stack_size(STACK_BYTES)
                .spawn(move || warm_thread(&bases, &name, reuse, standby, shared));
            match spawned {
                Ok(handle) => {
                    state.starting += 1;
                    state.threads.push(handle);
                }
                Err(err) => {
                    state.orphans.extend(unused);
                    state.notes.push(format!("cannot start a warm cgroup thread ({err}); attempts join their cgroups themselves"));
                    state.broken = true;
                    break;
                }
            }
        }
        // A recycled cgroup the pool has no room for goes with the orphans.
        state
            .orphans
            .extend(recycled.map(|name| self.bases.existing(&name)));
        // Cgroups left by threads that gave up, once those threads are gone (EBUSY before).
        state.orphans.retain(|group| {
            group
                .dirs()
                .iter()
                .any(|dir| std::fs::remove_dir(dir).is_err() && dir.exists())
        });
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let (ready, threads) = {
            let mut state = lock(&self.state);
            state.closed = true;
            (
                std::mem::take(&mut state.ready),
                std::mem::take(&mut state.threads),
            )
        };
        let mut groups = Vec::new();
        for warmed in ready {
            // A standby helper sees its socket close and exits. The spawner is going away
            // with this pool, so no reply reports it: the worker reaps it at its own exit.
            let (group, launcher, _standby) = warmed.into_parts();
            // Closing its channel lets the thread exit, which takes it out of the cgroup.
            drop(launcher);
            groups.push(group);
        }
        for thread in threads {
            let _ = thread.join();
        }
        groups.append(&mut lock(&self.state).orphans);
        for group in groups {
            for dir in group.dirs() {
                // The worker removes what is left when it next starts (a dead owner's cgroup).
                let _ = std::fs::remove_dir(dir);
            }
        }
    }
}

/// A warm thread's life: create cgroup `name` (or, with `reuse`, take the existing one), move
/// in, then either start a standby helper (with `standby`, while wanted) and exit, or wait for
/// one job, run it and exit.
fn warm_thread(
    bases: &v1::Bases,
    name: &str,
    reuse: bool,
    standby: Option<&'static CStr>,
    state: Arc<Mutex<State>>,
) {
    let made = if reuse {
        Ok(bases.existing(name))
    } else {
        bases.create(name, CgroupLimits::default())
    };
    let group = match made {
        Ok(g) => g,
        Err(err) => {
            let mut s = lock(&state);
            s.starting -= 1;
            s.broken = true;
            s.notes.push(format!(
                "cannot create a warm cgroup ({err}); attempts join their cgroups themselves"
            ));
            return;
        }
    };
    let tid = nix::unistd::gettid().as_raw();
    let entered = group.dirs().iter().try_for_each(|dir| {
        write_control(
            &dir.join("tasks"),
            &tid.to_string(),
            "move a warm thread into",
        )
    });
    // Counted in `standby_starting` until the push below (under one lock, so that no other
    // thread sees it neither starting nor held).
    let counted = standby.is_some() && entered.is_ok() && {
        let mut s = lock(&state);
        let held = s.ready.iter().filter(|w| w.standby.is_some()).count();
        let wanted =
            s.standby_wanted && !s.standby_broken && held + s.standby_starting < STANDBY_MAX;
        s.standby_starting += usize::from(wanted);
        wanted
    };
    let standby = standby
        .filter(|_| counted)
        .and_then(|exe| start_standby(exe, &state));
    let has_standby = standby.is_some();
    let (jobs, rx) = sync_channel::<Job>(1);
    {
        let mut s = lock(&state);
        s.starting -= 1;
        s.standby_starting -= usize::from(counted);
        if entered.is_err() && reuse {
            // A recycled cgroup that went away or will not take the thread: removed at a
            // later refill; the next one is made new.
            s.orphans.push(group);
            return;
        }
        if let Err(err) = entered {
            // Half in, maybe: the thread's exit takes it out of wherever it got.
            s.notes.push(format!("a warm thread cannot enter its cgroup ({err}); attempts join their cgroups themselves"));
            s.broken = true;
            s.orphans.push(group);
            return;
        }
        if s.closed {
            s.orphans.push(group);
            return;
        }
        s.ready.push(Warmed {
            group,
            launcher: Launcher {
                tid,
                thread: std::thread::current().id(),
                jobs,
                handle: None,
            },
            standby,
        });
    }
    if has_standby {
        // The helper is the attempt's first process: this thread leaves the cgroup now, off
        // the dispatch path (`Launcher::release` at the take only makes sure it is gone).
        return;
    }
    // A job, or the pool closing (the sender dropped): either way this thread then exits.
    if let Ok(job) = rx.recv() {
        job();
    }
}

/// Starts a standby helper from this thread (so in its cgroup); on failure, notes why, stops
/// the pool's standby helpers and returns `None` (the attempt's first process is forked).
fn start_standby(exe: &CStr, state: &Mutex<State>) -> Option<Standby> {
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    let started = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|errno| (errno, None))
    .and_then(|(ours, theirs)| {
        let arg = std::ffi::CString::new(HELPER_ARG).expect("no NUL");
        child::start_standby(exe, c"drover-worker", &arg, theirs.as_raw_fd()).map(|pid| Standby {
            pid,
            sock: ours,
            prepared: None,
        })
    })
    .map(|mut standby| {
        // It makes the last sandboxed attempt's view ahead. A view that cannot be sent (too
        // large) is not made; the helper still takes a plan.
        let view = lock(state).view.clone();
        if let Some(view) = view {
            let sent = postcard::to_extend(&view, vec![PREPARE]).is_ok_and(|bytes| {
                bytes.len() <= spawner::MESSAGE_MAX + 1
                    && spawner::send(standby.sock.as_raw_fd(), &bytes, &[]).is_ok()
            });
            if sent {
                standby.prepared = Some(view);
            }
        }
        standby
    });
    match started {
        Ok(standby) => Some(standby),
        Err((errno, pid)) => {
            let mut s = lock(state);
            s.reap.extend(pid);
            if !s.standby_broken {
                s.standby_broken = true;
                s.notes.push(format!(
                    "cannot start a standby helper ({} {}: {errno}); attempts' first processes are forked from now on",
                    exe.to_string_lossy(),
                    HELPER_ARG
                ));
            }
            None
        }
    }
}

impl Launcher {
    /// Runs `fork` on the thread inside the cgroup, so the process starts in it; returns once
    /// that thread has exited (it is then no longer in the cgroup, nor counted by its pids
    /// controller). Blocks the caller (the spawner's main thread) for that long.
    pub(super) fn spawn<T: Send + 'static>(
        self,
        fork: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        let (tx, rx) = sync_channel(1);
        let job: Job = Box::new(move || {
            let _ = tx.send(fork());
        });
        let Launcher {
            tid, jobs, handle, ..
        } = self;
        let sent = jobs.send(job);
        drop(jobs);
        let forked = match sent {
            Ok(()) => rx
                .recv()
                .unwrap_or_else(|_| Err(io::Error::other("the warm thread ended without forking"))),
            Err(_) => Err(io::Error::other("the warm thread is gone")),
        };
        gone(tid, handle);
        forked
    }

    /// Lets the thread go without a job (it exits, leaving the cgroup); returns once it has.
    pub(super) fn release(self) {
        drop(self.jobs);
        gone(self.tid, self.handle);
    }
}

/// Until the thread `tid` has exited and left its cgroups: joined (sleeping until the kernel
/// clears its thread id), then its /proc entry watched until it goes — that happens once the
/// thread is released, after it left its cgroups, a moment after the join returns.
fn gone(tid: i32, handle: Option<JoinHandle<()>>) {
    if let Some(handle) = handle {
        let _ = handle.join();
    }
    wait_gone(tid);
}

/// Until the thread `tid` of this process has exited (its /proc entry goes once it is
/// released, after it left its cgroups). Microseconds in practice; bounded by 2 s.
fn wait_gone(tid: i32) {
    let entry = format!("/proc/self/task/{tid}");
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    let mut rounds = 0u32;
    while Path::new(&entry).exists() && std::time::Instant::now() < deadline {
        rounds += 1;
        if rounds < 100 {
            std::thread::yield_now();
        } else {
            std::thread::sleep(Duration::from_micros(50));
        }
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standby_helpers_are_for_sandboxed_attempts_that_come_apart() {
        let ms = Duration::from_millis;
        assert!(wants_standby(true, None), "the first take");
        assert!(wants_standby(true, Some(STANDBY_MIN_GAP)));
        assert!(wants_standby(true, Some(ms(500))));
        assert!(
            !wants_standby(true, Some(ms(3))),
            "a flood: forks are cheaper"
        );
        assert!(!wants_standby(false, None), "process isolation: vforks");
        assert!(!wants_standby(false, Some(ms(500))));
    }
}
