//! An attempt's first process as the worker holds it: the worker is its parent (the spawner
//! forks it with `CLONE_PARENT`, see the `spawner` module) but did not fork it itself, so
//! tokio's `Child` cannot hold it. Owns: learning its end (`waitpid`, woken by SIGCHLD) and
//! killing it.
//!
//! Invariant: the pid is signalled only until it is reaped, and only this handle reaps it, so
//! a kill never reaches a recycled pid. Dropped before it was reaped, the process is killed and
//! reaped later (by the next handle that waits), never left a zombie for long.

use std::io;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::Mutex;

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};

/// Killed processes whose handles were dropped before they were reaped.
static UNREAPED: Mutex<Vec<Pid>> = Mutex::new(Vec::new());

/// A child process of the worker; see the module docs.
#[derive(Debug)]
pub(crate) struct Process {
    pid: Pid,
    status: Option<ExitStatus>,
}

impl Process {
    /// The handle of child `pid` (not yet reaped).
    pub(crate) fn new(pid: i32) -> Process {
        reap_dropped();
        Process {
            pid: Pid::from_raw(pid),
            status: None,
        }
    }

    /// Its pid.
    pub(crate) fn id(&self) -> i32 {
        self.pid.as_raw()
    }

    /// Waits until it has ended and reaps it. Cancel-safe; once reaped, returns the same status.
    pub(crate) async fn wait(&mut self) -> io::Result<ExitStatus> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        // Listening before the first look: a SIGCHLD between the look and the wait still wakes
        // the wait.
        let mut sigchld = signal(SignalKind::child())?;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            if sigchld.recv().await.is_none() {
                return Err(io::Error::other(
                    "the runtime's signal handling has stopped",
                ));
            }
        }
    }

    /// Its status if it has ended (reaping it), without waiting.
    pub(crate) fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        if let Some(status) = self.status {
            return Ok(Some(status));
        }
        let raw = match waitpid(self.pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => return Ok(None),
            Ok(WaitStatus::Exited(_, code)) => code << 8,
            Ok(WaitStatus::Signaled(_, signal, core)) => {
                signal as i32 | if core { 0x80 } else { 0 }
            }
            // Stopped or continued (only reported with flags not given here): still alive.
            Ok(_) => return Ok(None),
            Err(Errno::EINTR) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let status = ExitStatus::from_raw(raw);
        self.status = Some(status);
        Ok(Some(status))
    }

    /// Sends SIGKILL unless it has been reaped.
    pub(crate) fn start_kill(&self) -> io::Result<()> {
        if self.status.is_some() {
            return Ok(());
        }
        match kill(self.pid, Signal::SIGKILL) {
            Ok(()) | Err(Errno::ESRCH) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.status.is_some() {
            return;
        }
        let _ = self.start_kill();
        if !matches!(self.try_wait(), Ok(Some(_))) {
            lock_unreaped().push(self.pid);
        }
    }
}

/// Reap what dropped handles left (each was killed; most are gone by the next spawn).
fn reap_dropped() {
    lock_unreaped().retain(|pid| {
        matches!(
            waitpid(*pid, Some(WaitPidFlag::WNOHANG)),
            Ok(WaitStatus::StillAlive)
        )
    });
}

fn lock_unreaped() -> std::sync::MutexGuard<'static, Vec<Pid>> {
    UNREAPED.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fork_running(code: &str) -> i32 {
        let child = std::process::Command::new("sh")
            .args(["-c", code])
            .spawn()
            .expect("sh");
        let pid = child.id() as i32;
        // The handle under test reaps it, not std's.
        std::mem::forget(child);
        pid
    }

    #[tokio::test]
    async fn waits_for_exit_codes_and_signals() {
        let mut p = Process::new(fork_running("exit 3"));
        let status = p.wait().await.unwrap();
        assert_eq!(status.code(), Some(3));
        assert_eq!(p.wait().await.unwrap().code(), Some(3), "same status again");
        let mut q = Process::new(fork_running("sleep 30"));
        assert!(q.try_wait().unwrap().is_none());
        q.start_kill().unwrap();
        assert_eq!(q.wait().await.unwrap().signal(), Some(nix::libc::SIGKILL));
        q.start_kill().unwrap();
    }

    #[tokio::test]
    async fn a_dropped_handle_kills_and_is_reaped_later() {
        let pid = fork_running("sleep 30");
        drop(Process::new(pid));
        let mut other = Process::new(fork_running("exit 0"));
        other.wait().await.unwrap();
        for _ in 0..200 {
            Process::new(fork_running("exit 0")).wait().await.unwrap();
            if !lock_unreaped().contains(&Pid::from_raw(pid)) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(!lock_unreaped().contains(&Pid::from_raw(pid)));
        assert_eq!(kill(Pid::from_raw(pid), None), Err(Errno::ESRCH));
    }
}
