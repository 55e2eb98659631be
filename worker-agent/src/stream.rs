//! One attempt's events on their way to the coordinator, across connections.
//!
//! Producers (the task's pipes, lifecycle events) feed a bounded channel; the streamer gives
//! each event its `seq`, holds it in the attempt's [`Outbox`] (in memory while few, else its
//! on-disk spool) and sends it on the attempt's own QUIC stream of the *current* connection,
//! keeping at most [`MAX_UNACKED`] in flight. Acknowledgements trim the outbox. When it is
//! full the channel is read no further, so the task blocks on its own writes: backpressure,
//! never loss.
//!
//! The link publishes the current connection in a [`ConnWatch`]. When it drops:
//! - `on_disconnect = "kill"`: the attempt ends (its process tree is killed); the coordinator
//!   learns it from the worker's next `Attempts` report, or from the lease. An attempt whose
//!   process has already ended is kept like a `keep_running` one: only its last events are
//!   left, and delivering them beats running the task again.
//! - `on_disconnect = "keep_running"`: the attempt runs on and keeps spooling; on the next
//!   connection the streamer opens a new attempt stream and resends everything not yet
//!   acknowledged (the coordinator stores each (task, epoch, seq) once and acks duplicates).
//!   Disconnected for longer than `lost_after`, the attempt can no longer be reattached (the
//!   coordinator reschedules it then): the streamer gives up and the attempt is stopped.
//!
//! [`Registry`] is what the link reports as running after each registration; the streamer
//! removes its entry *before* giving up, under the registry's lock, so an attempt reported as
//! running is always one that will stream again.

use crate::outbox::Outbox;
use crate::spool::SpoolError;
use crate::wire::{self, FramedRecv};
use drover_protocol::task::{OnDisconnect, TaskSpec};
use drover_protocol::{AttemptDown, AttemptEvent, AttemptUp};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Events sent but not yet acknowledged before the streamer waits for acks.
pub const MAX_UNACKED: u64 = 256;
/// How long to wait before reopening an attempt stream on a connection where it just failed.
const REOPEN_DELAY: Duration = Duration::from_millis(500);

/// The connection attempts stream on; `None` while the worker is not registered.
pub type ConnWatch = watch::Receiver<Option<quinn::Connection>>;

/// The current connection, waiting while the worker is between sessions — for work an attempt
/// does on streams of its own besides its events (e.g. fetching inputs, shipping outputs).
/// `None` once the link is gone for good (the worker is stopping).
pub async fn wait_connection(conns: &mut ConnWatch) -> Option<quinn::Connection> {
    let conn = conns.wait_for(Option::is_some).await.ok()?;
    conn.clone()
}

/// An attempt: (task id, epoch).
pub type AttemptKey = (String, u64);

/// What an attempt does when the link drops, resolved from its spec and the worker's config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub on_disconnect: OnDisconnect,
    /// With `keep_running`: longest time disconnected before the attempt is given up.
    pub lost_after: Duration,
}

impl Policy {
    /// The spec's choice, else the worker's defaults.
    pub fn resolve(spec: &TaskSpec, on_disconnect: OnDisconnect, lost_after_ms: u64) -> Self {
        Policy {
            on_disconnect: spec.on_disconnect.unwrap_or(on_disconnect),
            lost_after: Duration::from_millis(spec.lost_after_ms.unwrap_or(lost_after_ms)),
        }
    }

    pub fn keep_running(&self) -> bool {
        self.on_disconnect == OnDisconnect::KeepRunning
    }
}

/// Longest a prepared attempt waits for its confirm before it is dropped (and reported, so
/// the coordinator assigns it again). The confirm follows as soon as the coordinator's write
/// of the epoch is durable: milliseconds, unless its store is failing.
pub const CONFIRM_WITHIN: Duration = Duration::from_secs(60);

/// Whether an attempt may run: at once (`Assign`: its epoch was durable before it was sent),
/// or once the coordinator confirms it (`Prepare`; see [`Registry::prepare`]).
#[derive(Debug, Clone)]
pub enum Confirmation {
    Given,
    Pending(watch::Receiver<bool>),
}

impl Confirmation {
    /// `true` once confirmed (at once for `Given`); `false` once the attempt was dropped
    /// unconfirmed (its connection ended, or it waited too long: [`stream_events`]).
    pub async fn wait(&self) -> bool {
        match self {
            Confirmation::Given => true,
            Confirmation::Pending(rx) => rx.clone().wait_for(|c| *c).await.is_ok(),
        }
    }
}

#[derive(Debug)]
struct Entry {
    cancel: CancellationToken,
    keep_running: bool,
    /// The process has ended; only events remain to deliver, so even a `kill` attempt is
    /// kept across a disconnect (there is nothing left to run unsupervised).
    finished: bool,
    /// Prepared and not yet confirmed: dropping this (with the entry) tells the attempt.
    confirm: Option<watch::Sender<bool>>,
}

impl Entry {
    /// Kept across a disconnect. Never while unconfirmed: after a coordinator restart its epoch
    /// may be unknown, or given to another attempt.
    fn kept(&self) -> bool {
        self.confirm.is_none() && (self.keep_running || self.finished)
    }
}

/// The attempts this worker runs, shared by the link and the attempts themselves.
#[derive(Debug, Clone, Default)]
pub struct Registry(Arc<Shared>);

#[derive(Debug, Default)]
struct Shared {
    map: Mutex<HashMap<AttemptKey, Entry>>,
    /// Set when an attempt ended without delivering its events (its spool failed): the link
    /// sends a fresh `Attempts` report so the coordinator retries it now, not at the next
    /// reconnect.
    report: tokio::sync::Notify,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<AttemptKey, Entry>> {
        // A panic while holding this lock leaves a plain map behind: still usable.
        self.0.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An assigned attempt: it may run at once.
    pub fn insert(&self, key: AttemptKey, cancel: CancellationToken, policy: Policy) {
        self.add(key, cancel, policy, None);
    }

    /// A prepared attempt: it runs nothing until [`Registry::confirm`]. Dropped, with its
    /// process tree, when the connection ends first ([`Registry::drop_killable`]), whatever
    /// its policy.
    pub fn prepare(
        &self,
        key: AttemptKey,
        cancel: CancellationToken,
        policy: Policy,
    ) -> Confirmation {
        let (tx, rx) = watch::channel(false);
        self.add(key, cancel, policy, Some(tx));
        Confirmation::Pending(rx)
    }

    fn add(
        &self,
        key: AttemptKey,
        cancel: CancellationToken,
        policy: Policy,
        confirm: Option<watch::Sender<bool>>,
    ) {
        let keep_running = policy.keep_running();
        self.lock().insert(
            key,
            Entry {
                cancel,
                keep_running,
                finished: false,
                confirm,
            },
        );
    }

    /// The coordinator confirmed a prepared attempt; `false` if this worker has no such
    /// attempt waiting (dropped meanwhile, or never prepared).
    pub fn confirm(&self, key: &AttemptKey) -> bool {
        match self.lock().get_mut(key).and_then(|e| e.confirm.take()) {
            Some(tx) => {
                let _ = tx.send(true);
                true
            }
            None => false,
        }
    }

    /// Ask an attempt to stop; `false` if this worker does not run it.
    pub fn cancel(&self, key: &AttemptKey) -> bool {
        match self.lock().get(key) {
            Some(e) => {
                e.cancel.cancel();
                true
            }
            None => false,
        }
    }

    /// The attempts to report as running, sorted.
    pub fn running(&self) -> Vec<AttemptKey> {
        let mut keys: Vec<_> = self.lock().keys().cloned().collect();
        keys.sort();
        keys
    }

    /// The connection is gone: stop every `kill` attempt still running, and every attempt
    /// still waiting for its confirm, and forget them. Returns how many.
    pub fn drop_killable(&self) -> usize {
        let mut map = self.lock();
        let before = map.len();
        map.retain(|_, e| {
            if !e.kept() {
                e.cancel.cancel();
            }
            e.kept()
        });
        before - map.len()
    }

    /// The attempt's process has ended: keep it across disconnects from now on, unless it was
    /// already dropped. Returns whether it is kept.
    fn mark_finished(&self, key: &AttemptKey) -> bool {
        match self.lock().get_mut(key) {
            Some(e) => {
                e.finished = true;
                true
            }
            None => false,
        }
    }

    /// Whether the attempt outlives a disconnect (registered, and keep_running or finished).
    fn is_kept(&self, key: &AttemptKey) -> bool {
        self.lock().get(key).is_some_and(Entry::kept)
    }

    pub fn remove(&self, key: &AttemptKey) {
        self.lock().remove(key);
    }

    /// Forget an attempt that ended without delivering its events, and ask the link to tell
    /// the coordinator what still runs.
    pub fn abandon(&self, key: &AttemptKey) {
        self.remove(key);
        self.0.report.notify_one();
    }

    /// Resolves when an attempt was abandoned since the last report.
    pub async fn report_needed(&self) {
        self.0.report.notified().await
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Remove `key` unless a connection is up (checked under the lock the link's report also
    /// takes, after it publishes the connection). `true` if removed.
    fn give_up_if_disconnected(&self, key: &AttemptKey, conns: &ConnWatch) -> bool {
        let mut map = self.lock();
        if conns.borrow().is_some() {
            return false;
        }
        map.remove(key);
        true
    }
}

/// How an attempt's stream ended.
#[derive(Debug)]
pub enum StreamEnd {
    /// Every event was acknowledged after the producers finished.
    Done,
    /// The coordinator refused the attempt: it is not current any more.
    Fenced(String),
    /// The link dropped and the policy is `kill`.
    Disconnected,
    /// `keep_running`, but disconnected for longer than `lost_after`.
    GaveUp(Duration),
    /// The spool failed (disk full, I/O error): the attempt cannot keep its events.
    Spool(SpoolError),
    /// Prepared, and dropped before its confirm came (see [`Registry::prepare`]).
    Unconfirmed,
}

impl StreamEnd {
    pub fn is_done(&self) -> bool {
        matches!(self, StreamEnd::Done)
    }
}

impl std::fmt::Display for StreamEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StreamEnd::Done => f.write_str("every event acknowledged"),
            StreamEnd::Fenced(r) => write!(f, "fenced by the coordinator: {r}"),
            StreamEnd::Disconnected => {
                f.write_str("the link to the coordinator dropped (on_disconnect = kill)")
            }
            StreamEnd::GaveUp(d) => write!(
                f,
                "disconnected for longer than lost_after ({} ms); the coordinator reschedules it",
                d.as_millis()
            ),
            StreamEnd::Spool(e) => write!(f, "spool failed: {e}"),
            StreamEnd::Unconfirmed => write!(
                f,
                "its assignment was never confirmed (the connection ended first, or no confirm \
                 within {} s); nothing of it ran, and the coordinator assigns it again",
                CONFIRM_WITHIN.as_secs()
            ),
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// An open attempt stream on one connection.
struct Attached {
    conn_id: usize,
    send: quinn::SendStream,
    recv: FramedRecv,
}

async fn open(conn: &quinn::Connection, key: &AttemptKey) -> Option<Attached> {
    let (mut send, recv) = conn.open_bi().await.ok()?;
    let open = AttemptUp::Open {
        task_id: key.0.clone(),
        epoch: key.1,
    };
    wire::send(&mut send, &open).await.ok()?;
    Some(Attached {
        conn_id: conn.stable_id(),
        send,
        recv: FramedRecv::new(recv),
    })
}

/// The next reply on the attached stream; pending forever when detached.
async fn next_reply(
    link: &mut Option<Attached>,
) -> Result<Option<AttemptDown>, crate::wire::WireError> {
    match link {
        Some(a) => a.recv.next::<AttemptDown>().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Stream the events from `rx` through `spool` until they are all acknowledged (or the
/// attempt is fenced, or given up). The spool is removed when this returns, except when the
/// task is aborted (the worker stopping): then the next start discards it.
///
/// Nothing is sent, nor given a `seq`, before the attempt is confirmed: one dropped
/// unconfirmed ends [`StreamEnd::Unconfirmed`] with its events discarded.
pub async fn stream_events(
    key: &AttemptKey,
    outbox: Outbox,
    rx: mpsc::Receiver<(String, String)>,
    conns: ConnWatch,
    policy: Policy,
    registry: &Registry,
    confirmation: &Confirmation,
) -> StreamEnd {
    let mut spool = outbox;
    let confirmed = tokio::time::timeout(CONFIRM_WITHIN, confirmation.wait()).await;
    let end = if confirmed == Ok(true) {
        run(key, &mut spool, rx, conns, policy, registry).await
    } else {
        // Dropping the entry drops its confirm sender: whatever else of the attempt waits for
        // the confirm (the spawn, the task helper) learns now that it never comes.
        registry.remove(key);
        StreamEnd::Unconfirmed
    };
    if let Err(e) = spool.remove() {
        tracing::warn!(task = %key.0, epoch = key.1, error = %e, "cannot remove the attempt's spool");
    }
    end
}

async fn run(
    key: &AttemptKey,
    spool: &mut Outbox,
    mut rx: mpsc::Receiver<(String, String)>,
    mut conns: ConnWatch,
    policy: Policy,
    registry: &Registry,
) -> StreamEnd {
    let mut link: Option<Attached> = None;
    let mut producing = true;
    // When the attempt last lost its stream (or started without one).
    let mut detached_since: Option<Instant> = None;
    // A connection where opening or using the attempt stream just failed, and when to retry.
    let mut failed_on: Option<(usize, Instant)> = None;
    let mut conns_open = true;
    loop {
        if !producing && spool.all_acked() {
            if let Some(mut a) = link.take() {
                let _ = a.send.finish();
            }
            return StreamEnd::Done;
        }
        if link.is_none() {
            let current = conns.borrow().clone();
            if let Some(conn) = current {
                let blocked = failed_on
                    .is_some_and(|(id, until)| id == conn.stable_id() && Instant::now() < until);
                if !blocked {
                    match open(&conn, key).await {
                        Some(a) => {
                            if let Err(e) = spool.rewind() {
                                return StreamEnd::Spool(e);
                            }
                            if detached_since.take().is_some() {
                                tracing::info!(task = %key.0, epoch = key.1, spool_bytes = spool.bytes(), "attempt reattached; resending what was not acknowledged");
                            }
                            link = Some(a);
                            failed_on = None;
                        }
                        None => failed_on = Some((conn.stable_id(), Instant::now() + REOPEN_DELAY)),
                    }
                }
            }
            if link.is_none() {
                if !registry.is_kept(key) {
                    return StreamEnd::Disconnected;
                }
                detached_since.get_or_insert_with(Instant::now);
            }
        }
        // Send what may be sent now.
        if let Some(a) = &mut link {
            while spool.has_unsent() && spool.in_flight() < MAX_UNACKED {
                let ev = match spool.next_unsent() {
                    Ok(Some(ev)) => ev,
                    Ok(None) => break,
                    Err(e) => return StreamEnd::Spool(e),
                };
                if wire::send(&mut a.send, &AttemptUp::Event(ev))
                    .await
                    .is_err()
                {
                    failed_on = Some((a.conn_id, Instant::now() + REOPEN_DELAY));
                    link = None;
                    break;
                }
            }
            if link.is_none() {
                continue;
            }
        }
        // Only while no connection is up: with one, the stream is being reopened.
        let give_up_at = match detached_since {
            Some(since) if link.is_none() && conns.borrow().is_none() => {
                Some(since + policy.lost_after)
            }
            _ => None,
        };
        let retry_at = match (&link, failed_on) {
            (None, Some((_, until))) => Some(until),
            _ => None,
        };
        tokio::select! {
            item = rx.recv(), if producing && !spool.is_full() => match item {
                Some((kind, payload)) => {
                    let ev = AttemptEvent { seq: spool.next_seq(), ts_ms: now_ms(), kind, payload };
                    if let Err(e) = spool.append(ev) {
                        return StreamEnd::Spool(e);
                    }
                }
                None => {
                    producing = false;
                    registry.mark_finished(key);
                }
            },
            reply = next_reply(&mut link) => match reply {
                Ok(Some(AttemptDown::Ack { seq })) => {
                    // The worker's view of "acknowledged", for fault-injection checkers
                    // (DROVER_LOG=drover_worker::acks=debug); off by default.
                    tracing::debug!(target: "drover_worker::acks", task = %key.0, epoch = key.1, seq, "acked");
                    if let Err(e) = spool.ack(seq) {
                        return StreamEnd::Spool(e);
                    }
                }
                Ok(Some(AttemptDown::Fenced { reason })) => return StreamEnd::Fenced(reason),
                // Anything else (the inputs transfer's answers belong on their own stream) is a
                // broken stream: drop it and reopen, as after a disconnect.
                Ok(Some(_)) | Ok(None) | Err(_) => {
                    let id = link.as_ref().map_or(0, |a| a.conn_id);
                    failed_on = Some((id, Instant::now() + REOPEN_DELAY));
                    link = None;
                    detached_since.get_or_insert_with(Instant::now);
                }
            },
            changed = conns.changed(), if conns_open => {
                if changed.is_err() {
                    // The link is gone for good (the worker is stopping).
                    conns_open = false;
                    if !registry.is_kept(key) {
                        return StreamEnd::Disconnected;
                    }
                }
                let current = conns.borrow().as_ref().map(|c| c.stable_id());
                if link.as_ref().is_some_and(|a| Some(a.conn_id) != current) {
                    link = None;
                    detached_since.get_or_insert_with(Instant::now);
                }
            },
            _ = sleep_until_opt(give_up_at) => {
                if registry.give_up_if_disconnected(key, &conns) {
                    return StreamEnd::GaveUp(policy.lost_after);
                }
            },
            _ = sleep_until_opt(retry_at) => {},
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(on: OnDisconnect) -> Policy {
        Policy {
            on_disconnect: on,
            lost_after: Duration::from_secs(1),
        }
    }

    #[test]
    fn spec_choice_beats_the_worker_default() {
        let mut spec: TaskSpec =
            serde_json::from_str(r#"{"name":"t","command":["true"]}"#).expect("spec");
        let p = Policy::resolve(&spec, OnDisconnect::KeepRunning, 5_000);
        assert_eq!(
            (p.keep_running(), p.lost_after),
            (true, Duration::from_secs(5))
        );
        spec.on_disconnect = Some(OnDisconnect::Kill);
        spec.lost_after_ms = Some(250);
        let p = Policy::resolve(&spec, OnDisconnect::KeepRunning, 5_000);
        assert_eq!(
            (p.keep_running(), p.lost_after),
            (false, Duration::from_millis(250))
        );
    }

    #[test]
    fn a_disconnect_drops_running_kill_attempts_only() {
        let r = Registry::default();
        let (kill, keep, done) = (
            ("a".to_owned(), 1),
            ("b".to_owned(), 1),
            ("c".to_owned(), 2),
        );
        let tokens: Vec<CancellationToken> = (0..3).map(|_| CancellationToken::new()).collect();
        r.insert(kill.clone(), tokens[0].clone(), policy(OnDisconnect::Kill));
        r.insert(
            keep.clone(),
            tokens[1].clone(),
            policy(OnDisconnect::KeepRunning),
        );
        r.insert(done.clone(), tokens[2].clone(), policy(OnDisconnect::Kill));
        assert!(r.mark_finished(&done));
        assert_eq!(r.drop_killable(), 1);
        assert!(tokens[0].is_cancelled() && !tokens[1].is_cancelled() && !tokens[2].is_cancelled());
        assert_eq!(r.running(), [keep.clone(), done.clone()]);
        assert!(!r.is_kept(&kill) && r.is_kept(&keep) && r.is_kept(&done));
        assert!(!r.mark_finished(&kill), "a dropped attempt stays dropped");
        assert!(r.cancel(&keep) && tokens[1].is_cancelled());
        assert!(!r.cancel(&kill));
    }

    #[test]
    fn giving_up_without_a_connection_removes_the_attempt_from_the_report() {
        let r = Registry::default();
        let key = ("a".to_owned(), 1);
        r.insert(
            key.clone(),
            CancellationToken::new(),
            policy(OnDisconnect::KeepRunning),
        );
        let (tx, rx) = watch::channel(None::<quinn::Connection>);
        assert!(r.give_up_if_disconnected(&key, &rx));
        assert!(r.is_empty(), "given up: not reported as running any more");
        drop(tx);
    }

    #[tokio::test]
    async fn a_prepared_attempt_runs_once_confirmed_and_is_dropped_by_a_disconnect_before() {
        let r = Registry::default();
        let (confirmed, dropped) = (("a".to_owned(), 1), ("b".to_owned(), 1));
        let tokens: Vec<CancellationToken> = (0..2).map(|_| CancellationToken::new()).collect();
        let keep = policy(OnDisconnect::KeepRunning);
        let c = r.prepare(confirmed.clone(), tokens[0].clone(), keep);
        let d = r.prepare(dropped.clone(), tokens[1].clone(), keep);
        assert!(
            !r.is_kept(&confirmed),
            "unconfirmed: not kept across a disconnect"
        );
        let pending = tokio::time::timeout(Duration::from_millis(20), c.wait());
        assert!(pending.await.is_err(), "no answer before the confirm");
        assert!(r.confirm(&confirmed));
        assert!(!r.confirm(&confirmed), "confirmed once");
        assert!(c.wait().await);
        assert!(
            r.is_kept(&confirmed),
            "confirmed: its keep_running policy holds"
        );
        // The connection ends with `dropped` still unconfirmed: it goes, keep_running or not.
        assert_eq!(r.drop_killable(), 1);
        assert!(tokens[1].is_cancelled() && !tokens[0].is_cancelled());
        assert!(!d.wait().await, "dropped unconfirmed");
        assert_eq!(r.running(), [confirmed]);
        assert!(!r.confirm(&dropped), "a late confirm finds nothing");
        assert!(
            Confirmation::Given.wait().await,
            "an assigned attempt needs no confirm"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_attempt_never_confirmed_streams_nothing_and_leaves_no_spool() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spool = dir.path().join("a-1");
        let r = Registry::default();
        let key = ("a".to_owned(), 1);
        let confirmation = r.prepare(
            key.clone(),
            CancellationToken::new(),
            policy(OnDisconnect::KeepRunning),
        );
        // On disk from the first event (no memory allowance), as a worker with
        // `spool_memory_bytes = 0` keeps it.
        let outbox = Outbox::new(&spool, 1 << 20, 0).expect("outbox");
        assert!(spool.exists());
        let (tx, rx) = mpsc::channel(4);
        tx.send(("started".into(), "{}".into()))
            .await
            .expect("send");
        let (_conn_tx, conns) = watch::channel(None::<quinn::Connection>);
        let started = Instant::now();
        let end = stream_events(
            &key,
            outbox,
            rx,
            conns,
            policy(OnDisconnect::KeepRunning),
            &r,
            &confirmation,
        )
        .await;
        assert!(matches!(end, StreamEnd::Unconfirmed), "{end}");
        assert_eq!(
            started.elapsed(),
            CONFIRM_WITHIN,
            "it waited for the confirm"
        );
        assert!(!spool.exists(), "its spool is removed");
        assert!(r.is_empty(), "not reported as running any more");
        assert!(tx.is_closed(), "its producers learn it is gone");
    }

    #[tokio::test]
    async fn waiting_for_a_connection_ends_when_the_link_is_gone() {
        let (tx, mut rx) = watch::channel(None::<quinn::Connection>);
        let wait = tokio::spawn(async move { wait_connection(&mut rx).await });
        drop(tx);
        assert!(wait.await.expect("join").is_none());
    }
}
