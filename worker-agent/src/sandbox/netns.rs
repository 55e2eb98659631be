//! Network namespaces made ahead, for sandboxes with `network = none` or `proxy`: the sandbox's
//! outer helper joins a fresh one (setns) instead of making it (unshare `CLONE_NEWNET`).
//!
//! Why: making a network namespace is the dearest step of a sandbox's set-up on these
//! machines (0.5-0.75 ms in unshare: the loopback device, every per-namespace sysctl table), on
//! the path of every dispatch. A thread of the spawner makes them ahead, a few at a time, and
//! each is used once: a namespace no task has touched is what the sandbox would have made
//! itself (only `lo`, down). This moves the cost off the dispatch path, not off the CPU. A
//! namespace taken is replaced once nothing has been taken for [`QUIET`] (or at once when
//! fewer than half are left): made right away, it competed for the CPU with the set-up of the
//! attempt that took one (0.45–0.6 ms of its dispatch on two cores).
//!
//! Lives in the spawner (the outer helper inherits its descriptors at the fork) and only where
//! the worker runs as root: inside the user namespace an unprivileged sandbox makes, a
//! namespace made outside it could not be joined. Nothing here logs (see the `spawner`
//! module); a failure stops the pool, and sandboxes make their own as before.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::child;

/// Namespaces kept ready.
const READY: usize = 4;

/// After an attempt took a namespace, the next is made once the pool has not been taken from
/// for this long, unless fewer than half are left: making one is 0.5–0.75 ms of CPU, and on
/// two cores right away it would compete with the set-up of the attempt that just took one.
const QUIET: Duration = Duration::from_millis(5);

/// The pool; its thread is joined when it is dropped.
#[derive(Debug)]
pub(super) struct Pool {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

#[derive(Debug, Default)]
struct State {
    ready: Vec<OwnedFd>,
    /// When a namespace was last taken.
    taken: Option<Instant>,
    closed: bool,
    /// Why the pool stopped, for the worker's log.
    broken: Option<String>,
}

impl Pool {
    /// Starts the thread that keeps [`READY`] namespaces made.
    pub(super) fn new() -> Pool {
        let shared = Arc::new(Shared::default());
        let theirs = shared.clone();
        let thread = std::thread::Builder::new()
            .name("drover-netns".into())
            .stack_size(128 * 1024)
            .spawn(move || maker(&theirs))
            .map_err(|e| lock(&shared).broken = Some(format!("cannot start its thread: {e}")))
            .ok();
        Pool { shared, thread }
    }

    /// A fresh namespace, if one is ready; the thread makes another.
    pub(super) fn take(&self) -> Option<OwnedFd> {
        let fd = {
            let mut state = lock(&self.shared);
            state.taken = Some(Instant::now());
            state.ready.pop()
        };
        self.shared.wake.notify_one();
        fd
    }

    /// Why the pool stopped making namespaces, once.
    pub(super) fn take_broken(&self) -> Option<String> {
        lock(&self.shared)
            .broken
            .take()
            .map(|why| format!("network namespaces are no longer made ahead: {why}"))
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        lock(&self.shared).closed = true;
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn maker(shared: &Shared) {
    let home = match std::fs::File::open("/proc/thread-self/ns/net") {
        Ok(f) => OwnedFd::from(f),
        Err(e) => {
            lock(shared).broken = Some(format!("cannot open this thread's namespace: {e}"));
            return;
        }
    };
    let mut state = lock(shared);
    loop {
        if state.closed {
            return;
        }
        match next(state.ready.len(), state.taken.map(|t| t.elapsed())) {
            Next::Wait(None) => {
                state = shared.wake.wait(state).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            Next::Wait(Some(left)) => {
                state = shared
                    .wake
                    .wait_timeout(state, left)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
                continue;
            }
            Next::Make => {}
        }
        drop(state);
        let made = child::make_netns(home.as_fd());
        state = lock(shared);
        match made {
            Ok(fd) => state.ready.push(fd),
            Err(errno) => {
                state.broken = Some(format!("cannot make one: {errno}"));
                return;
            }
        }
    }
}

/// What the maker does next.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    /// Make a namespace now.
    Make,
    /// Wait to be woken, or at most this long.
    Wait(Option<Duration>),
}

/// With `ready` namespaces made, the last taken `since_take` ago.
fn next(ready: usize, since_take: Option<Duration>) -> Next {
    if ready >= READY {
        return Next::Wait(None);
    }
    match since_take {
        Some(since) if ready >= READY / 2 && since < QUIET => Next::Wait(Some(QUIET - since)),
        _ => Next::Make,
    }
}

fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, State> {
    shared.state.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refills_wait_for_a_quiet_moment_unless_few_are_left() {
        let ms = Duration::from_millis;
        assert_eq!(next(READY, None), Next::Wait(None), "full");
        assert_eq!(next(READY, Some(ms(0))), Next::Wait(None), "full");
        assert_eq!(next(0, None), Next::Make, "empty at start");
        assert_eq!(next(READY - 1, None), Next::Make, "never taken");
        assert_eq!(
            next(READY - 1, Some(ms(1))),
            Next::Wait(Some(QUIET - ms(1))),
            "just taken: wait out the attempt's set-up"
        );
        assert_eq!(next(READY - 1, Some(QUIET)), Next::Make, "quiet since");
        assert_eq!(next(READY / 2 - 1, Some(ms(0))), Next::Make, "few left");
    }
}
