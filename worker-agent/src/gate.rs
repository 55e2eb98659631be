//! The worker's own capacity gate: an attempt's processes start only when what it reserves
//! (cpus, memory, gpus from its spec's requirements) fits beside what the worker already runs.
//!
//! The coordinator places within the capacity the worker reports, except for one task it may
//! assign *ahead* of a full worker (`assign_ahead` in its config): such an assignment waits
//! here and starts the moment an earlier attempt's processes are gone — without waiting for
//! the coordinator to hear of that end and answer. Assignments that fit start at once, as
//! before. Waiters are served in arrival order, so a task the coordinator placed with room is
//! never overtaken by one it sent ahead after it.
//!
//! A permit is held from just before the attempt's `started` event until its last process is
//! gone (before its outputs are uploaded and `exited` is sent). When nothing is running, any
//! attempt may start, so a task larger than the worker (its report changed) cannot wait
//! forever. Totals follow the resource report of the latest registration.

use drover_protocol::task::Requirements;
use drover_protocol::{Capacity, ResourceReport};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

/// Shared by every attempt of one worker; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Gate {
    inner: Arc<Mutex<State>>,
}

#[derive(Debug, Default)]
struct State {
    total: Capacity,
    used: Capacity,
    /// Attempts holding a permit.
    holders: usize,
    waiters: VecDeque<(Capacity, oneshot::Sender<()>)>,
}

/// Room taken by one attempt; given back when dropped.
#[derive(Debug)]
pub struct Permit {
    gate: Gate,
    demand: Capacity,
}

/// The capacity a resource report offers the coordinator.
pub fn totals(report: &ResourceReport) -> Capacity {
    Capacity {
        cpus: u64::from(report.cpu_count),
        memory_bytes: report.memory_total_bytes,
        gpus: report.gpus.len() as u64,
    }
}

/// What an attempt with these requirements takes (the coordinator's `demand`).
pub fn demand(req: &Requirements) -> Capacity {
    Capacity {
        cpus: u64::from(req.cpus),
        memory_bytes: req.memory_bytes,
        gpus: u64::from(req.gpus),
    }
}

impl State {
    fn fits(&self, d: Capacity) -> bool {
        self.holders == 0
            || (self.used.cpus + d.cpus <= self.total.cpus
                && self.used.memory_bytes + d.memory_bytes <= self.total.memory_bytes
                && self.used.gpus + d.gpus <= self.total.gpus)
    }

    fn take(&mut self, d: Capacity) {
        self.used.cpus += d.cpus;
        self.used.memory_bytes += d.memory_bytes;
        self.used.gpus += d.gpus;
        self.holders += 1;
    }

    /// Grant waiters in order while the first fits; waiters that gave up are dropped.
    fn grant(&mut self) {
        self.purge();
        while let Some((d, _)) = self.waiters.front() {
            if !self.fits(*d) {
                return;
            }
            let (d, tx) = self.waiters.pop_front().expect("a front exists");
            // Taken before the send, so a waiter that wakes finds it taken; one that gave
            // up meanwhile gives it back (see `Waiting`).
            self.take(d);
            if tx.send(()).is_err() {
                self.release(d);
            }
            self.purge();
        }
    }

    fn purge(&mut self) {
        while self.waiters.front().is_some_and(|(_, tx)| tx.is_closed()) {
            self.waiters.pop_front();
        }
    }

    fn release(&mut self, d: Capacity) {
        self.used.cpus = self.used.cpus.saturating_sub(d.cpus);
        self.used.memory_bytes = self.used.memory_bytes.saturating_sub(d.memory_bytes);
        self.used.gpus = self.used.gpus.saturating_sub(d.gpus);
        self.holders = self.holders.saturating_sub(1);
    }
}

/// A place in the queue; dropped before it was turned into a [`Permit`] (the attempt was
/// cancelled while it waited), it takes nothing, and gives back what a grant that raced with
/// the drop took.
struct Waiting<'a> {
    gate: &'a Gate,
    demand: Capacity,
    rx: Option<oneshot::Receiver<()>>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Some(mut rx) = self.rx.take() {
            rx.close();
            if rx.try_recv().is_ok() {
                let mut s = self.gate.lock();
                s.release(self.demand);
                s.grant();
            }
        }
    }
}

impl Gate {
    /// The worker's totals (what its latest resource report says: [`totals`]).
    pub fn set_totals(&self, total: Capacity) {
        let mut s = self.lock();
        s.total = total;
        s.grant();
    }

    /// Waits until `req` fits (at once when it does and nobody waits before it). Cancel-safe:
    /// dropped while waiting, it takes nothing.
    pub async fn acquire(&self, req: &Requirements) -> Permit {
        let d = demand(req);
        let mut wait = Waiting {
            gate: self,
            demand: d,
            rx: None,
        };
        {
            let mut s = self.lock();
            s.purge();
            if s.waiters.is_empty() && s.fits(d) {
                s.take(d);
            } else {
                let (tx, rx) = oneshot::channel();
                s.waiters.push_back((d, tx));
                wait.rx = Some(rx);
            }
        }
        if let Some(rx) = wait.rx.as_mut() {
            // The sender stays queued until granted (the gate outlives its attempts).
            let _ = rx.await;
        }
        wait.rx = None;
        Permit {
            gate: self.clone(),
            demand: d,
        }
    }

    /// Whether an attempt with `req` would wait now.
    pub fn would_wait(&self, req: &Requirements) -> bool {
        let s = self.lock();
        !s.waiters.is_empty() || !s.fits(demand(req))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut s = self.gate.lock();
        s.release(self.demand);
        s.grant();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpus(n: u32) -> Requirements {
        Requirements {
            cpus: n,
            ..Requirements::default()
        }
    }

    fn gate(cpus: u32) -> Gate {
        let g = Gate::default();
        g.set_totals(Capacity {
            cpus: u64::from(cpus),
            memory_bytes: 1 << 30,
            gpus: 0,
        });
        g
    }

    #[tokio::test]
    async fn waits_for_room_in_arrival_order() {
        let g = gate(2);
        let a = g.acquire(&cpus(1)).await;
        let b = g.acquire(&cpus(1)).await;
        assert!(g.would_wait(&cpus(1)));
        let held = tokio::spawn({
            let g = g.clone();
            async move { g.acquire(&cpus(1)).await }
        });
        tokio::task::yield_now().await;
        // A later small one does not overtake the waiter.
        assert!(g.would_wait(&cpus(0)));
        drop(a);
        let c = tokio::time::timeout(std::time::Duration::from_secs(5), held)
            .await
            .expect("granted once a permit is back")
            .expect("no panic");
        assert!(g.would_wait(&cpus(1)));
        drop((b, c));
        assert!(!g.would_wait(&cpus(2)));
    }

    #[tokio::test]
    async fn an_idle_worker_takes_anything_and_a_cancelled_waiter_takes_nothing() {
        let g = gate(2);
        let big = g.acquire(&cpus(8)).await;
        let one = cpus(1);
        let waiting = g.acquire(&one);
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(20), waiting)
                .await
                .is_err(),
            "waits while the big one runs"
        );
        drop(big);
        assert!(!g.would_wait(&cpus(2)), "the dropped waiter took nothing");
    }
}
