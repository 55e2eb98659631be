//! Network namespaces made ahead, for sandboxes with `network = none` or `proxy`: the sandbox's
//! outer helper joins a ready one (setns) instead of making it (unshare `CLONE_NEWNET`); and
//! with `network = none`, used again once the attempt that joined it is over and nothing of
//! it is left in the namespace.
//!
//! Why: making a network namespace is the dearest step of a sandbox's set-up on these
//! machines (0.5-0.75 ms in unshare: the loopback device, every per-namespace sysctl table), and
//! the kernel's later teardown of it costs a third as much again, in a worker thread. A
//! thread of the spawner makes them ahead, a few at a time, off the dispatch path. A namespace
//! taken is replaced once nothing has been taken for [`QUIET`] (or at once when fewer than
//! half are left): made right away, it competed for the CPU with the set-up of the attempt
//! that took one (0.45–0.6 ms of its dispatch on two cores).
//!
//! Used again: a namespace no task has touched is what the sandbox would have made itself
//! (only `lo`, down). Without `CAP_NET_ADMIN` a task cannot add a link, address, route, rule
//! or filter to its namespace, its /proc/sys is read-only (sysctls), and `lo` stays down with
//! `network = none` (with `proxy` the sandbox brings it up, so those are never lent back).
//! What it can change is its sockets and the namespace's statistics counters (a datagram
//! with no route counts in `Ip: OutNoRoutes`: a number the task may choose, which a later
//! task could read). So a namespace is lent ([`Pool::lend`]) until the worker says the
//! attempt is over ([`Pool::over`]: it has reaped the attempt's outer helper). The outer
//! helper exits with 0 only once it has reaped the sandbox's init, whose end first killed
//! and reaped every process of the sandbox's pid namespace — the attempt's every process,
//! whatever it did (new user, network or pid namespaces of its own, cgroups of its own). A
//! helper that was killed (a timeout, a cancel, the OOM killer) may have left them running a
//! moment longer: its namespace is let go. So is one whose word never comes (a full socket,
//! an attempt that failed or was dropped before its end), once its helper's pid is lent
//! another or past [`LENT_MAX`] loans. One whose helper exited with 0 is ready again
//! if its /proc/net files show nothing of the attempt's left ([`look`], [`left`]): `lo` down,
//! the statistics counters (snmp, snmp6, netstat) as they were when it was made, no socket in
//! use, none in `TIME_WAIT`, no fragments queued, no IPv6 flow label lingering. Otherwise it
//! is let go and the kernel tears it down as before. What carries over is the namespace's
//! identity (the inode of /proc/self/ns/net, the netns cookie): a task can tell it joined
//! one an earlier attempt had. A task that passes an open /proc/net file to a process
//! outside its sandbox (over a UNIX socket file of the host's it can reach) lets that
//! process watch the socket tables of later attempts in the same namespace; a fresh
//! namespace per attempt would not.
//!
//! Lives in the spawner (the outer helper inherits its descriptors at the fork) and only where
//! the worker runs as root: inside the user namespace an unprivileged sandbox makes, a
//! namespace made outside it could not be joined. Nothing here logs (see the `spawner`
//! module); a failure stops the pool, and sandboxes make their own as before.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sched::CloneFlags;

use super::child;

/// Namespaces kept ready.
const READY: usize = 4;

/// Most namespaces ready at once: those that come back are kept up to this many.
const READY_MAX: usize = 2 * READY;

/// Most namespaces lent at once; past it the oldest is let go (its attempts run long).
const LENT_MAX: usize = 64;

/// A namespace lent this recently counts as coming back (its attempt may be a short one):
/// the maker makes fewer meanwhile. Lent longer, its attempt runs long and it does not count.
const COMING_BACK: Duration = Duration::from_millis(50);

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
    ready: Vec<Taken>,
    /// Loans and the worker's word on attempts since the maker last looked, in the order
    /// they came (the maker keeps the loans from then on).
    events: Vec<Event>,
    /// How many are lent and not yet back or let go (tests).
    out: usize,
    /// When a namespace was last taken.
    taken: Option<Instant>,
    /// How many came back idle and were made ready again (tests).
    reused: u64,
    closed: bool,
    /// Why the pool stopped, for the worker's log.
    broken: Option<String>,
}

/// A namespace for an attempt to join, and its statistics counters as they were when it was
/// made: they must not have moved for it to come back (see the module docs).
#[derive(Debug)]
pub(super) struct Taken {
    pub(super) ns: OwnedFd,
    counters: Option<u64>,
}

/// What the spawner tells the maker.
#[derive(Debug)]
enum Event {
    Lend(Lent),
    /// The attempt whose outer helper had this pid is over; whether the helper exited with
    /// 0 (see [`Pool::over`]).
    Over(i32, bool),
}

/// A namespace an attempt joined, the pid of the attempt's outer helper, and when it was
/// lent.
#[derive(Debug)]
struct Lent {
    taken: Taken,
    holder: i32,
    since: Instant,
}

impl Pool {
    /// Starts the thread that keeps [`READY`] namespaces ready.
    pub(super) fn new() -> Pool {
        let shared = Arc::new(Shared::default());
        let theirs = shared.clone();
        let thread = std::thread::Builder::new()
            .name("drover-netns".into())
            .stack_size(128 * 1024)
            .spawn(move || maker(&theirs))
            .map_err(|e| {
                let mut state = lock(&shared);
                state.broken = Some(format!("cannot start its thread: {e}"));
                state.closed = true;
            })
            .ok();
        Pool { shared, thread }
    }

    /// A ready namespace, if there is one; the thread makes another.
    pub(super) fn take(&self) -> Option<Taken> {
        let taken = {
            let mut state = lock(&self.shared);
            state.taken = Some(Instant::now());
            state.ready.pop()
        };
        self.shared.wake.notify_one();
        taken
    }

    /// Lends `taken`, joined by the attempt whose outer helper is `pid` (or that failed
    /// before it could), until the worker says that attempt is over ([`Pool::over`]).
    pub(super) fn lend(&self, taken: Taken, pid: i32) {
        {
            let mut state = lock(&self.shared);
            if state.closed {
                return;
            }
            state.events.push(Event::Lend(Lent {
                taken,
                holder: pid,
                since: Instant::now(),
            }));
            state.out += 1;
        }
        self.shared.wake.notify_one();
    }

    /// The attempt whose outer helper was `pid` is over and that process reaped; it exited
    /// with 0 (`by_itself`), or not (killed). Its namespace, if it was lent one, is ready
    /// again when it exited with 0 and the attempt left nothing in the namespace; otherwise
    /// it is let go (see the module docs).
    pub(super) fn over(&self, pid: i32, by_itself: bool) {
        {
            let mut state = lock(&self.shared);
            if state.closed {
                return;
            }
            state.events.push(Event::Over(pid, by_itself));
        }
        self.shared.wake.notify_one();
    }

    /// How many namespaces are ready and lent now, and how many came back idle and were
    /// made ready again so far.
    pub(super) fn counts(&self) -> (usize, usize, u64) {
        let state = lock(&self.shared);
        (state.ready.len(), state.out, state.reused)
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
    if let Err(why) = keep(shared) {
        let mut state = lock(shared);
        state.broken = Some(why);
        // Nothing takes or lends from now on: sandboxes make their own.
        state.closed = true;
        state.ready.clear();
        state.events.clear();
        state.out = 0;
    }
}

/// The maker's loop; returns when the pool closes, or why it cannot go on.
fn keep(shared: &Shared) -> Result<(), String> {
    let home = std::fs::File::open("/proc/thread-self/ns/net")
        .map(OwnedFd::from)
        .map_err(|e| format!("cannot open this thread's namespace: {e}"))?;
    // The key the counters are hashed with, this process's own.
    let key = std::hash::RandomState::new();
    // Namespaces lent, oldest first: this thread's alone, looked at without the lock.
    let mut lent: Vec<Lent> = Vec::new();
    loop {
        let events = {
            let mut state = lock(shared);
            if state.closed {
                return Ok(());
            }
            std::mem::take(&mut state.events)
        };
        // Those whose attempts are over: ready again if their outer helpers exited with 0
        // (after their inits were reaped, and with them every process of the attempt) and
        // nothing is left in them; otherwise let go.
        for taken in settle(&mut lent, events) {
            let back = look(taken.ns.as_fd(), home.as_fd(), &key)?
                .is_some_and(|now| left(&now, taken.counters).is_none());
            let mut state = lock(shared);
            if back && state.ready.len() < READY_MAX {
                state.ready.push(taken);
                state.reused += 1;
            }
        }
        let now = Instant::now();
        let coming = lent
            .iter()
            .filter(|l| now.duration_since(l.since) < COMING_BACK)
            .count();
        // When the next of those stops counting.
        let ages = lent
            .iter()
            .filter_map(|l| COMING_BACK.checked_sub(now.duration_since(l.since)))
            .filter(|d| !d.is_zero())
            .min();
        let mut state = lock(shared);
        if state.closed {
            return Ok(());
        }
        if !state.events.is_empty() {
            // Word or loans came meanwhile: settled first.
            continue;
        }
        // Counted once the namespaces that came back are ready again (or let go).
        state.out = lent.len();
        match next(state.ready.len(), coming, state.taken.map(|t| t.elapsed())) {
            // Asleep under the lock it decided with: a take or word that comes meanwhile
            // wakes it.
            Next::Wait(left) => match ages.into_iter().chain(left).min() {
                None => drop(shared.wake.wait(state)),
                Some(left) => drop(shared.wake.wait_timeout(state, left)),
            },
            Next::Make => {
                drop(state);
                let ns = child::make_netns(home.as_fd())
                    .map_err(|errno| format!("cannot make one: {errno}"))?;
                // Unreadable, it is used once, never again.
                let counters = look(ns.as_fd(), home.as_fd(), &key)?.map(|look| look.counters);
                lock(shared).ready.push(Taken { ns, counters });
            }
        }
    }
}

/// Applies `events` to `lent`, in order, and returns the namespaces that may come back:
/// those whose outer helpers exited with 0. Those of killed helpers, and the oldest
/// beyond [`LENT_MAX`], are let go. A loan to a pid already lent lets the older loan go: that
/// pid was reaped and used again, and the word on its attempt was lost (a full socket, an
/// attempt that failed or was dropped before its end). The worker sends its word right
/// after the reap, before anything else can run on that task (`Attempt::tell_over`), so it
/// comes before the pid's next loan unless the kernel's pid counter wrapped round in
/// between. Word of a pid not lent (an attempt that got no namespace from the pool) is
/// ignored.
fn settle(lent: &mut Vec<Lent>, events: Vec<Event>) -> Vec<Taken> {
    let mut back = Vec::new();
    for event in events {
        match event {
            Event::Lend(loan) => {
                lent.retain(|l| l.holder != loan.holder);
                lent.push(loan);
            }
            Event::Over(pid, by_itself) => {
                if let Some(i) = lent.iter().position(|l| l.holder == pid) {
                    let done = lent.remove(i);
                    if by_itself {
                        back.push(done.taken);
                    }
                }
            }
        }
    }
    while lent.len() > LENT_MAX {
        lent.remove(0);
    }
    back
}

/// What a namespace's /proc/net files say (see [`look`]), reduced to what [`left`] weighs.
#[derive(Debug)]
struct Look {
    /// Whether `fib_trie` (IPv4 routes) or `if_inet6` (IPv6 addresses) list any: none while
    /// `lo` is down.
    routed: bool,
    /// Whether `sockstat` and `sockstat6` count nothing left (see [`sockstat_idle`]).
    sockets_idle: bool,
    /// Lines of `ip6_flowlabel`: a header, then the flow labels that linger.
    label_lines: usize,
    /// `snmp`, `snmp6` and `netstat`, the statistics counters, hashed with the maker's key.
    counters: u64,
}

/// Namespace `ns`'s /proc/net files, read by this thread, which joins it for the reading and
/// is back in `home` afterwards; the counters hashed with `key`. `None` when it cannot be
/// joined or read; an error only when the thread could not go back (it must not make or read
/// namespaces from there).
fn look(
    ns: BorrowedFd<'_>,
    home: BorrowedFd<'_>,
    key: &std::hash::RandomState,
) -> Result<Option<Look>, String> {
    if nix::sched::setns(ns, CloneFlags::CLONE_NEWNET).is_err() {
        return Ok(None);
    }
    let read = read_files(key);
    nix::sched::setns(home, CloneFlags::CLONE_NEWNET)
        .map_err(|e| format!("cannot go back to its own namespace: {e}"))?;
    Ok(read.ok())
}

/// [`look`]'s reading, in this thread's namespace. Through buffers on its stack, not the
/// heap (a check reads eight files, some of 3-4 KiB): every page the spawner writes after one
/// of its forks faults once, and with a child still sharing it is copied, with a TLB
/// shootdown to the other CPUs.
fn read_files(key: &std::hash::RandomState) -> std::io::Result<Look> {
    use std::hash::{BuildHasher, Hasher};
    const NET: &str = "/proc/thread-self/net/";
    let mut chunk = [0u8; 4096];
    let mut routed = false;
    for name in ["fib_trie", "if_inet6"] {
        each_chunk(NET, name, name == "if_inet6", &mut chunk, |c| {
            routed |= c.iter().any(|b| !b.is_ascii_whitespace());
        })?;
    }
    let mut v4 = [0u8; 1024];
    let mut v6 = [0u8; 1024];
    let sockets_idle = sockstat_idle(
        whole(NET, "sockstat", false, &mut v4)?,
        whole(NET, "sockstat6", true, &mut v6)?,
    );
    let mut label_lines = 0;
    each_chunk(NET, "ip6_flowlabel", true, &mut chunk, |c| {
        label_lines += c.iter().filter(|&&b| b == b'\n').count();
    })?;
    let mut counters = key.build_hasher();
    for (name, optional) in [("snmp", false), ("snmp6", true), ("netstat", false)] {
        each_chunk(NET, name, optional, &mut chunk, |c| counters.write(c))?;
        counters.write_u8(0xff);
    }
    Ok(Look {
        routed,
        sockets_idle,
        label_lines,
        counters: counters.finish(),
    })
}

/// Reads `dir``name` through `buf`, each chunk into `f`. Missing, it is empty when
/// `optional` (IPv6 off: nothing of it can be left behind either).
fn each_chunk(
    dir: &str,
    name: &str,
    optional: bool,
    buf: &mut [u8],
    mut f: impl FnMut(&[u8]),
) -> std::io::Result<()> {
    use std::io::Read;
    // Joined on the stack: std opens paths this short without allocating.
    let mut path = [0u8; 64];
    let len = dir.len() + name.len();
    if len > path.len() {
        return Err(std::io::Error::other("a /proc/net path too long"));
    }
    path[..dir.len()].copy_from_slice(dir.as_bytes());
    path[dir.len()..len].copy_from_slice(name.as_bytes());
    let path = std::str::from_utf8(&path[..len]).map_err(std::io::Error::other)?;
    let mut file = match std::fs::File::open(path) {
        Err(e) if optional && e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        other => other?,
    };
    loop {
        match file.read(buf)? {
            0 => return Ok(()),
            n => f(&buf[..n]),
        }
    }
}

/// `dir``name` whole, in `buf`, as text; an error when it does not fit.
fn whole<'a>(dir: &str, name: &str, optional: bool, buf: &'a mut [u8]) -> std::io::Result<&'a str> {
    let mut len = 0;
    let mut chunk = [0u8; 256];
    let mut fits = true;
    each_chunk(dir, name, optional, &mut chunk, |c| {
        match buf.get_mut(len..len + c.len()) {
            Some(to) => {
                to.copy_from_slice(c);
                len += c.len();
            }
            None => fits = false,
        }
    })?;
    if !fits {
        return Err(std::io::Error::other(
            "a /proc/net file larger than expected",
        ));
    }
    std::str::from_utf8(&buf[..len]).map_err(std::io::Error::other)
}

/// What a namespace made with statistics counters `counters` (hashed as [`Look::counters`];
/// `None` when they could not be read) holds of the attempts that used it, as `now` shows
/// it: `None` when nothing (see the module docs).
fn left(now: &Look, counters: Option<u64>) -> Option<&'static str> {
    // `lo` up: its addresses are routed (a task cannot add routes or addresses itself).
    if now.routed {
        return Some("its loopback is up");
    }
    if Some(now.counters) != counters {
        return Some("its counters moved");
    }
    if !now.sockets_idle {
        return Some("sockets are left");
    }
    if now.label_lines > 1 {
        return Some("IPv6 flow labels linger");
    }
    None
}

/// Whether a namespace's `sockstat` and `sockstat6` count nothing left: no socket in use (of
/// any family: the count is the namespace's), none in `TIME_WAIT`, no IPv4 or IPv6 fragments
/// queued. A count missing or unreadable is not nothing; `sockstat6` may be empty (no IPv6).
fn sockstat_idle(sockstat: &str, sockstat6: &str) -> bool {
    let count = |text: &str, line: &str, key: &str| -> Option<u64> {
        let rest = text.lines().find_map(|l| l.strip_prefix(line))?;
        let mut words = rest.split_whitespace();
        while let Some(word) = words.next() {
            if word == key {
                return words.next()?.parse().ok();
            }
        }
        None
    };
    count(sockstat, "sockets:", "used") == Some(0)
        && count(sockstat, "TCP:", "tw") == Some(0)
        && count(sockstat, "FRAG:", "inuse") == Some(0)
        && (sockstat6.is_empty() || count(sockstat6, "FRAG6:", "inuse") == Some(0))
}

/// What the maker does next.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    /// Make a namespace now.
    Make,
    /// Wait to be woken, or at most this long.
    Wait(Option<Duration>),
}

/// With `ready` namespaces ready and `lent` lent (which may come back), the last taken
/// `since_take` ago.
fn next(ready: usize, lent: usize, since_take: Option<Duration>) -> Next {
    if ready >= READY || (ready >= READY / 2 && ready + lent >= READY) {
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
        assert_eq!(next(READY, 0, None), Next::Wait(None), "full");
        assert_eq!(next(READY, 0, Some(ms(0))), Next::Wait(None), "full");
        assert_eq!(next(0, 0, None), Next::Make, "empty at start");
        assert_eq!(next(READY - 1, 0, None), Next::Make, "never taken");
        assert_eq!(
            next(READY - 1, 0, Some(ms(1))),
            Next::Wait(Some(QUIET - ms(1))),
            "just taken: wait out the attempt's set-up"
        );
        assert_eq!(next(READY - 1, 0, Some(QUIET)), Next::Make, "quiet since");
        assert_eq!(next(READY / 2 - 1, 0, Some(ms(0))), Next::Make, "few left");
    }

    #[test]
    fn namespaces_just_lent_count_as_coming_back_unless_few_are_ready() {
        let ms = Duration::from_millis;
        assert_eq!(next(READY - 1, 1, Some(QUIET)), Next::Wait(None));
        assert_eq!(next(READY / 2, READY, None), Next::Wait(None));
        // Lent ones may not come back (a socket left, a counter moved): few ready, make one.
        assert_eq!(next(READY / 2 - 1, READY, Some(ms(0))), Next::Make);
        assert_eq!(next(0, LENT_MAX, None), Next::Make);
    }

    const FRESH: &str = "sockets: used 0\nTCP: inuse 0 orphan 0 tw 0 alloc 1 mem 0\n\
        UDP: inuse 0 mem 0\nUDPLITE: inuse 0\nRAW: inuse 0\nFRAG: inuse 0 memory 0\n";
    const FRESH6: &str = "TCP6: inuse 0\nUDP6: inuse 0\nUDPLITE6: inuse 0\nRAW6: inuse 0\n\
        FRAG6: inuse 0 memory 0\n";

    #[test]
    fn sockstat_counts_what_an_attempt_leaves() {
        assert!(sockstat_idle(FRESH, FRESH6));
        assert!(sockstat_idle(FRESH, ""), "no IPv6");
        // `alloc`, `orphan` and `mem` are the host's, not the namespace's: they do not count.
        let host_wide = FRESH.replace("orphan 0 tw 0 alloc 1 mem 0", "orphan 3 tw 0 alloc 9 mem 4");
        assert!(sockstat_idle(&host_wide, FRESH6));
        let v4 = |from: &str, to: &str| (FRESH.replace(from, to), FRESH6.to_owned());
        let v6 = |from: &str, to: &str| (FRESH.to_owned(), FRESH6.replace(from, to));
        for (left, (v4, v6)) in [
            ("a socket", v4("used 0", "used 1")),
            ("a TIME_WAIT", v4("tw 0", "tw 2")),
            ("a fragment", v4("FRAG: inuse 0", "FRAG: inuse 1")),
            ("an IPv6 fragment", v6("FRAG6: inuse 0", "FRAG6: inuse 1")),
            ("nothing readable", (String::new(), FRESH6.to_owned())),
            ("no socket count", v4("sockets: used 0\n", "")),
            ("a count that is not one", v4("tw 0", "tw x")),
        ] {
            assert!(!sockstat_idle(&v4, &v6), "{left}");
        }
    }

    #[test]
    fn files_are_read_whole_through_small_buffers_or_refused() {
        let mut chunk = [0u8; 7];
        let mut text = Vec::new();
        each_chunk("/proc/self/", "status", false, &mut chunk, |c| {
            text.extend_from_slice(c)
        })
        .unwrap();
        assert!(
            text.starts_with(b"Name:") && text.len() > 7,
            "in chunks of 7"
        );
        let mut buf = [0u8; 4096];
        let whole_text = whole("/proc/self/", "status", false, &mut buf).unwrap();
        assert!(whole_text.starts_with("Name:") && whole_text.ends_with('\n'));
        assert!(
            whole("/proc/self/", "status", false, &mut [0u8; 16]).is_err(),
            "too large"
        );
        let mut called = false;
        each_chunk("/proc/self/", "no-such-file", true, &mut chunk, |_| {
            called = true
        })
        .unwrap();
        assert!(!called, "an optional file missing is empty");
        assert!(each_chunk("/proc/self/", "no-such-file", false, &mut chunk, |_| ()).is_err());
    }

    /// Runs `f` on a thread of its own in namespace `ns`.
    fn in_ns<T: Send + 'static>(ns: &OwnedFd, f: impl FnOnce() -> T + Send + 'static) -> T {
        let theirs = ns.try_clone().expect("dup");
        std::thread::spawn(move || {
            nix::sched::setns(theirs, CloneFlags::CLONE_NEWNET).expect("join it");
            f()
        })
        .join()
        .expect("the thread")
    }

    /// The check on a real namespace (root): nothing left when made; a socket open in it, a
    /// counter a task moved, or its loopback brought up keeps it from coming back; the thread
    /// that looks is back home each time.
    #[test]
    fn what_an_attempt_leaves_keeps_a_namespace_from_coming_back() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("*** SKIPPED: needs root (network namespaces) ***");
            return;
        }
        let home_fd = OwnedFd::from(std::fs::File::open("/proc/thread-self/ns/net").unwrap());
        let home = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
        let ns = child::make_netns(home_fd.as_fd()).expect("make a namespace");
        let key = std::hash::RandomState::new();
        let now = || {
            let now = look(ns.as_fd(), home_fd.as_fd(), &key)
                .expect("back home")
                .expect("its files read");
            assert_eq!(
                std::fs::read_link("/proc/thread-self/ns/net").unwrap(),
                home
            );
            now
        };
        let made = Some(now().counters);
        assert_eq!(left(&now(), made), None, "a fresh namespace");

        let socket = in_ns(&ns, || {
            std::net::UdpSocket::bind("0.0.0.0:0").expect("a socket")
        });
        assert_eq!(left(&now(), made), Some("sockets are left"));
        drop(socket);
        // A UDP socket's count drops at its close; bounded all the same.
        let deadline = Instant::now() + Duration::from_secs(5);
        while left(&now(), made).is_some() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(left(&now(), made), None, "the socket closed");

        // A datagram with no route: refused, and counted (Ip: OutNoRoutes).
        let sent = in_ns(&ns, || {
            let socket = std::net::UdpSocket::bind("0.0.0.0:0").expect("a socket");
            socket.send_to(b"x", "10.1.2.3:9")
        });
        assert!(
            sent.is_err(),
            "no route in a namespace whose lo is down: {sent:?}"
        );
        assert_eq!(left(&now(), made), Some("its counters moved"));

        match in_ns(&ns, || {
            std::process::Command::new("ip")
                .args(["link", "set", "lo", "up"])
                .status()
        }) {
            Ok(status) => {
                assert!(status.success(), "ip link set lo up: {status}");
                assert_eq!(left(&now(), made), Some("its loopback is up"));
            }
            Err(e) => eprintln!("*** SKIPPED the loopback part: cannot run ip: {e} ***"),
        }
    }

    fn lent(pid: i32) -> Lent {
        let null = OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
        Lent {
            taken: Taken {
                ns: null,
                counters: None,
            },
            holder: pid,
            since: Instant::now(),
        }
    }

    fn holders(lent: &[Lent]) -> Vec<i32> {
        lent.iter().map(|l| l.holder).collect()
    }

    #[test]
    fn only_namespaces_of_helpers_that_exited_by_themselves_come_back() {
        let mut out = Vec::new();
        let loans = (1..=4).map(|pid| Event::Lend(lent(pid))).collect();
        assert!(settle(&mut out, loans).is_empty());
        // 2 exited by itself, 3 was killed, 9 was never lent one.
        let over = vec![
            Event::Over(2, true),
            Event::Over(3, false),
            Event::Over(9, true),
        ];
        assert_eq!(settle(&mut out, over).len(), 1, "only 2's");
        assert_eq!(
            holders(&out),
            [1, 4],
            "3's is let go, 1's and 4's stay lent"
        );
        assert!(settle(&mut out, Vec::new()).is_empty());
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn word_on_one_attempt_never_settles_another_loan_to_the_same_pid() {
        let mut out = Vec::new();
        // 5's word was lost; 5 was reaped and is now a later attempt's helper.
        assert!(settle(&mut out, vec![Event::Lend(lent(5)), Event::Lend(lent(5))]).is_empty());
        assert_eq!(out.len(), 1, "the stale loan is let go");
        // Word that came before the pid's next loan settles the earlier one only.
        let events = vec![Event::Over(5, true), Event::Lend(lent(5))];
        assert_eq!(settle(&mut out, events).len(), 1);
        assert_eq!(holders(&out), [5], "the new loan stays lent");
    }

    #[test]
    fn the_oldest_loans_go_past_the_bound() {
        let mut out = Vec::new();
        let loans = (0..LENT_MAX as i32 + 3)
            .map(|pid| Event::Lend(lent(pid)))
            .collect();
        assert!(settle(&mut out, loans).is_empty());
        assert_eq!(out.len(), LENT_MAX);
        assert_eq!(out[0].holder, 3, "the three oldest let go");
    }
}
