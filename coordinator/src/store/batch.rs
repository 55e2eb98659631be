//! Writes gathered over one step of the core and handed to the writer thread as one command,
//! so they share one transaction and one fsync.
//!
//! Why: the core answers one message with several writes (a submit is the task row, its
//! `submitted` event, then its `assigned` event and epoch). Sent one by one, the writer thread
//! woke on the first and committed it alone, then the rest: two fsyncs in a row on the dispatch
//! path. Each write still gets its own [`Durable`], resolved when the shared commit is.
//!
//! Invariant: the core calls [`Batch::flush`] before it waits for its next message, so nothing
//! gathered waits longer than the step that made it.

use super::{blobs, session, Command, Durable, Store};
use crate::fleet::WorkerRecord;
use tokio::sync::oneshot;

/// Writes waiting for the end of the core's step.
pub struct Batch {
    store: Store,
    pending: Vec<Command>,
}

impl std::fmt::Debug for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch")
            .field("pending", &self.pending.len())
            .finish()
    }
}

impl Batch {
    pub fn new(store: Store) -> Batch {
        Batch {
            store,
            pending: Vec::new(),
        }
    }

    fn push(&mut self, make: impl FnOnce(super::Reply) -> Command) -> Durable {
        let (tx, rx) = oneshot::channel();
        self.pending.push(make(tx));
        rx
    }

    /// [`Store::put_task`], at the end of the step.
    pub fn put_task(&mut self, task: session::NewTask) -> Durable {
        self.push(|r| Command::PutTask(task, r))
    }

    /// [`Store::append_events`], at the end of the step.
    pub fn append_events(&mut self, events: Vec<session::NewEvent>) -> Durable {
        self.push(|r| Command::AppendEvents(events, r))
    }

    /// [`Store::put_task_with_inputs`], at the end of the step.
    pub fn put_task_with_inputs(
        &mut self,
        task: session::NewTask,
        inputs: blobs::InputsRow,
    ) -> Durable {
        self.push(|r| Command::PutTaskWithInputs(task, inputs, r))
    }

    /// [`Store::put_outputs`], at the end of the step.
    pub fn put_outputs(&mut self, row: blobs::OutputsRow) -> Durable {
        self.push(|r| Command::PutOutputs(row, r))
    }

    /// [`Store::put_workers`], at the end of the step.
    pub fn put_workers(&mut self, records: Vec<WorkerRecord>) -> Durable {
        self.push(|r| Command::PutWorkers(records, r))
    }

    /// Hands everything gathered to the writer as one command.
    pub fn flush(&mut self) {
        if !self.pending.is_empty() {
            self.store.send(std::mem::take(&mut self.pending));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(id: &str, n: u64) -> session::NewTask {
        session::NewTask {
            id: id.into(),
            submit_seq: n,
            name: "t".into(),
            spec_json: "{}".into(),
            submitted_ms: 1,
        }
    }

    fn ev(task: &str, pos: u64) -> session::NewEvent {
        session::NewEvent {
            task_id: task.into(),
            pos,
            epoch: 0,
            seq: None,
            ts_ms: 1,
            kind: "submitted".into(),
            payload: "{}".into(),
        }
    }

    /// Nothing reaches the store before the flush; after it, every write is durable, in order
    /// (the events need their task row, written first in the same command).
    #[tokio::test]
    async fn a_step_writes_once_at_its_flush() {
        let dir = tempfile::tempdir().unwrap();
        let (store, thread, _) = Store::open(dir.path()).unwrap();
        let mut batch = Batch::new(store.clone());
        let mut durables = vec![batch.put_task(task("t1", 1))];
        durables.push(batch.append_events(vec![ev("t1", 0)]));
        durables.push(batch.append_events(vec![ev("t1", 1)]));
        assert_eq!(
            store.reader().unwrap().len("t1").unwrap(),
            0,
            "not before the flush"
        );
        batch.flush();
        for d in durables {
            d.await.unwrap().unwrap();
        }
        assert_eq!(store.reader().unwrap().len("t1").unwrap(), 2);
        batch.flush();
        drop((batch, store));
        thread.join();
    }
}
