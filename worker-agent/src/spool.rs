//! The on-disk spool of one attempt's events: every event is written here before it is sent,
//! and stays until the coordinator acknowledges it, so a dropped link (or a coordinator
//! restart) loses nothing and the events are resent after the reconnect.
//!
//! Layout: one directory per attempt (`<work_dir>/spool/<task>-<epoch>/`) holding numbered
//! append-only *segments* (`00000000000000000000.seg`, ...). A segment starts with the
//! 8-byte header [`SEGMENT_MAGIC`] (`DRSPOOL` + format version 1), then records:
//!
//! ```text
//! len   u32 LE   bytes of body (at most MAX_RECORD_BODY)
//! crc   u32 LE   CRC-32 (IEEE) of body
//! body           seq u64 LE | ts_ms u64 LE | kind_len u16 LE | kind (UTF-8) | payload (UTF-8)
//! ```
//!
//! A crash can leave a torn record at the end of the last segment; [`Spool::open`] finds the
//! first record that is short or fails its checksum and cuts the file there. [`decode_record`]
//! is a pure function over bytes with typed errors, so it can be fuzzed: arbitrary input never
//! panics and never allocates more than the record's (bounded) length.
//!
//! Bounds: the spool never grows past [`Spool::is_full`] by more than one record; the caller
//! stops reading the task's pipes while it is full (backpressure), it never drops. Trimming
//! is by whole segments: a segment is deleted once every record in it is acknowledged and it
//! is not the one being written, so at most one segment of acknowledged events stays on disk.
//! Segments roll at an eighth of the bound (64 KiB to 16 MiB).
//!
//! No fsync: the spool protects events from a lost *link*, not from a worker crash (the
//! attempt's processes die with the worker, and the coordinator reschedules it).

use drover_protocol::AttemptEvent;
use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// First bytes of every segment: `DRSPOOL` and the format version.
pub const SEGMENT_MAGIC: [u8; 8] = *b"DRSPOOL\x01";
/// Bytes before each record's body: length and checksum.
pub const RECORD_HEADER: usize = 8;
/// Largest record body accepted (one event, well above the largest the executor makes).
pub const MAX_RECORD_BODY: usize = 1 << 20;
/// The smallest spool bound a worker accepts: a few segments of the largest record.
pub const MIN_SPOOL_BYTES: u64 = 4 << 20;
/// The default bound on one attempt's spool, bytes.
pub const DEFAULT_SPOOL_BYTES: u64 = 64 << 20;

const BODY_FIXED: usize = 8 + 8 + 2;

/// Why bytes are not a valid record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// Fewer bytes than the header or the declared length: a torn write at the end of a file.
    #[error("record truncated: {have} of {need} bytes present")]
    Truncated { have: usize, need: usize },
    #[error("record length {0} exceeds the limit of {MAX_RECORD_BODY} bytes")]
    TooLong(usize),
    #[error("record checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum { stored: u32, computed: u32 },
    #[error("record body malformed: {0}")]
    Malformed(&'static str),
}

/// Why the spool cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("spool segment {} is not a spool segment (bad header); remove the directory", path.display())]
    BadHeader { path: PathBuf },
    #[error("spool segment {} is corrupt at byte {offset}: {error}", path.display())]
    Corrupt {
        path: PathBuf,
        offset: u64,
        error: RecordError,
    },
    #[error("event seq {got} appended out of order (expected {expected})")]
    OutOfOrder { got: u64, expected: u64 },
    #[error("event of {0} bytes is larger than a spool record may be ({MAX_RECORD_BODY})")]
    EventTooLarge(usize),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_owned(),
        source,
    }
}

/// CRC-32 (IEEE 802.3, reflected, as zlib), table-driven.
pub fn crc32(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    let mut c = !0u32;
    for &b in data {
        c = TABLE[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// The bytes `ev` takes as a record (header included); an error if it cannot be one.
pub fn encoded_len(ev: &AttemptEvent) -> Result<u64, SpoolError> {
    let body_len = BODY_FIXED + ev.kind.len() + ev.payload.len();
    if body_len > MAX_RECORD_BODY || ev.kind.len() > u16::MAX as usize {
        return Err(SpoolError::EventTooLarge(body_len));
    }
    Ok((RECORD_HEADER + body_len) as u64)
}

/// Append `ev` as one record to `out`.
pub fn encode_record(ev: &AttemptEvent, out: &mut Vec<u8>) -> Result<(), SpoolError> {
    let body_len = encoded_len(ev)? as usize - RECORD_HEADER;
    let start = out.len();
    out.extend_from_slice(&(body_len as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&ev.seq.to_le_bytes());
    out.extend_from_slice(&ev.ts_ms.to_le_bytes());
    out.extend_from_slice(&(ev.kind.len() as u16).to_le_bytes());
    out.extend_from_slice(ev.kind.as_bytes());
    out.extend_from_slice(ev.payload.as_bytes());
    let crc = crc32(&out[start + RECORD_HEADER..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// Decode the record at the start of `buf`: the event and the bytes it took. `Ok(None)` for
/// an empty buffer (a clean end).
pub fn decode_record(buf: &[u8]) -> Result<Option<(AttemptEvent, usize)>, RecordError> {
    if buf.is_empty() {
        return Ok(None);
    }
    if buf.len() < RECORD_HEADER {
        return Err(RecordError::Truncated {
            have: buf.len(),
            need: RECORD_HEADER,
        });
    }
    let len = u32::from_le_bytes(buf[0..4].try_into().unwrap_or_default()) as usize;
    if len > MAX_RECORD_BODY {
        return Err(RecordError::TooLong(len));
    }
    let need = RECORD_HEADER + len;
    if buf.len() < need {
        return Err(RecordError::Truncated {
            have: buf.len(),
            need,
        });
    }
    let stored = u32::from_le_bytes(buf[4..8].try_into().unwrap_or_default());
    let body = &buf[RECORD_HEADER..need];
    let computed = crc32(body);
    if stored != computed {
        return Err(RecordError::Checksum { stored, computed });
    }
    Ok(Some((decode_body(body)?, need)))
}

fn decode_body(body: &[u8]) -> Result<AttemptEvent, RecordError> {
    if body.len() < BODY_FIXED {
        return Err(RecordError::Malformed("body shorter than its fixed fields"));
    }
    let u64_at = |i: usize| u64::from_le_bytes(body[i..i + 8].try_into().unwrap_or_default());
    let seq = u64_at(0);
    let ts_ms = u64_at(8);
    let kind_len = u16::from_le_bytes([body[16], body[17]]) as usize;
    let rest = &body[BODY_FIXED..];
    if kind_len > rest.len() {
        return Err(RecordError::Malformed("kind length runs past the body"));
    }
    let kind = std::str::from_utf8(&rest[..kind_len])
        .map_err(|_| RecordError::Malformed("kind is not UTF-8"))?;
    let payload = std::str::from_utf8(&rest[kind_len..])
        .map_err(|_| RecordError::Malformed("payload is not UTF-8"))?;
    Ok(AttemptEvent {
        seq,
        ts_ms,
        kind: kind.to_owned(),
        payload: payload.to_owned(),
    })
}

/// What decoding a whole segment's bytes found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentScan {
    /// The records' seqs in file order.
    pub seqs: Vec<u64>,
    /// Bytes up to the end of the last good record (the header included).
    pub valid_len: usize,
    /// Why decoding stopped before the end, if it did.
    pub stopped: Option<RecordError>,
}

/// Decode every record of a segment (header included) until the end or the first bad one.
pub fn scan_segment(bytes: &[u8]) -> Option<SegmentScan> {
    if bytes.len() < SEGMENT_MAGIC.len() || bytes[..SEGMENT_MAGIC.len()] != SEGMENT_MAGIC {
        return None;
    }
    let mut off = SEGMENT_MAGIC.len();
    let mut seqs = Vec::new();
    loop {
        match decode_record(&bytes[off..]) {
            Ok(None) => {
                return Some(SegmentScan {
                    seqs,
                    valid_len: off,
                    stopped: None,
                })
            }
            Ok(Some((ev, n))) => {
                seqs.push(ev.seq);
                off += n;
            }
            Err(e) => {
                return Some(SegmentScan {
                    seqs,
                    valid_len: off,
                    stopped: Some(e),
                })
            }
        }
    }
}

#[derive(Debug)]
struct Segment {
    id: u64,
    path: PathBuf,
    /// Seq of its first record; `None` while empty.
    first_seq: Option<u64>,
    len: u64,
}

/// Where the next event to send is.
#[derive(Debug, Clone, Copy)]
struct Cursor {
    segment: u64,
    offset: u64,
    seq: u64,
}

/// What [`Spool::open`] found on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Events kept.
    pub events: u64,
    /// Bytes cut from a torn or corrupt tail, and why.
    pub cut: Option<(u64, RecordError)>,
}

/// One attempt's spool. Single owner: the attempt's streamer appends, reads for sending, and
/// trims on acknowledgement.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    segments: VecDeque<Segment>,
    writer: File,
    /// Bytes of every segment on disk.
    bytes: u64,
    max_bytes: u64,
    segment_target: u64,
    /// Seq the next append must carry.
    next_seq: u64,
    /// Every seq below this is acknowledged.
    acked_below: u64,
    send: Cursor,
    /// Open handle of the segment being read, by id.
    reader: Option<(u64, File)>,
    buf: Vec<u8>,
}

fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}.seg"))
}

fn segment_target(max_bytes: u64) -> u64 {
    (max_bytes / 8).clamp(64 << 10, 16 << 20)
}

impl Spool {
    /// A new, empty spool in `dir` (anything there before is removed).
    pub fn create(dir: &Path, max_bytes: u64) -> Result<Self, SpoolError> {
        Self::create_from(dir, max_bytes, 0)
    }

    /// [`Spool::create`] for events from seq `first` on (every seq below counts as
    /// acknowledged): where events held elsewhere so far move to.
    pub fn create_from(dir: &Path, max_bytes: u64, first: u64) -> Result<Self, SpoolError> {
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(io_err(dir))?;
        }
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let (segment, writer) = new_segment(dir, 0)?;
        let mut segments = VecDeque::new();
        segments.push_back(segment);
        Ok(Self {
            dir: dir.to_owned(),
            segments,
            writer,
            bytes: SEGMENT_MAGIC.len() as u64,
            max_bytes,
            segment_target: segment_target(max_bytes),
            next_seq: first,
            acked_below: first,
            send: Cursor {
                segment: 0,
                offset: SEGMENT_MAGIC.len() as u64,
                seq: first,
            },
            reader: None,
            buf: Vec::new(),
        })
    }

    /// Reopen the spool in `dir` after a restart: every segment is checked, a torn or corrupt
    /// tail is cut (and reported), and sending starts over from the first event kept. Records
    /// must be contiguous in seq; a corrupt record in a middle segment drops what follows it.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<(Self, Recovery), SpoolError> {
        let mut ids: Vec<u64> = std::fs::read_dir(dir)
            .map_err(io_err(dir))?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_suffix(".seg")?.parse().ok()
            })
            .collect();
        ids.sort_unstable();
        let mut segments = VecDeque::new();
        let mut cut = None;
        let mut events = 0u64;
        let mut expect: Option<u64> = None;
        for id in ids {
            let path = segment_path(dir, id);
            if cut.is_some() {
                // Everything after a cut would leave a gap in seq: drop it.
                std::fs::remove_file(&path).map_err(io_err(&path))?;
                continue;
            }
            let bytes = std::fs::read(&path).map_err(io_err(&path))?;
            let Some(mut scan) = scan_segment(&bytes) else {
                return Err(SpoolError::BadHeader { path });
            };
            // A seq that does not follow on is as bad as a broken checksum.
            if let Some(pos) = scan
                .seqs
                .iter()
                .enumerate()
                .position(|(i, s)| *s != expect.unwrap_or(scan.seqs[0]) + i as u64)
            {
                scan.seqs.truncate(pos);
                let mut off = SEGMENT_MAGIC.len();
                for _ in 0..pos {
                    off += decode_record(&bytes[off..])
                        .ok()
                        .flatten()
                        .map_or(0, |(_, n)| n);
                }
                scan.valid_len = off;
                scan.stopped = Some(RecordError::Malformed("seq does not follow on"));
            }
            if let Some(err) = scan.stopped.clone() {
                let lost = bytes.len() as u64 - scan.valid_len as u64;
                let f = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(io_err(&path))?;
                f.set_len(scan.valid_len as u64).map_err(io_err(&path))?;
                cut = Some((lost, err));
            }
            if let Some(last) = scan.seqs.last() {
                expect = Some(last + 1);
            }
            events += scan.seqs.len() as u64;
            segments.push_back(Segment {
                id,
                path,
                first_seq: scan.seqs.first().copied(),
                len: scan.valid_len as u64,
            });
        }
        let Some(tail) = segments.back() else {
            return Ok((Self::create(dir, max_bytes)?, Recovery { events: 0, cut }));
        };
        let writer = OpenOptions::new()
            .append(true)
            .open(&tail.path)
            .map_err(io_err(&tail.path))?;
        let first = segments.iter().find_map(|s| s.first_seq).unwrap_or(0);
        let head = segments.front().map_or(0, |s| s.id);
        let mut spool = Self {
            dir: dir.to_owned(),
            bytes: segments.iter().map(|s| s.len).sum(),
            segments,
            writer,
            max_bytes,
            segment_target: segment_target(max_bytes),
            next_seq: expect.unwrap_or(0),
            acked_below: first,
            send: Cursor {
                segment: head,
                offset: SEGMENT_MAGIC.len() as u64,
                seq: first,
            },
            reader: None,
            buf: Vec::new(),
        };
        spool.rewind()?;
        Ok((spool, Recovery { events, cut }))
    }

    /// The seq the next appended event must carry.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Whether the spool holds its bound (or more): stop producing until acks trim it.
    pub fn is_full(&self) -> bool {
        self.bytes >= self.max_bytes
    }

    /// Bytes on disk.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Whether every appended event is acknowledged.
    pub fn all_acked(&self) -> bool {
        self.acked_below == self.next_seq
    }

    /// Events sent (since the last rewind) and not yet acknowledged.
    pub fn in_flight(&self) -> u64 {
        self.send.seq.saturating_sub(self.acked_below)
    }

    /// Whether an appended event has not been sent since the last rewind.
    pub fn has_unsent(&self) -> bool {
        self.send.seq < self.next_seq
    }

    /// Write `ev` (its seq must be [`Self::next_seq`]) at the end of the spool.
    pub fn append(&mut self, ev: &AttemptEvent) -> Result<(), SpoolError> {
        if ev.seq != self.next_seq {
            return Err(SpoolError::OutOfOrder {
                got: ev.seq,
                expected: self.next_seq,
            });
        }
        self.buf.clear();
        encode_record(ev, &mut self.buf)?;
        if self.tail().len >= self.segment_target {
            self.roll()?;
        }
        let path = self.tail().path.clone();
        self.writer.write_all(&self.buf).map_err(io_err(&path))?;
        let n = self.buf.len() as u64;
        let tail = self.tail_mut();
        tail.first_seq.get_or_insert(ev.seq);
        tail.len += n;
        self.bytes += n;
        self.next_seq += 1;
        Ok(())
    }

    /// The next event to send, moving the send cursor past it; `None` when all are sent.
    pub fn next_unsent(&mut self) -> Result<Option<AttemptEvent>, SpoolError> {
        if !self.has_unsent() {
            return Ok(None);
        }
        loop {
            let Some(seg) = self.segments.iter().find(|s| s.id == self.send.segment) else {
                return Ok(None);
            };
            if self.send.offset >= seg.len {
                // The end of this segment: on to the next one.
                match self.segments.iter().find(|s| s.id > self.send.segment) {
                    Some(next) => {
                        self.send.segment = next.id;
                        self.send.offset = SEGMENT_MAGIC.len() as u64;
                        continue;
                    }
                    None => return Ok(None),
                }
            }
            let (id, path, len) = (seg.id, seg.path.clone(), seg.len);
            let ev = self.read_at(id, &path, self.send.offset, len)?;
            self.send.offset +=
                (RECORD_HEADER + BODY_FIXED + ev.kind.len() + ev.payload.len()) as u64;
            self.send.seq = ev.seq + 1;
            return Ok(Some(ev));
        }
    }

    fn read_at(
        &mut self,
        id: u64,
        path: &Path,
        offset: u64,
        len: u64,
    ) -> Result<AttemptEvent, SpoolError> {
        if self.reader.as_ref().is_none_or(|(rid, _)| *rid != id) {
            let f = File::open(path).map_err(io_err(path))?;
            self.reader = Some((id, f));
        }
        let Some((_, file)) = &self.reader else {
            unreachable!("opened above")
        };
        let mut header = [0u8; RECORD_HEADER];
        file.read_exact_at(&mut header, offset)
            .map_err(io_err(path))?;
        let body_len = (u32::from_le_bytes(header[0..4].try_into().unwrap_or_default()) as usize)
            .min(MAX_RECORD_BODY)
            .min(len.saturating_sub(offset + RECORD_HEADER as u64) as usize);
        let mut rec = vec![0u8; RECORD_HEADER + body_len];
        rec[..RECORD_HEADER].copy_from_slice(&header);
        file.read_exact_at(&mut rec[RECORD_HEADER..], offset + RECORD_HEADER as u64)
            .map_err(io_err(path))?;
        match decode_record(&rec) {
            Ok(Some((ev, _))) => Ok(ev),
            Ok(None) => unreachable!("a record is never empty"),
            Err(error) => Err(SpoolError::Corrupt {
                path: path.to_owned(),
                offset,
                error,
            }),
        }
    }

    /// Every event up to and including `seq` is acknowledged: trim whole segments.
    pub fn ack(&mut self, seq: u64) -> Result<(), SpoolError> {
        let below = (seq + 1).min(self.next_seq);
        if below <= self.acked_below {
            return Ok(());
        }
        self.acked_below = below;
        if self.send.seq < below {
            // Acknowledged without being sent since the last rewind (sent on an earlier
            // connection): skip past them.
            self.rewind()?;
        }
        // A segment is all acknowledged when the one after it starts at or below `below`.
        while self.segments.len() > 1 {
            let next_first = self.segments[1].first_seq.unwrap_or(self.next_seq);
            if next_first > below {
                break;
            }
            let Some(old) = self.segments.pop_front() else {
                break;
            };
            if self.reader.as_ref().is_some_and(|(id, _)| *id == old.id) {
                self.reader = None;
            }
            std::fs::remove_file(&old.path).map_err(io_err(&old.path))?;
            self.bytes -= old.len;
        }
        Ok(())
    }

    /// Start sending again from the first unacknowledged event (after a reconnect).
    pub fn rewind(&mut self) -> Result<(), SpoolError> {
        let target = self.acked_below;
        // The last segment starting at or before the target holds it.
        let start = self
            .segments
            .iter()
            .rev()
            .find(|s| s.first_seq.is_some_and(|f| f <= target))
            .map(|s| (s.id, s.first_seq.unwrap_or(target)))
            .or_else(|| self.segments.front().map(|s| (s.id, target)));
        let Some((segment, seq)) = start else {
            return Ok(());
        };
        self.send = Cursor {
            segment,
            offset: SEGMENT_MAGIC.len() as u64,
            seq,
        };
        // Skip the acknowledged records at the start of that segment.
        while self.send.seq < target {
            if self.next_unsent()?.is_none() {
                break;
            }
        }
        Ok(())
    }

    /// Remove the spool from disk (the attempt is over).
    pub fn remove(self) -> Result<(), SpoolError> {
        drop(self.writer);
        std::fs::remove_dir_all(&self.dir).map_err(io_err(&self.dir))
    }

    fn tail(&self) -> &Segment {
        self.segments.back().expect("a spool always has a segment")
    }

    fn tail_mut(&mut self) -> &mut Segment {
        self.segments
            .back_mut()
            .expect("a spool always has a segment")
    }

    fn roll(&mut self) -> Result<(), SpoolError> {
        let (segment, writer) = new_segment(&self.dir, self.tail().id + 1)?;
        self.bytes += segment.len;
        self.segments.push_back(segment);
        self.writer = writer;
        Ok(())
    }
}

fn new_segment(dir: &Path, id: u64) -> Result<(Segment, File), SpoolError> {
    let path = segment_path(dir, id);
    let mut f = OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(&path)
        .map_err(io_err(&path))?;
    f.write_all(&SEGMENT_MAGIC).map_err(io_err(&path))?;
    Ok((
        Segment {
            id,
            path,
            first_seq: None,
            len: SEGMENT_MAGIC.len() as u64,
        },
        f,
    ))
}

#[cfg(test)]
#[path = "spool_tests.rs"]
pub(crate) mod tests;
