//! A running attempt: its pipes, its end, and how that end is classified.
//!
//! Classification ([`classify`]), in order: cancelled, then timed out (drover ended it), then
//! OOM-killed (the cgroup's `oom_kill` counter rose and the main process did not exit 0), then
//! the main process's own exit code or signal. A task that exits 0 although the kernel
//! OOM-killed one of its children handled that itself: it is `exited(0)`, with
//! [`AttemptOutcome::oom_kills`] telling what happened.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use drover_protocol::task::{ExitClass, Limits};
use nix::errno::Errno;
use nix::libc;
use tokio::net::unix::pipe;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::cgroup::AttemptCgroup;
use super::child::{self, Record};
use super::process::Process;
use super::Inner;

/// How an attempt ended, with what its cgroup measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttemptOutcome {
    pub class: ExitClass,
    /// Highest memory use of the attempt's cgroup, bytes (v2 `memory.peak`, Linux 5.19+; v1
    /// `memory.max_usage_in_bytes`).
    pub peak_memory_bytes: Option<u64>,
    /// The memory limit that applied, bytes.
    pub memory_limit_bytes: Option<u64>,
    /// Processes of the attempt the kernel OOM-killed (from the cgroup's counter).
    pub oom_kills: u64,
    /// False when the spec asked for a pids limit that this host cannot enforce (no pids
    /// controller).
    pub pids_limit_enforced: bool,
    /// From the task's exec to the end of the whole tree.
    pub duration: Duration,
}

/// A started attempt. Dropping it without [`Attempt::wait`] kills its whole tree.
#[derive(Debug)]
pub struct Attempt {
    /// The task's stdout (take it to read it concurrently with [`Attempt::wait`]).
    pub stdout: Option<pipe::Receiver>,
    /// The task's stderr.
    pub stderr: Option<pipe::Receiver>,
    /// The read end of the task's `DROVER_EVENTS_FD` (JSON lines, unparsed).
    pub events: Option<pipe::Receiver>,
    process: Process,
    /// Sandbox isolation: records of the init (the task's status) and of the outer helper.
    status: Option<OwnedFd>,
    cgroup: CgroupGuard,
    started: Instant,
    deadline: Option<Instant>,
    memory_limit_bytes: Option<u64>,
    pids_limit_enforced: bool,
    /// The spawner has been told this (sandboxed) attempt is over (see `Spawner::attempt_over`).
    over_told: bool,
    outcome: Option<AttemptOutcome>,
}

/// What ended the wait.
#[derive(Debug)]
enum End {
    /// The process the worker forked (the task itself, or the sandbox's outer helper) exited.
    Main(Option<ExitStatus>),
    Cancelled,
    TimedOut,
}

/// The main process's own end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Exited(i32),
    Signaled(i32),
    /// Never learnt (logged).
    Unknown,
}

impl Attempt {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        process: Process,
        stdout: pipe::Receiver,
        stderr: pipe::Receiver,
        events: pipe::Receiver,
        status: Option<OwnedFd>,
        cgroup: CgroupGuard,
        limits: &Limits,
        pids_limit_enforced: bool,
    ) -> Attempt {
        if let Some(fd) = &status {
            // Read once everything is dead, so it must never block.
            if let Err(err) = nix::fcntl::fcntl(
                fd.as_raw_fd(),
                nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
            ) {
                warn!(%err, "cannot make the status pipe non-blocking");
            }
        }
        let started = Instant::now();
        Attempt {
            stdout: Some(stdout),
            stderr: Some(stderr),
            events: Some(events),
            process,
            status,
            cgroup,
            started,
            deadline: limits
                .wall_time_ms
                .map(|ms| started + Duration::from_millis(ms)),
            memory_limit_bytes: limits.memory_bytes,
            pids_limit_enforced,
            over_told: false,
            outcome: None,
        }
    }

    /// Waits until the attempt ends, kills whatever of its tree is left, removes its cgroup
    /// (or hands it back for reuse) and classifies the end. Past `Limits::wall_time_ms` it
    /// kills the tree (`timed_out`); on `cancel` likewise (`cancelled`). Calling it again
    /// returns the same outcome.
    pub async fn wait(&mut self, cancel: CancellationToken) -> AttemptOutcome {
        if let Some(outcome) = self.outcome {
            return outcome;
        }
        let deadline = self.deadline;
        let timeout = async move {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        let end = tokio::select! {
            biased;
            status = self.process.wait() => End::Main(status.ok()),
            () = cancel.cancelled() => End::Cancelled,
            () = timeout => End::TimedOut,
        };
        if let End::Main(status) = end {
            // Reaped just now: told before anything awaits (see `tell_over`).
            self.tell_over(status);
        }
        // Whatever ended it, nothing of the tree outlives the attempt. Killing the forked
        // process too covers a cgroup that will not empty: its death takes the sandbox's pid
        // namespace with it.
        if !matches!(end, End::Main(_)) {
            let _ = self.process.start_kill();
        }
        let emptied = match self.cgroup.get() {
            Some(cgroup) => cgroup.kill_all().await,
            None => Ok(()),
        };
        if let Err(err) = &emptied {
            warn!(%err, "attempt cgroup did not empty");
        }
        let forked = match end {
            End::Main(status) => status,
            _ => self.process.wait().await.ok(),
        };
        // Killed, it was reaped just now (nothing awaits between the reap and here).
        self.tell_over(forked);
        let records = self.status_records();
        let counters = self
            .cgroup
            .get()
            .map(AttemptCgroup::counters)
            .unwrap_or_default();
        let main = main_status(self.status.is_some(), &records, forked);
        let class = classify(&end, main, counters.oom_kills);
        if emptied.is_ok() {
            // Seen empty above, and it stays so (a process enters only by forking from a
            // member): hand it back for reuse or remove it, without looking again.
            self.cgroup.finish_emptied(counters.oom_kills).await;
        }
        let outcome = AttemptOutcome {
            class,
            peak_memory_bytes: counters.peak_memory_bytes,
            memory_limit_bytes: self.memory_limit_bytes,
            oom_kills: counters.oom_kills,
            pids_limit_enforced: self.pids_limit_enforced,
            duration: self.started.elapsed(),
        };
        self.outcome = Some(outcome);
        outcome
    }

    /// Tells the spawner, once, that this sandboxed attempt is over, its first process (the
    /// sandbox's outer helper) reaped with `status`. The outer helper exits with 0 only once
    /// it has reaped its init, and with it every process of the sandbox's pid namespace; one
    /// killed may have left them running a moment longer. Its network namespace, if the
    /// spawner lent it one, may come back only in the first case (see the `netns` module).
    /// Called right after the reap, with nothing awaited in between: word that left later (a
    /// `wait` cancelled between the reap and the word, and called again) could reach the
    /// spawner after the pid's next loan and speak for that attempt. (Even now the pid must
    /// not be reused before the word goes, which takes the kernel's pid counter wrapping
    /// round in those microseconds.)
    fn tell_over(&mut self, status: Option<ExitStatus>) {
        if self.status.is_none() || self.over_told {
            return;
        }
        self.over_told = true;
        let by_itself = status.and_then(|s| s.code()) == Some(0);
        self.cgroup
            .inner
            .spawner
            .attempt_over(self.process.id(), by_itself);
    }

    /// Host pids of the attempt's processes (tests look for daemonized grandchildren).
    #[cfg(test)]
    pub(crate) fn cgroup_pids(&self) -> Vec<i32> {
        self.cgroup
            .get()
            .and_then(|c| c.pids().ok())
            .unwrap_or_default()
    }

    /// The attempt cgroup's directories (tests check they are removed).
    #[cfg(test)]
    pub(crate) fn cgroup_dirs(&self) -> Vec<std::path::PathBuf> {
        self.cgroup
            .get()
            .map(|c| {
                c.dirs()
                    .into_iter()
                    .map(std::path::Path::to_path_buf)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// What the helpers wrote on the status pipe; every writer is dead by now.
    fn status_records(&self) -> Vec<Record> {
        let Some(fd) = &self.status else {
            return Vec::new();
        };
        let mut bytes = Vec::new();
        let mut buf = [0u8; 64];
        loop {
            match nix::unistd::read(fd.as_raw_fd(), &mut buf) {
                Ok(0) => break,
                Ok(n) => bytes.extend_from_slice(&buf[..n]),
                Err(Errno::EINTR) => {}
                Err(_) => break,
            }
        }
        child::parse_records(&bytes)
    }
}

/// The main process's status: with sandbox isolation the task's (reported by the init), else
/// the init's if it died before the task, else the forked process's.
fn main_status(sandboxed: bool, records: &[Record], forked: Option<ExitStatus>) -> Status {
    if sandboxed {
        let task = records.iter().find_map(|r| match r {
            Record::Task(s) => Some(*s),
            _ => None,
        });
        let init = records.iter().find_map(|r| match r {
            Record::Init(s) => Some(*s),
            _ => None,
        });
        if let Some(raw) = task.or(init) {
            return decode(raw);
        }
    }
    match forked {
        Some(s) => decode(s.into_raw()),
        None => {
            warn!("the attempt's exit status could not be learnt");
            Status::Unknown
        }
    }
}

fn decode(raw: libc::c_int) -> Status {
    if libc::WIFEXITED(raw) {
        Status::Exited(libc::WEXITSTATUS(raw))
    } else if libc::WIFSIGNALED(raw) {
        Status::Signaled(libc::WTERMSIG(raw))
    } else {
        Status::Unknown
    }
}

/// See the module docs for the order.
fn classify(end: &End, main: Status, oom_kills: u64) -> ExitClass {
    match end {
        End::Cancelled => ExitClass::Cancelled,
        End::TimedOut => ExitClass::TimedOut,
        End::Main(_) if oom_kills > 0 && main != Status::Exited(0) => ExitClass::OomKilled,
        End::Main(_) => match main {
            Status::Exited(code) => ExitClass::Exited(code),
            Status::Signaled(signal) => ExitClass::Signaled(signal),
            // No status at all: report it as a SIGKILL from outside, the only way a process
            // vanishes without its parent learning how.
            Status::Unknown => ExitClass::Signaled(libc::SIGKILL),
        },
    }
}

/// Owns an attempt's cgroup until it is removed or handed back for reuse; dropped early (a
/// failed or abandoned attempt), it kills the tree and hands the cgroup to the leftover list if
/// it cannot go yet.
#[derive(Debug)]
pub(super) struct CgroupGuard {
    cgroup: Option<AttemptCgroup>,
    /// A warm cgroup (see the `warm` module), which may be reused once emptied.
    warm: bool,
    inner: Arc<Inner>,
}

impl CgroupGuard {
    pub(super) fn new(cgroup: AttemptCgroup, warm: bool, inner: Arc<Inner>) -> CgroupGuard {
        CgroupGuard {
            cgroup: Some(cgroup),
            warm,
            inner,
        }
    }

    fn get(&self) -> Option<&AttemptCgroup> {
        self.cgroup.as_ref()
    }

    /// Kills what is left, waits for the cgroup to empty and removes it or hands it back for
    /// reuse (or keeps it as a leftover).
    pub(super) async fn finish(&mut self) {
        let Some(cgroup) = self.cgroup.take() else {
            return;
        };
        if let Err(err) = cgroup.kill_all().await {
            warn!(%err, "attempt cgroup kept as a leftover");
            self.inner.leftovers().push(cgroup);
            return;
        }
        self.inner.keep_or_remove(cgroup, self.warm);
    }
}

impl CgroupGuard {
    /// Hands a cgroup already seen empty back for reuse, or removes it, or keeps it as a
    /// leftover if it will not go. A process that has just died can be gone from
    /// `cgroup.procs` a moment before the kernel lets the directory go (EBUSY): retried
    /// briefly. `oom_kills`: its OOM counter, read after it was seen empty.
    async fn finish_emptied(&mut self, oom_kills: u64) {
        let Some(cgroup) = self.cgroup.take() else {
            return;
        };
        if self.warm && self.inner.recycle(&cgroup, Some(oom_kills)) {
            return;
        }
        let removed = super::cgroup::poll_until(std::time::Duration::from_millis(500), || {
            cgroup.remove().is_ok()
        })
        .await;
        if removed {
            self.inner.refill_warm();
        } else {
            self.inner.remove_or_keep(cgroup);
        }
    }
}

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        if let Some(cgroup) = self.cgroup.take() {
            cgroup.kill_now();
            self.inner.keep_or_remove(cgroup, self.warm);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_order() {
        let main = End::Main(None);
        assert_eq!(
            classify(&End::Cancelled, Status::Exited(0), 3),
            ExitClass::Cancelled
        );
        assert_eq!(
            classify(&End::TimedOut, Status::Signaled(9), 1),
            ExitClass::TimedOut
        );
        assert_eq!(
            classify(&main, Status::Signaled(9), 1),
            ExitClass::OomKilled
        );
        assert_eq!(classify(&main, Status::Exited(1), 1), ExitClass::OomKilled);
        // The task survived the OOM kill of a child.
        assert_eq!(classify(&main, Status::Exited(0), 1), ExitClass::Exited(0));
        // A SIGKILL alone is not an OOM.
        assert_eq!(
            classify(&main, Status::Signaled(9), 0),
            ExitClass::Signaled(9)
        );
        assert_eq!(classify(&main, Status::Exited(3), 0), ExitClass::Exited(3));
    }

    #[test]
    fn status_sources() {
        let exited = |code: i32| code << 8;
        let forked = Some(ExitStatus::from_raw(exited(0)));
        let records = [Record::Init(exited(0)), Record::Task(exited(3))];
        assert_eq!(main_status(true, &records, forked), Status::Exited(3));
        assert_eq!(
            main_status(true, &[Record::Init(libc::SIGKILL)], forked),
            Status::Signaled(9)
        );
        assert_eq!(main_status(true, &[], forked), Status::Exited(0));
        assert_eq!(
            main_status(false, &records, Some(ExitStatus::from_raw(15))),
            Status::Signaled(15)
        );
        assert_eq!(main_status(false, &[], None), Status::Unknown);
    }
}
