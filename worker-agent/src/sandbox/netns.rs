//! Network namespaces made ahead, for sandboxes with `network = none` or `proxy`: the sandbox's
//! outer helper joins a fresh one (setns) instead of making it (unshare `CLONE_NEWNET`).
//!
//! Why: making a network namespace is the dearest step of a sandbox's set-up on these
//! machines (0.5-0.75 ms in unshare: the loopback device, every per-namespace sysctl table), on
//! the path of every dispatch. A thread of the spawner makes them ahead, a few at a time, and
//! each is used once: a namespace no task has touched is what the sandbox would have made
//! itself (only `lo`, down). This moves the cost off the dispatch path, not off the CPU.
//!
//! Lives in the spawner (the outer helper inherits its descriptors at the fork) and only where
//! the worker runs as root: inside the user namespace an unprivileged sandbox makes, a
//! namespace made outside it could not be joined. Nothing here logs (see the `spawner`
//! module); a failure stops the pool, and sandboxes make their own as before.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use super::child;

/// Namespaces kept ready.
const READY: usize = 4;

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
        let fd = lock(&self.shared).ready.pop();
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
        while !state.closed && state.ready.len() >= READY {
            state = shared.wake.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        if state.closed {
            return;
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

fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, State> {
    shared.state.lock().unwrap_or_else(|e| e.into_inner())
}
