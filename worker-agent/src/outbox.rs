//! One attempt's unacknowledged events, between the producers and the coordinator's ack: kept
//! in memory while they are few, and in the attempt's on-disk [`Spool`] once they are not.
//!
//! Why two places: almost every attempt's events are acknowledged within milliseconds, a few
//! hundred bytes at a time, and for those a spool directory and segment file per attempt
//! cost more than the rest of the attempt's bookkeeping (creating and deleting two inodes per
//! attempt; on ext4 without a journal, an inode allocation scans past every inode freed in the
//! last minute: 0.7 ms each at a few hundred attempts a second). The spool is what bounds the
//! worker's memory when a task floods output or the link is down, and there it still is: once
//! the events held pass `memory_bytes` (a worker setting, `spool_memory_bytes`), every one of
//! them is written to a new spool and the outbox stays on disk for the rest of the attempt.
//!
//! Same guarantees either way: events keep their seqs and order; an event leaves only when an
//! ack covers it; after a reconnect everything unacknowledged is sent again ([`Outbox::rewind`]);
//! the bound ([`Outbox::is_full`]) is the spool's. Neither place survives a worker crash as far
//! as the coordinator is concerned: the spool is not fsynced, and a restarted worker discards
//! the spools of attempts that died with it (their tasks are rescheduled).

use crate::spool::{encoded_len, Spool, SpoolError};
use drover_protocol::AttemptEvent;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};

/// Events held in memory before an attempt's outbox moves to its spool, bytes (as encoded in a
/// spool): hundreds of ordinary events, or a few stdout chunks.
pub const DEFAULT_MEMORY_BYTES: u64 = 256 << 10;

/// An attempt's outbox; single owner (the attempt's streamer).
#[derive(Debug)]
pub struct Outbox {
    /// Where the spool goes when it is needed.
    dir: PathBuf,
    max_bytes: u64,
    memory_bytes: u64,
    held: Held,
}

#[derive(Debug)]
enum Held {
    Memory(Memory),
    Disk(Spool),
}

#[derive(Debug, Default)]
struct Memory {
    /// Unacknowledged events, the first with seq `acked_below`.
    events: VecDeque<AttemptEvent>,
    /// Their size as spool records.
    bytes: u64,
    acked_below: u64,
    /// The seq of the next event to send.
    send: u64,
}

impl Memory {
    fn next_seq(&self) -> u64 {
        self.acked_below + self.events.len() as u64
    }
}

impl Outbox {
    /// An empty outbox whose spool, if it comes to one, is `dir` (removed first if it exists),
    /// bounded by `max_bytes`; up to `memory_bytes` of events are held in memory before that
    /// (0: on disk from the first event).
    pub fn new(dir: &Path, max_bytes: u64, memory_bytes: u64) -> Result<Self, SpoolError> {
        let memory_bytes = memory_bytes.min(max_bytes);
        let held = if memory_bytes == 0 {
            Held::Disk(Spool::create(dir, max_bytes)?)
        } else {
            if dir.exists() {
                // A spool of an earlier attempt with this key would be sent after this one.
                std::fs::remove_dir_all(dir).map_err(|source| SpoolError::Io {
                    path: dir.to_owned(),
                    source,
                })?;
            }
            Held::Memory(Memory::default())
        };
        Ok(Outbox {
            dir: dir.to_owned(),
            max_bytes,
            memory_bytes,
            held,
        })
    }

    /// Whether the events are in the on-disk spool.
    pub fn on_disk(&self) -> bool {
        matches!(self.held, Held::Disk(_))
    }

    /// The seq the next appended event must carry.
    pub fn next_seq(&self) -> u64 {
        match &self.held {
            Held::Memory(m) => m.next_seq(),
            Held::Disk(s) => s.next_seq(),
        }
    }

    /// Whether the bound is reached: stop producing until acks trim it.
    pub fn is_full(&self) -> bool {
        self.bytes() >= self.max_bytes
    }

    /// Bytes held (as spool records; on disk, the segments' sizes).
    pub fn bytes(&self) -> u64 {
        match &self.held {
            Held::Memory(m) => m.bytes,
            Held::Disk(s) => s.bytes(),
        }
    }

    /// Whether every appended event is acknowledged.
    pub fn all_acked(&self) -> bool {
        match &self.held {
            Held::Memory(m) => m.events.is_empty(),
            Held::Disk(s) => s.all_acked(),
        }
    }

    /// Events sent (since the last rewind) and not yet acknowledged.
    pub fn in_flight(&self) -> u64 {
        match &self.held {
            Held::Memory(m) => m.send - m.acked_below,
            Held::Disk(s) => s.in_flight(),
        }
    }

    /// Whether an appended event has not been sent since the last rewind.
    pub fn has_unsent(&self) -> bool {
        match &self.held {
            Held::Memory(m) => m.send < m.next_seq(),
            Held::Disk(s) => s.has_unsent(),
        }
    }

    /// Hold `ev` (its seq must be [`Self::next_seq`]), moving everything to the spool first
    /// when memory would pass its bound.
    pub fn append(&mut self, ev: AttemptEvent) -> Result<(), SpoolError> {
        let len = encoded_len(&ev)?;
        let memory = match &mut self.held {
            Held::Disk(s) => return s.append(&ev),
            Held::Memory(m) => m,
        };
        if ev.seq != memory.next_seq() {
            return Err(SpoolError::OutOfOrder {
                got: ev.seq,
                expected: memory.next_seq(),
            });
        }
        if memory.bytes + len <= self.memory_bytes {
            memory.bytes += len;
            memory.events.push_back(ev);
            return Ok(());
        }
        let mut spool = Spool::create_from(&self.dir, self.max_bytes, memory.acked_below)?;
        for held in &memory.events {
            spool.append(held)?;
        }
        spool.append(&ev)?;
        // Already sent ones stay sent: skip past them on disk as the send cursor did here.
        while spool.in_flight() < memory.send - memory.acked_below {
            if spool.next_unsent()?.is_none() {
                break;
            }
        }
        tracing::debug!(dir = %self.dir.display(), bytes = memory.bytes + len, "attempt events moved to the on-disk spool");
        self.held = Held::Disk(spool);
        Ok(())
    }

    /// The next event to send, moving the send cursor past it; `None` when all are sent.
    pub fn next_unsent(&mut self) -> Result<Option<AttemptEvent>, SpoolError> {
        match &mut self.held {
            Held::Memory(m) => {
                let i = (m.send - m.acked_below) as usize;
                let ev = m.events.get(i).cloned();
                if ev.is_some() {
                    m.send += 1;
                }
                Ok(ev)
            }
            Held::Disk(s) => s.next_unsent(),
        }
    }

    /// Every event up to and including `seq` is acknowledged: let them go.
    pub fn ack(&mut self, seq: u64) -> Result<(), SpoolError> {
        match &mut self.held {
            Held::Memory(m) => {
                let below = (seq + 1).min(m.next_seq());
                while m.acked_below < below {
                    if let Some(ev) = m.events.pop_front() {
                        m.bytes -= encoded_len(&ev)?;
                    }
                    m.acked_below += 1;
                }
                // Acknowledged without being sent since the last rewind (sent on an earlier
                // connection): the cursor skips past them.
                m.send = m.send.max(m.acked_below);
                Ok(())
            }
            Held::Disk(s) => s.ack(seq),
        }
    }

    /// Start sending again from the first unacknowledged event (after a reconnect).
    pub fn rewind(&mut self) -> Result<(), SpoolError> {
        match &mut self.held {
            Held::Memory(m) => {
                m.send = m.acked_below;
                Ok(())
            }
            Held::Disk(s) => s.rewind(),
        }
    }

    /// Let go of everything (the attempt is over): the spool is removed from disk, if there
    /// is one.
    pub fn remove(self) -> Result<(), SpoolError> {
        match self.held {
            Held::Memory(_) => Ok(()),
            Held::Disk(s) => s.remove(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::tests::ev;
    use crate::spool::MIN_SPOOL_BYTES;

    fn drain(o: &mut Outbox) -> Vec<u64> {
        std::iter::from_fn(|| o.next_unsent().unwrap().map(|e| e.seq)).collect()
    }

    #[test]
    fn small_attempts_never_touch_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a");
        let mut o = Outbox::new(&path, MIN_SPOOL_BYTES, DEFAULT_MEMORY_BYTES).unwrap();
        for i in 0..10 {
            o.append(ev(i, "small")).unwrap();
        }
        assert!(matches!(
            o.append(ev(11, "gap")),
            Err(SpoolError::OutOfOrder {
                got: 11,
                expected: 10
            })
        ));
        assert_eq!(drain(&mut o)[..3], [0, 1, 2]);
        assert_eq!(o.in_flight(), 10);
        o.ack(3).unwrap();
        assert_eq!(o.in_flight(), 6);
        o.rewind().unwrap();
        assert_eq!(drain(&mut o), [4, 5, 6, 7, 8, 9]);
        o.ack(100).unwrap();
        o.ack(2).unwrap();
        assert!(o.all_acked() && !o.has_unsent() && o.bytes() == 0);
        assert!(!o.on_disk() && !path.exists());
        o.remove().unwrap();
    }

    #[test]
    fn an_earlier_spool_at_the_same_place_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old");
        let mut old = Spool::create(&path, MIN_SPOOL_BYTES).unwrap();
        old.append(&ev(0, "stale")).unwrap();
        drop(old);
        let o = Outbox::new(&path, MIN_SPOOL_BYTES, DEFAULT_MEMORY_BYTES).unwrap();
        assert!(!path.exists() && o.next_seq() == 0);
    }

    /// Past the memory bound, every unacknowledged event moves to the spool, in order, the
    /// ones already sent still counted as sent; resending after a rewind covers them all.
    #[test]
    fn past_the_memory_bound_everything_moves_to_the_spool() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b");
        let chunk = "x".repeat(1000);
        let mut o = Outbox::new(&path, MIN_SPOOL_BYTES, 8 * 1024).unwrap();
        for i in 0..6 {
            o.append(ev(i, &chunk)).unwrap();
        }
        assert_eq!(drain(&mut o), [0, 1, 2, 3, 4, 5]);
        o.ack(1).unwrap();
        let mut seq = 6;
        while !o.on_disk() {
            o.append(ev(seq, &chunk)).unwrap();
            seq += 1;
        }
        assert!(path.is_dir());
        assert_eq!(o.in_flight(), 4, "2..=5 were sent before the move");
        assert_eq!(drain(&mut o), (6..seq).collect::<Vec<_>>());
        o.rewind().unwrap();
        assert_eq!(drain(&mut o), (2..seq).collect::<Vec<_>>());
        o.append(ev(seq, "after")).unwrap();
        assert_eq!(o.next_unsent().unwrap().unwrap().payload, "after");
        o.ack(seq).unwrap();
        assert!(o.all_acked());
        o.remove().unwrap();
        assert!(!path.exists());
    }

    /// The bound on everything held is the spool's, in memory as on disk.
    #[test]
    fn the_bound_holds_in_memory_and_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let chunk = "y".repeat(16 * 1024);
        for memory in [0, 64 * 1024, MIN_SPOOL_BYTES] {
            let path = dir.path().join(format!("c{memory}"));
            let mut o = Outbox::new(&path, MIN_SPOOL_BYTES, memory).unwrap();
            let mut seq = 0;
            while !o.is_full() {
                o.append(ev(seq, &chunk)).unwrap();
                seq += 1;
            }
            assert!(o.bytes() < MIN_SPOOL_BYTES + 64 * 1024, "{}", o.bytes());
            assert_eq!(drain(&mut o).len() as u64, seq);
            o.ack(seq - 1).unwrap();
            assert!(!o.is_full() && o.all_acked());
        }
    }

    /// With a memory bound of 0 the outbox is the plain spool from the start.
    #[test]
    fn zero_memory_is_the_spool_from_the_first_event() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d");
        let mut o = Outbox::new(&path, MIN_SPOOL_BYTES, 0).unwrap();
        assert!(o.on_disk() && path.is_dir());
        o.append(ev(0, "on disk")).unwrap();
        assert_eq!(drain(&mut o), [0]);
    }
}
