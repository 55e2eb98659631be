//! The spawner: a small process, forked from the worker when its sandbox is built, that forks
//! every attempt's first process for it (the task itself with `isolation = process`, the
//! sandbox's outer helper otherwise), or hands the attempt's plan to a standby helper that a
//! warm cgroup holds, started ahead (see the `standby` module).
//!
//! Why: a fork write-protects every page of the process that forks, and each page that process
//! writes afterwards faults once to be copied or taken back, with a TLB shootdown to every CPU
//! that runs one of its threads. Forking the busy worker cost a third of this 2-core machine's
//! CPU at a few hundred attempts a second (perf: `do_wp_page`, `flush_tlb_mm_range`, the
//! copied page tables torn down again at exec). The spawner touches little and does nothing
//! else, so its forks are small and nothing waits on their faults. A second benefit: the
//! sandbox's helpers, and its init that lives as long as the task, are copies of the
//! spawner's memory, not of the worker's (its keys, the values of the secrets it holds).
//!
//! Its children are the worker's: it forks with `CLONE_PARENT`, so the worker reaps them
//! ([`super::process::Process`]). It owns the warm cgroups ([`super::warm`]: the thread that
//! forks an attempt must be inside the attempt's cgroup, so it is a spawner thread) and creates
//! the cold ones, so it reports which cgroup each attempt got.
//!
//! Protocol, over a `SOCK_SEQPACKET` pair, one message each way per request, one request at a
//! time (the worker holds [`Spawner`]'s lock across the round trip):
//! - worker → spawner: a [`Request`] (postcard) with, for `Spawn`, the attempt's descriptors
//!   (SCM_RIGHTS) in [`FdSet`] order; a request too large for one message travels in a memfd
//!   passed last, the message then saying only that;
//! - spawner → worker: a [`Reply`] for `Spawn` and `Status`; `Refill` has none (the worker
//!   sends it from synchronous code and never waits for it). Replies carry the pids of
//!   standby helpers let go, which are the worker's children, for it to reap;
//! - spawner → standby helper, over the helper's own pair: one message, the plan (postcard)
//!   with the attempt's descriptors in [`FdSet`] order and then the ones the spawner adds
//!   ([`adopt`]).
//!
//! The spawner exits when the worker's end closes, removing its ready warm cgroups first; a
//! spawner that died is started again at the next spawn. It never logs (a lock that another
//! worker thread held at the fork would stay held in the copy): its warnings travel in its
//! replies and the worker logs them.

use std::ffi::CString;
use std::io::{self, Read, Seek, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;

use nix::libc;
use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};
use serde::{Deserialize, Serialize};
use tokio::io::Interest;

use super::cgroup::{CgroupLimits, Hierarchy};
use super::child::{self, ChildPlan, PidsOnceAlone};
use super::error::CgroupError;
use super::{netns, standby, warm};

/// The smallest pids limit an attempt is vforked under (process isolation). Its limit is
/// written before the fork, while the spawner thread that forks still counts in the cgroup, and
/// that thread goes a moment after the exec: for those microseconds the task may have one
/// process fewer than its limit, never more. Below this, the exact (slower) way: a fork, and
/// the process sets the limit itself once the thread has left (`child::PidsOnceAlone`).
const VFORK_MIN_PIDS: u32 = 16;

/// The smallest memory limit an attempt gets a warm cgroup for: one with a standby helper
/// in it is charged for the helper's memory (0.5 MiB measured) before the limit is written.
const WARM_MIN_MEMORY: u64 = 8 * 1024 * 1024;

/// Largest request sent inline; a larger one (a huge argv or environment) goes in a memfd.
const INLINE_MAX: usize = 48 * 1024;
/// Room for one reply, inline request or plan handed to a standby helper.
pub(super) const MESSAGE_MAX: usize = INLINE_MAX + 1024;
/// Most descriptors one message carries: a spawn's [`FdSet`] and its memfd, or a plan handed
/// to a standby helper with its network namespace.
const MAX_FDS: usize = 10;
/// The spawner's end of its socket, moved here clear of stdio.
const SPAWNER_SOCKET_FD: RawFd = 3;

/// What the worker asks of the spawner.
#[derive(Debug, Serialize, Deserialize)]
pub(super) enum Request {
    /// Fork an attempt's first process in a cgroup of its own.
    Spawn(Box<SpawnRequest>),
    /// An attempt's cgroup is gone, or handed back for reuse (`recycled`, its name: reset by
    /// the worker, see `v1::Group::reset_for_reuse`): top the warm cgroups up, with that one
    /// first. No reply.
    Refill { recycled: Option<String> },
    /// The sandboxed attempt whose first process was `pid` is over, and that process has
    /// been reaped; `by_itself`: it exited with 0, not killed (see the `netns` module). No
    /// reply.
    Over { pid: i32, by_itself: bool },
    /// How many warm cgroups are ready (tests).
    Status,
    /// The real request is in the memfd that comes with this message.
    InMemfd,
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct SpawnRequest {
    /// The cgroup's name if a new one is made (a warm one has its own).
    pub(super) name: String,
    pub(super) memory_bytes: Option<u64>,
    pub(super) pids: Option<u32>,
    pub(super) plan: ChildPlan,
}

/// The descriptors of a `Spawn`, in the order they travel.
#[derive(Debug)]
pub(super) struct FdSet {
    pub(super) stdio: [RawFd; 3],
    pub(super) setup: RawFd,
    pub(super) events: RawFd,
    pub(super) status: Option<RawFd>,
    pub(super) proxy: Option<RawFd>,
    pub(super) confirm: Option<RawFd>,
}

impl FdSet {
    pub(super) fn list(&self) -> Vec<RawFd> {
        let mut fds = self.stdio.to_vec();
        fds.extend([self.setup, self.events]);
        fds.extend(self.status);
        fds.extend(self.proxy);
        fds.extend(self.confirm);
        fds
    }
}

/// The spawner's answer.
#[derive(Debug, Serialize, Deserialize)]
pub(super) enum Reply {
    Spawned {
        pid: i32,
        /// The attempt's cgroup, by name (see `Hierarchy::existing`).
        cgroup: String,
        warm: bool,
        notes: Vec<String>,
        /// Standby helpers let go (see the `standby` module): the worker's children, gone
        /// or going, for it to reap.
        reap: Vec<i32>,
    },
    Failed {
        failure: Failure,
        notes: Vec<String>,
        reap: Vec<i32>,
    },
    Status {
        ready: usize,
        /// Network namespaces ready and lent to attempts now, and how many came back and
        /// were made ready again so far (see the `netns` module).
        netns: (usize, usize, u64),
        notes: Vec<String>,
        reap: Vec<i32>,
    },
}

/// Why the spawner could not start an attempt; nothing of it is left behind.
#[derive(Debug, Serialize, Deserialize)]
pub(super) enum Failure {
    Cgroup {
        action: String,
        path: PathBuf,
        errno: Option<i32>,
        message: String,
    },
    Fork {
        errno: i32,
    },
    /// A request the spawner could not read (a bug: worker and spawner are one binary).
    Request(String),
}

impl Failure {
    fn cgroup(e: CgroupError) -> Failure {
        Failure::Cgroup {
            action: e.action.into_owned(),
            path: e.path,
            errno: e.source.raw_os_error(),
            message: e.source.to_string(),
        }
    }
}

impl From<Failure> for super::SpawnError {
    fn from(f: Failure) -> Self {
        match f {
            Failure::Cgroup {
                action,
                path,
                errno,
                message,
            } => super::SpawnError::Cgroup(CgroupError {
                action: action.into(),
                path,
                source: match errno {
                    Some(e) => io::Error::from_raw_os_error(e),
                    None => io::Error::other(message),
                },
            }),
            Failure::Fork { errno } => super::SpawnError::Fork(io::Error::from_raw_os_error(errno)),
            Failure::Request(why) => {
                super::SpawnError::Fork(io::Error::other(format!("the spawner refused: {why}")))
            }
        }
    }
}

/// What a spawner keeps ready.
#[derive(Debug, Clone, Copy)]
pub(super) struct Options {
    /// Warm cgroups (v1 hosts only; see the `warm` module).
    pub(super) warm: bool,
    /// Network namespaces made ahead (see the `netns` module): only where the sandbox makes no
    /// user namespace of its own.
    pub(super) netns: bool,
}

/// The worker's handle on its spawner; see the module docs.
#[derive(Debug)]
pub(super) struct Spawner {
    hierarchy: Hierarchy,
    options: Options,
    running: tokio::sync::Mutex<Option<Running>>,
    /// The running spawner's socket, for `Refill` from synchronous code. Shared, not a bare
    /// number: a number read here could meanwhile be closed and reused for another file.
    refill_sock: std::sync::Mutex<Option<Arc<OwnedFd>>>,
}

#[derive(Debug)]
struct Running {
    sock: Arc<OwnedFd>,
    pid: nix::unistd::Pid,
}

impl Spawner {
    /// Starts a spawner with `hierarchy` and what `options` ask for.
    pub(super) fn start(hierarchy: Hierarchy, options: Options) -> io::Result<Spawner> {
        let running = fork_spawner(&hierarchy, options)?;
        let refill_sock = std::sync::Mutex::new(Some(running.sock.clone()));
        Ok(Spawner {
            hierarchy,
            options,
            running: tokio::sync::Mutex::new(Some(running)),
            refill_sock,
        })
    }

    /// The running spawner's pid, if one runs.
    #[cfg(test)]
    pub(super) async fn pid(&self) -> Option<nix::unistd::Pid> {
        self.running.lock().await.as_ref().map(|r| r.pid)
    }

    fn set_refill(&self, sock: Option<Arc<OwnedFd>>) {
        *self.refill_sock.lock().unwrap_or_else(|e| e.into_inner()) = sock;
    }

    /// Sends `request` (`Spawn` with `fds`, or `Status`) and waits for the reply. A spawner
    /// found dead before it took the request is started again once. Once the request is
    /// sent it is never sent again (the spawner may have forked the attempt before it died),
    /// and a call that ends without its reply — an error, or the caller gone — retires the
    /// spawner, so that no later call reads that reply as its own.
    pub(super) async fn call(&self, request: &Request, fds: &[RawFd]) -> io::Result<Reply> {
        let mut running = self.running.lock().await;
        for round in 0..2 {
            if running.is_none() {
                let fresh = fork_spawner(&self.hierarchy, self.options)?;
                self.set_refill(Some(fresh.sock.clone()));
                *running = Some(fresh);
            }
            let Some(sock) = running.as_ref().map(|r| r.sock.clone()) else {
                continue;
            };
            let mut pending = Retire {
                spawner: self,
                running: &mut running,
                sock: Some(sock),
                armed: true,
            };
            let sock = pending.sock.as_deref().expect("just set");
            match round_trip(sock, request, fds).await {
                Ok(reply) => {
                    pending.armed = false;
                    return Ok(reply);
                }
                Err(RoundTrip::NotSent(e)) if round == 0 && is_gone(&e) => {
                    tracing::warn!(error = %e, "the spawner is gone; starting a new one");
                }
                Err(RoundTrip::NotSent(e)) => {
                    // Nothing reached it (a message is sent whole or not at all): it stays.
                    pending.armed = false;
                    return Err(e);
                }
                Err(RoundTrip::NoReply(e)) => {
                    tracing::warn!(error = %e, "the spawner took a request and gave no answer; starting a new one for the next");
                    return Err(e);
                }
            }
        }
        Err(io::Error::other("the spawner could not be started"))
    }

    /// Asks for the warm cgroups to be topped up; never waits (a full socket drops it: the
    /// next one asks again).
    pub(super) fn refill(&self) {
        self.send_refill(None);
    }

    /// Hands the emptied, reset cgroup `name` to the warm pool, which re-enters it instead of
    /// making a new one. Never waits; false if it did not go (no warm pool, no spawner, a full
    /// socket): the caller then removes the cgroup itself. One that went and that the spawner
    /// could not use, it removes. (A spawner that dies with one in its socket leaves it until
    /// the worker's next start removes it with the rest of a dead worker's cgroups.)
    pub(super) fn recycle(&self, name: String) -> bool {
        self.send_refill(Some(name))
    }

    /// Tells the spawner that the sandboxed attempt whose first process was `pid` (now
    /// reaped) is over, `by_itself` (it exited with 0, after reaping its init): a network
    /// namespace it lent the attempt may go back to its pool. Never waits. Word that does not
    /// go (a full socket), like that of an attempt that failed or was dropped before its end,
    /// leaves the namespace lent until `pid` is lent another or the pool's bound lets it go.
    pub(super) fn attempt_over(&self, pid: i32, by_itself: bool) {
        if self.options.netns {
            self.send_quietly(&Request::Over { pid, by_itself });
        }
    }

    fn send_refill(&self, recycled: Option<String>) -> bool {
        if !self.options.warm {
            return false;
        }
        self.send_quietly(&Request::Refill { recycled })
    }

    /// Sends a request that has no reply, without waiting: false if it did not go.
    fn send_quietly(&self, request: &Request) -> bool {
        let sock = self
            .refill_sock
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let Some(sock) = sock else {
            return false;
        };
        let Ok(bytes) = postcard::to_allocvec(request) else {
            return false;
        };
        let iov = [io::IoSlice::new(&bytes)];
        sendmsg::<()>(sock.as_raw_fd(), &iov, &[], MsgFlags::MSG_DONTWAIT, None).is_ok()
    }
}

/// Retires the spawner of a call that ended without its reply (see [`Spawner::call`]).
struct Retire<'a, 'b> {
    spawner: &'a Spawner,
    running: &'b mut Option<Running>,
    /// The call's own handle on the socket, let go before the spawner is reaped: the spawner
    /// exits once every handle is closed.
    sock: Option<Arc<OwnedFd>>,
    armed: bool,
}

impl Drop for Retire<'_, '_> {
    fn drop(&mut self) {
        self.sock = None;
        if self.armed {
            self.spawner.set_refill(None);
            if let Some(dead) = self.running.take() {
                reap(dead);
            }
        }
    }
}

/// How a round trip failed: before the spawner had the request, or after.
enum RoundTrip {
    NotSent(io::Error),
    NoReply(io::Error),
}

impl Drop for Spawner {
    fn drop(&mut self) {
        if let Some(running) = self.running.get_mut().take() {
            reap(running);
        }
    }
}

/// Closes the socket (the spawner exits on that) and reaps the spawner. One still there after
/// 5 ms (stuck, or stopped) is killed and reaped by a thread of its own, so that no retired
/// spawner stays a zombie while the worker runs.
fn reap(running: Running) {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    let Running { sock, pid } = running;
    drop(sock);
    for _ in 0..20 {
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => {
                std::thread::sleep(std::time::Duration::from_micros(250));
            }
            _ => return,
        }
    }
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
    let _ = std::thread::Builder::new()
        .name("drover-reap".into())
        .stack_size(64 * 1024)
        .spawn(move || {
            let _ = waitpid(pid, None);
        });
}

fn is_gone(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EPIPE | libc::ECONNRESET | libc::ENOTCONN)
    ) || e.kind() == io::ErrorKind::UnexpectedEof
}

async fn round_trip(sock: &OwnedFd, request: &Request, fds: &[RawFd]) -> Result<Reply, RoundTrip> {
    let prepared = prepare(sock, request, fds).map_err(RoundTrip::NotSent)?;
    let (registered, message, fds) = (&prepared.registered, &prepared.message, &prepared.fds);
    let fd = registered.as_raw_fd();
    loop {
        registered.writable().await.map_err(RoundTrip::NotSent)?;
        match registered.try_io(Interest::WRITABLE, || send(fd, message, fds)) {
            Ok(()) => break,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(RoundTrip::NotSent(e)),
        }
    }
    let mut buf = vec![0u8; MESSAGE_MAX];
    loop {
        registered.readable().await.map_err(RoundTrip::NoReply)?;
        match registered.try_io(Interest::READABLE, || receive(fd, &mut buf)) {
            Ok((0, _)) => return Err(RoundTrip::NoReply(io::ErrorKind::UnexpectedEof.into())),
            // A reply carries no descriptors; any that came anyway are closed here.
            Ok((n, _)) => {
                return postcard::from_bytes(&buf[..n])
                    .map_err(|e| RoundTrip::NoReply(io::Error::other(e)))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(RoundTrip::NoReply(e)),
        }
    }
}

/// The message for `request` (inline, or in a memfd sent along), and the socket registered
/// with the current runtime.
fn prepare(sock: &OwnedFd, request: &Request, fds: &[RawFd]) -> io::Result<Prepared> {
    let bytes = postcard::to_allocvec(request).map_err(io::Error::other)?;
    let mut memfd = None;
    let (message, fds) = if bytes.len() > INLINE_MAX {
        let made = request_memfd(&bytes)?;
        let mut all = fds.to_vec();
        all.push(made.as_raw_fd());
        memfd = Some(made);
        (
            postcard::to_allocvec(&Request::InMemfd).map_err(io::Error::other)?,
            all,
        )
    } else {
        (bytes, fds.to_vec())
    };
    // Registered with the current runtime for this round trip only (the sandbox outlives
    // runtimes in tests): a duplicate of the socket, which tokio owns and closes. Its stream
    // type is only a readiness handle here; every read and write is a sendmsg/recvmsg.
    let registered =
        tokio::net::UnixStream::from_std(std::os::unix::net::UnixStream::from(sock.try_clone()?))?;
    Ok(Prepared {
        registered,
        message,
        fds,
        _memfd: memfd,
    })
}

/// A request ready to send: see [`prepare`].
struct Prepared {
    registered: tokio::net::UnixStream,
    message: Vec<u8>,
    /// The descriptors to pass, the memfd's among them.
    fds: Vec<RawFd>,
    /// Open until the request is sent.
    _memfd: Option<OwnedFd>,
}

fn request_memfd(bytes: &[u8]) -> io::Result<OwnedFd> {
    use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
    let fd = memfd_create(c"drover-spawn", MemFdCreateFlag::MFD_CLOEXEC)?;
    let mut file = std::fs::File::from(fd);
    file.write_all(bytes)?;
    file.rewind()?;
    Ok(OwnedFd::from(file))
}

pub(super) fn send(sock: RawFd, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let iov = [io::IoSlice::new(bytes)];
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &cmsg };
    let sent = sendmsg::<()>(sock, &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)?;
    if sent != bytes.len() {
        return Err(io::Error::other("a spawner message was cut short"));
    }
    Ok(())
}

/// One message and the descriptors that came with it (owned, close-on-exec).
pub(super) fn receive(sock: RawFd, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut iov = [io::IoSliceMut::new(buf)];
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let msg = recvmsg::<()>(sock, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)?;
    let mut fds = Vec::new();
    for cmsg in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(received) = cmsg {
            fds.extend(received.into_iter().map(child::owned_fd));
        }
    }
    if msg
        .flags
        .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC)
    {
        return Err(io::Error::other("a spawner message was truncated"));
    }
    Ok((msg.bytes, fds))
}

/// Forks the spawner: the child serves requests until the socket closes.
fn fork_spawner(hierarchy: &Hierarchy, options: Options) -> io::Result<Running> {
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;
    let owner = std::process::id();
    let pools = match (options.warm, hierarchy) {
        (true, Hierarchy::V1(bases)) => Some(bases.clone()),
        _ => None,
    };
    let netns = options.netns;
    let hierarchy = hierarchy.clone();
    let pid = child::fork_process()?;
    if pid == 0 {
        drop(ours);
        serve(theirs, hierarchy, pools, netns, owner);
    }
    drop(theirs);
    nix::fcntl::fcntl(
        ours.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )?;
    Ok(Running {
        sock: Arc::new(ours),
        pid: nix::unistd::Pid::from_raw(pid),
    })
}

/// The spawner's life. It is a fork of the worker, possibly of a multi-threaded one: glibc's
/// fork leaves malloc usable, but no lock the other threads may have held is taken here (no
/// logging, no stdio), and the worker's descriptors and signal handlers are let go first.
fn serve(
    sock: OwnedFd,
    hierarchy: Hierarchy,
    warm_bases: Option<super::cgroup::v1::Bases>,
    netns: bool,
    owner: u32,
) -> ! {
    if child::become_spawner(sock.as_raw_fd(), SPAWNER_SOCKET_FD).is_err() {
        child::exit(1);
    }
    // Now at SPAWNER_SOCKET_FD (the number it had is closed, unless it was that one).
    std::mem::forget(sock);
    let pools = Pools {
        warm: warm_bases
            .map(|bases| warm::Pool::new(bases, super::WARM_CGROUPS, owner, standby::exe())),
        netns: netns.then(netns::Pool::new),
    };
    let mut buf = vec![0u8; MESSAGE_MAX];
    loop {
        let (n, fds) = match receive(SPAWNER_SOCKET_FD, &mut buf) {
            Ok((0, _)) => break,
            Ok(got) => got,
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(_) => break,
        };
        let reply = handle(&buf[..n], fds, &hierarchy, &pools);
        if let Some(reply) = reply {
            let sent = postcard::to_allocvec(&reply)
                .map_err(io::Error::other)
                .and_then(|bytes| send(SPAWNER_SOCKET_FD, &bytes, &[]));
            if sent.is_err() {
                break;
            }
        }
    }
    drop(pools);
    child::exit(0)
}

/// What the spawner keeps ready.
#[derive(Debug)]
struct Pools {
    warm: Option<warm::Pool>,
    netns: Option<netns::Pool>,
}

/// One request; `None` for those without a reply.
fn handle(
    message: &[u8],
    mut fds: Vec<OwnedFd>,
    hierarchy: &Hierarchy,
    pools: &Pools,
) -> Option<Reply> {
    let pool = pools.warm.as_ref();
    let notes = || {
        let mut notes = pool.map(warm::Pool::take_notes).unwrap_or_default();
        notes.extend(pools.netns.as_ref().and_then(netns::Pool::take_broken));
        notes
    };
    let reap = || pool.map(warm::Pool::take_reap).unwrap_or_default();
    let failed = |why: String| Reply::Failed {
        failure: Failure::Request(why),
        notes: notes(),
        reap: reap(),
    };
    let mut request: Request = match postcard::from_bytes(message) {
        Ok(r) => r,
        Err(e) => return Some(failed(format!("cannot decode a request: {e}"))),
    };
    if matches!(request, Request::InMemfd) {
        let Some(memfd) = fds.pop() else {
            return Some(failed("a request in a memfd came without it".into()));
        };
        let mut bytes = Vec::new();
        if let Err(e) = std::fs::File::from(memfd).read_to_end(&mut bytes) {
            return Some(failed(format!("cannot read a request's memfd: {e}")));
        }
        request = match postcard::from_bytes(&bytes) {
            Ok(r) => r,
            Err(e) => return Some(failed(format!("cannot decode a request: {e}"))),
        };
    }
    match request {
        Request::Refill { recycled } => {
            match (pool, recycled) {
                (Some(pool), recycled) => pool.refill(recycled),
                // No pool to take it (the worker hands cgroups back only to one): removed.
                (None, Some(name)) => {
                    let _ = hierarchy.existing(&name).remove();
                }
                (None, None) => {}
            }
            None
        }
        Request::Over { pid, by_itself } => {
            if let Some(pool) = &pools.netns {
                pool.over(pid, by_itself);
            }
            None
        }
        Request::Status => Some(Reply::Status {
            ready: pool.map_or(0, warm::Pool::ready),
            netns: pools.netns.as_ref().map_or((0, 0, 0), netns::Pool::counts),
            notes: notes(),
            reap: reap(),
        }),
        Request::InMemfd => Some(failed("a memfd request inside a memfd".into())),
        Request::Spawn(spawn) => Some(match start(*spawn, fds, hierarchy, pools) {
            Ok((pid, cgroup, warm)) => Reply::Spawned {
                pid,
                cgroup,
                warm,
                notes: notes(),
                reap: reap(),
            },
            Err(failure) => Reply::Failed {
                failure,
                notes: notes(),
                reap: reap(),
            },
        }),
    }
}

/// Puts the received descriptors in the plan, gets the attempt a cgroup (warm if one is ready)
/// and forks. Returns (pid, cgroup name, warm).
fn start(
    spawn: SpawnRequest,
    fds: Vec<OwnedFd>,
    hierarchy: &Hierarchy,
    pools: &Pools,
) -> Result<(i32, String, bool), Failure> {
    let pool = pools.warm.as_ref();
    let SpawnRequest {
        name,
        memory_bytes,
        pids,
        mut plan,
    } = spawn;
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    adopt(&mut plan, &raw, false).map_err(Failure::Request)?;
    plan.from_spawner = true;
    // What a standby helper could have made of this sandbox ahead (before a network
    // namespace made ahead is chosen for it below).
    let view = plan
        .sandbox
        .as_ref()
        .and_then(|setup| standby::View::of(setup, &plan.workspace));
    // A warm cgroup may hold a standby helper's memory already (about 0.5 MiB): a limit
    // below it could not be set, so the smallest limits get a fresh cgroup.
    let fits = memory_bytes.is_none_or(|m| m >= WARM_MIN_MEMORY);
    let taken = pool.filter(|_| fits).and_then(|pool| {
        pool.take(plan.sandbox.is_some(), view.as_ref())
            .map(|w| (pool, w))
    });
    // A helper that made its sandbox ahead takes the plan as it is; so does one that made
    // another (it is let go below, and the attempt gets a fresh cgroup).
    let prepared = taken.as_ref().is_some_and(|(_, w)| w.prepared().is_some());
    // Held until after the fork: the outer helper joins it (see the `netns` module). With
    // `network = none` it is lent, not closed, once the attempt is started: it comes back
    // to the pool when the attempt is over, if the attempt left nothing in it.
    let lendable = plan
        .sandbox
        .as_ref()
        .is_some_and(|setup| setup.proxy_port.is_none());
    let net_ns = match plan.sandbox.as_mut() {
        Some(setup) if !prepared => {
            // Never into a user namespace of the attempt's own: a namespace made here belongs
            // to ours, and joining it from inside a new one is refused (EPERM).
            let joinable = setup.unshare_flags & libc::CLONE_NEWNET != 0
                && setup.unshare_flags & libc::CLONE_NEWUSER == 0;
            let made = joinable
                .then(|| pools.netns.as_ref().and_then(netns::Pool::take))
                .flatten();
            if let Some(fd) = &made {
                setup.net_ns = Some(fd.ns.as_raw_fd());
                setup.unshare_flags &= !libc::CLONE_NEWNET;
            }
            made
        }
        _ => None,
    };
    let result = match taken {
        Some((pool, warmed)) => {
            let (group, launcher, standby) = warmed.into_parts();
            // Before the fork: the thread goes, and the cgroup with it.
            let give_up = |launcher: warm::Launcher, failure: Failure| {
                launcher.release();
                remove_dirs(group.dirs());
                failure
            };
            if let Some(standby) = standby {
                // Its thread left once the helper had started; this only makes sure.
                launcher.release();
                let handed = match &standby.prepared {
                    Some(made) if Some(made) != view.as_ref() => Err(HandOff::Other),
                    _ => hand_off(
                        &group,
                        &standby,
                        memory_bytes,
                        pids,
                        &mut plan,
                        &raw,
                        &net_ns,
                    ),
                };
                let failed = match handed {
                    Ok(()) => {
                        lend(pools, net_ns, lendable, standby.pid);
                        return Ok((standby.pid, group.name(), true));
                    }
                    Err(failed) => failed,
                };
                let pid = standby.pid;
                let was_prepared = standby.prepared.is_some();
                pool.let_go(standby);
                pool.orphan(group);
                return match failed {
                    HandOff::Limit(e) => Err(Failure::cgroup(e)),
                    HandOff::Other => start_cold(&name, memory_bytes, pids, hierarchy, &mut plan),
                    HandOff::Send(e) => {
                        // The helper is gone (or the plan too large): a fresh cgroup and a
                        // fork, as when no warm cgroup is ready. One that was making its
                        // sandbox ahead may have failed at that (it said why on stderr):
                        // the next ones are not asked to.
                        if was_prepared {
                            pool.stop_preparing();
                        }
                        pool.note(format!(
                            "standby helper {pid} could not take an attempt ({e}); it is forked instead"
                        ));
                        start_cold(&name, memory_bytes, pids, hierarchy, &mut plan)
                    }
                };
            }
            if let Some(bytes) = memory_bytes {
                if let Err(e) = group.set_memory_limit(bytes) {
                    return Err(give_up(launcher, Failure::cgroup(e)));
                }
            }
            // Process isolation with room to spare under its pids limit: a vfork, with the
            // limit written first (see `VFORK_MIN_PIDS`).
            if plan.sandbox.is_none() && pids.is_none_or(|p| p >= VFORK_MIN_PIDS) {
                if let Some(max) = pids {
                    if let Err(e) = group.set_pids_limit(max) {
                        return Err(give_up(launcher, Failure::cgroup(e)));
                    }
                }
                plan.cgroup_procs = Vec::new();
                plan.pids_once_alone = None;
                let plan = Arc::new(plan);
                let forked =
                    launcher.spawn(move || child::vfork_for_parent(&plan).map_err(io::Error::from));
                drop(fds);
                return forked
                    .map(|pid| (pid, group.name(), true))
                    .map_err(|e| fork_failed(&e, || remove_dirs(group.dirs())));
            }
            // With a pids limit, the child waits for word that the thread has left (see
            // `child::PidsOnceAlone`); this end says it.
            let mut go = None;
            if let (Some(dir), Some(max)) = (&group.pids, pids) {
                let (r, w) = match nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) {
                    Ok(pair) => pair,
                    Err(e) => return Err(give_up(launcher, Failure::Fork { errno: e as i32 })),
                };
                plan.pids_once_alone = Some(PidsOnceAlone {
                    max: c_path(&dir.join("pids.max")),
                    value: max.to_string().into_bytes(),
                    go: r.as_raw_fd(),
                });
                go = Some((r, w));
            }
            plan.cgroup_procs = Vec::new();
            if let Err(e) = helper_stacks(&mut plan) {
                let errno = e.raw_os_error().unwrap_or(libc::ENOMEM);
                return Err(give_up(launcher, Failure::Fork { errno }));
            }
            let plan = Arc::new(plan);
            // Returns once the thread has left the cgroup.
            let forked = launcher.spawn(move || fork_and_run(&plan));
            if let Some((r, w)) = go {
                drop(r);
                // A failed write leaves the child to see EOF and fail its setup.
                let _ = nix::unistd::write(&w, b"g");
            }
            forked
                .map(|pid| (pid, group.name(), true))
                .map_err(|e| fork_failed(&e, || remove_dirs(group.dirs())))
        }
        None => start_cold(&name, memory_bytes, pids, hierarchy, &mut plan),
    };
    // The child has its copies; the spawner's go now.
    drop(fds);
    if let Ok((pid, _, _)) = &result {
        lend(pools, net_ns, lendable, *pid);
    }
    result
}

/// Lends the network namespace made ahead that the attempt whose outer helper is `pid`
/// joins, if it had one and may give it back (`lendable`), to the pool until the worker says
/// the attempt is over ([`Request::Over`]); otherwise closes it.
fn lend(pools: &Pools, net_ns: Option<netns::Taken>, lendable: bool, pid: i32) {
    if let (Some(ns), Some(pool), true) = (net_ns, pools.netns.as_ref(), lendable) {
        pool.lend(ns, pid);
    }
}

/// Puts the descriptors that came with `plan` in its fields, in [`FdSet`] order; with
/// `standby` (a plan handed to a standby helper), then the network namespace it joins, where
/// it has one.
pub(super) fn adopt(plan: &mut ChildPlan, raw: &[RawFd], standby: bool) -> Result<(), String> {
    let net_ns = standby && plan.sandbox.as_ref().is_some_and(|s| s.net_ns.is_some());
    let want = 5
        + usize::from(plan.status_fd.is_some())
        + usize::from(plan.proxy_fd.is_some())
        + usize::from(plan.confirm_fd.is_some())
        + usize::from(net_ns);
    if raw.len() != want {
        return Err(format!(
            "{} descriptors came with a plan, {want} expected",
            raw.len()
        ));
    }
    let mut next = raw.iter().copied();
    let mut take = || next.next().expect("counted above");
    plan.stdio = [take(), take(), take()];
    plan.setup_fd = take();
    plan.events_fd = take();
    for fd in [
        &mut plan.status_fd,
        &mut plan.proxy_fd,
        &mut plan.confirm_fd,
    ] {
        if fd.is_some() {
            *fd = Some(take());
        }
    }
    if net_ns {
        if let Some(setup) = plan.sandbox.as_mut() {
            setup.net_ns = Some(take());
        }
    }
    Ok(())
}

/// Why a hand-off to a standby helper did not happen.
enum HandOff {
    /// A limit could not be written to the warm cgroup.
    Limit(CgroupError),
    /// The message did not reach the helper: it is gone, or the plan is too large.
    Send(io::Error),
    /// The helper made another sandbox ahead than the attempt's.
    Other,
}

/// Writes the attempt's limits to the warm cgroup `group`, which holds only the standby
/// helper (its thread has left, so `pids.max` is exact now), and hands the helper `plan`: the
/// plan, then its descriptors — `fds` (the attempt's, in [`FdSet`] order) and the network
/// namespace made ahead (see [`adopt`]) — in one message, which arrives whole or not at all.
fn hand_off(
    group: &super::cgroup::v1::Group,
    standby: &standby::Standby,
    memory_bytes: Option<u64>,
    pids: Option<u32>,
    plan: &mut ChildPlan,
    fds: &[RawFd],
    net_ns: &Option<netns::Taken>,
) -> Result<(), HandOff> {
    if let Some(bytes) = memory_bytes {
        group.set_memory_limit(bytes).map_err(HandOff::Limit)?;
    }
    if let Some(max) = pids {
        group.set_pids_limit(max).map_err(HandOff::Limit)?;
    }
    plan.cgroup_procs = Vec::new();
    plan.pids_once_alone = None;
    let bytes = postcard::to_extend(&*plan, vec![standby::RUN])
        .map_err(|e| HandOff::Send(io::Error::other(e)))?;
    if bytes.len() > MESSAGE_MAX + 1 {
        return Err(HandOff::Send(io::Error::other(
            "a plan too large for one message",
        )));
    }
    let mut all = fds.to_vec();
    all.extend(net_ns.as_ref().map(|t| t.ns.as_raw_fd()));
    send(standby.sock.as_raw_fd(), &bytes, &all).map_err(HandOff::Send)
}

/// A new cgroup for the attempt, which its first process joins itself: the way without a
/// warm cgroup ready. Returns (pid, cgroup name, warm = false).
fn start_cold(
    name: &str,
    memory_bytes: Option<u64>,
    pids: Option<u32>,
    hierarchy: &Hierarchy,
    plan: &mut ChildPlan,
) -> Result<(i32, String, bool), Failure> {
    let group = hierarchy
        .create(name, CgroupLimits { memory_bytes, pids })
        .map_err(Failure::cgroup)?;
    plan.cgroup_procs = group.procs_files().iter().map(|p| c_path(p)).collect();
    plan.pids_once_alone = None;
    helper_stacks(plan)
        .and_then(|()| fork_and_run(plan))
        .map(|pid| (pid, name.to_owned(), false))
        .map_err(|e| {
            fork_failed(&e, || {
                let _ = group.remove();
            })
        })
}

/// The stacks of a sandbox's helpers that share the outer helper's memory, made by whoever
/// starts it (here: for the fork; a standby helper makes its own).
fn helper_stacks(plan: &mut ChildPlan) -> io::Result<()> {
    if plan.sandbox.is_some() {
        plan.stacks = Some(child::Stacks::helpers()?);
    }
    Ok(())
}

fn fork_and_run(plan: &ChildPlan) -> io::Result<i32> {
    match child::fork_for_parent() {
        Ok(0) => child::run(plan),
        Ok(pid) => Ok(pid),
        Err(e) => Err(io::Error::from(e)),
    }
}

/// A failed fork, after `undo` has removed the attempt's cgroup.
fn fork_failed(e: &io::Error, undo: impl FnOnce()) -> Failure {
    undo();
    Failure::Fork {
        errno: e.raw_os_error().unwrap_or(libc::EAGAIN),
    }
}

fn remove_dirs(dirs: Vec<&std::path::Path>) {
    for dir in dirs {
        let _ = std::fs::remove_dir(dir);
    }
}

/// Paths from the worker never hold NUL (it made them, like the cgroup's); one that would
/// becomes empty, and its use fails.
fn c_path(p: &std::path::Path) -> CString {
    super::plan::c_path(p).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fd_sets_travel_in_order() {
        let set = FdSet {
            stdio: [10, 11, 12],
            setup: 13,
            events: 14,
            status: Some(15),
            proxy: None,
            confirm: Some(16),
        };
        assert_eq!(set.list(), [10, 11, 12, 13, 14, 15, 16]);
    }

    #[test]
    fn failures_become_spawn_errors_naming_the_path() {
        let f = Failure::cgroup(CgroupError {
            action: "create".into(),
            path: PathBuf::from("/sys/fs/cgroup/x"),
            source: io::Error::from_raw_os_error(libc::EACCES),
        });
        let bytes = postcard::to_allocvec(&Reply::Failed {
            failure: f,
            notes: vec![],
            reap: vec![],
        })
        .unwrap();
        let Ok(Reply::Failed { failure, .. }) = postcard::from_bytes(&bytes) else {
            panic!("round trip");
        };
        let e = super::super::SpawnError::from(failure).to_string();
        assert!(
            e.contains("/sys/fs/cgroup/x") && e.contains("create"),
            "{e}"
        );
    }
}
