//! The queue of messages from the core to one worker's connection task (assignments,
//! cancels): bounded, single consumer, never blocking the core.
//!
//! A `tokio::sync::mpsc` channel would do, but every worker has one for its connection's life
//! and the messages are rare: a bounded tokio channel keeps a cache-padded channel state and a
//! 32-slot block from the start, about 1 KB per connected worker. This queue is one small
//! allocation until something is queued (a `VecDeque` and a `Notify` behind an `Arc`).

use super::core::Outbound;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::Notify;

#[derive(Debug)]
struct Shared {
    queue: Mutex<VecDeque<Outbound>>,
    ready: Notify,
    /// The receiving connection task is gone.
    closed: AtomicBool,
    bound: usize,
}

impl Shared {
    fn queue(&self) -> MutexGuard<'_, VecDeque<Outbound>> {
        // A panic while holding the lock leaves a queue that is still consistent.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The core's end.
#[derive(Debug, Clone)]
pub struct OutboundTx(Arc<Shared>);

/// The connection task's end. Dropping it closes the queue and discards what is in it.
#[derive(Debug)]
pub struct OutboundRx(Arc<Shared>);

/// A queue holding at most `bound` messages.
pub fn queue(bound: usize) -> (OutboundTx, OutboundRx) {
    let shared = Arc::new(Shared {
        queue: Mutex::new(VecDeque::new()),
        ready: Notify::new(),
        closed: AtomicBool::new(false),
        bound,
    });
    (OutboundTx(shared.clone()), OutboundRx(shared))
}

impl OutboundTx {
    /// Queue `msg`; hands it back when the queue is full or its receiver is gone.
    pub fn try_send(&self, msg: Outbound) -> Result<(), Outbound> {
        if self.0.closed.load(Ordering::Acquire) {
            return Err(msg);
        }
        {
            let mut queue = self.0.queue();
            if queue.len() >= self.0.bound {
                return Err(msg);
            }
            queue.push_back(msg);
        }
        // Stores a permit when the receiver is not waiting, so nothing is missed.
        self.0.ready.notify_one();
        Ok(())
    }
}

impl OutboundRx {
    /// The next message, in order. Cancel-safe: a message is taken only when it is returned.
    /// Never ends on its own (the sender going away just means nothing more comes).
    pub async fn recv(&mut self) -> Outbound {
        loop {
            if let Some(msg) = self.0.queue().pop_front() {
                return msg;
            }
            self.0.ready.notified().await;
        }
    }
}

impl Drop for OutboundRx {
    fn drop(&mut self) {
        self.0.closed.store(true, Ordering::Release);
        self.0.queue().clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_protocol::CoordinatorMessage;

    fn msg(seq: u64) -> Outbound {
        Outbound {
            msg: Box::new(CoordinatorMessage::HeartbeatAck { seq }),
            after: None,
        }
    }

    fn seq(out: &Outbound) -> u64 {
        match *out.msg {
            CoordinatorMessage::HeartbeatAck { seq } => seq,
            ref other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn in_order_bounded_and_closed_when_the_receiver_goes() {
        let (tx, mut rx) = queue(2);
        assert!(tx.try_send(msg(1)).is_ok());
        assert!(tx.try_send(msg(2)).is_ok());
        assert_eq!(seq(&tx.try_send(msg(3)).unwrap_err()), 3, "full");
        assert_eq!(seq(&rx.recv().await), 1);
        assert!(tx.try_send(msg(4)).is_ok());
        assert_eq!(seq(&rx.recv().await), 2);
        assert_eq!(seq(&rx.recv().await), 4);
        drop(rx);
        assert!(tx.try_send(msg(5)).is_err(), "closed");
    }

    #[tokio::test]
    async fn wakes_a_waiting_receiver_and_survives_cancellation() {
        let (tx, mut rx) = queue(8);
        // A receive cancelled before anything arrives loses nothing.
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(10), rx.recv())
                .await
                .is_err()
        );
        let waiter = tokio::spawn(async move { seq(&rx.recv().await) });
        tokio::task::yield_now().await;
        assert!(tx.try_send(msg(7)).is_ok());
        assert_eq!(waiter.await.expect("receiver task"), 7);
    }
}
