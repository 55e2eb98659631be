use super::*;

pub(crate) fn ev(seq: u64, payload: &str) -> AttemptEvent {
    AttemptEvent {
        seq,
        ts_ms: 1_700_000_000_000 + seq,
        kind: "stdout".into(),
        payload: payload.into(),
    }
}

fn encoded(e: &AttemptEvent) -> Vec<u8> {
    let mut out = Vec::new();
    encode_record(e, &mut out).unwrap();
    out
}

/// A small deterministic generator, so failures reproduce.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

#[test]
fn crc32_matches_the_standard_check_value() {
    assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    assert_eq!(crc32(b""), 0);
}

#[test]
fn records_round_trip() {
    let e = AttemptEvent {
        seq: 42,
        ts_ms: 7,
        kind: "checkpoint".into(),
        payload: r#"{"step":"ünïcode"}"#.into(),
    };
    let bytes = encoded(&e);
    assert_eq!(decode_record(&bytes), Ok(Some((e, bytes.len()))));
    assert_eq!(decode_record(&[]), Ok(None));
}

#[test]
fn every_truncation_is_detected_as_truncated() {
    let bytes = encoded(&ev(3, "hello world"));
    for cut in 1..bytes.len() {
        match decode_record(&bytes[..cut]) {
            Err(RecordError::Truncated { have, need }) => {
                assert_eq!(have, cut);
                assert!(need > cut);
            }
            other => panic!("cut at {cut}: {other:?}"),
        }
    }
}

#[test]
fn every_single_bit_flip_is_detected() {
    let bytes = encoded(&ev(9, "payload"));
    for i in 0..bytes.len() * 8 {
        let mut b = bytes.clone();
        b[i / 8] ^= 1 << (i % 8);
        // A flip in the length field can make it look truncated or too long; anywhere else
        // the checksum catches it. Never a wrong event.
        assert!(decode_record(&b).is_err(), "bit {i} flipped went unnoticed");
    }
}

#[test]
fn oversized_and_malformed_bodies_are_typed_errors() {
    let mut huge = vec![0u8; 8];
    huge[..4].copy_from_slice(&(MAX_RECORD_BODY as u32 + 1).to_le_bytes());
    assert_eq!(
        decode_record(&huge),
        Err(RecordError::TooLong(MAX_RECORD_BODY + 1))
    );
    // A body whose kind length runs past its end, with a valid checksum.
    let mut body = vec![0u8; BODY_FIXED];
    body[16..18].copy_from_slice(&100u16.to_le_bytes());
    let mut rec = (body.len() as u32).to_le_bytes().to_vec();
    rec.extend_from_slice(&crc32(&body).to_le_bytes());
    rec.extend_from_slice(&body);
    assert!(matches!(
        decode_record(&rec),
        Err(RecordError::Malformed(_))
    ));
    // Non-UTF-8 payload.
    let mut body = vec![0u8; BODY_FIXED];
    body.push(0xff);
    let mut rec = (body.len() as u32).to_le_bytes().to_vec();
    rec.extend_from_slice(&crc32(&body).to_le_bytes());
    rec.extend_from_slice(&body);
    assert!(matches!(
        decode_record(&rec),
        Err(RecordError::Malformed(_))
    ));
}

#[test]
fn arbitrary_bytes_never_panic() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let good = encoded(&ev(1, "x"));
    for _ in 0..20_000 {
        let len = rng.below(64) as usize;
        let mut b: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        if rng.below(2) == 0 {
            // Often start from a real record, damaged a little.
            b = good.clone();
            for _ in 0..=rng.below(3) {
                let i = rng.below(b.len() as u64) as usize;
                b[i] = rng.next() as u8;
            }
            b.truncate(rng.below(b.len() as u64 + 1) as usize);
        }
        if let Ok(Some((_, n))) = decode_record(&b) {
            assert!(n <= b.len());
        }
        let mut seg = SEGMENT_MAGIC.to_vec();
        seg.extend_from_slice(&b);
        let scan = scan_segment(&seg).unwrap();
        assert!(scan.valid_len <= seg.len());
    }
}

#[test]
fn append_send_ack_and_resend_after_rewind() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Spool::create(&dir.path().join("a"), MIN_SPOOL_BYTES).unwrap();
    for i in 0..10 {
        s.append(&ev(i, &format!("e{i}"))).unwrap();
    }
    assert!(matches!(
        s.append(&ev(11, "gap")),
        Err(SpoolError::OutOfOrder {
            got: 11,
            expected: 10
        })
    ));
    let sent: Vec<u64> = (0..6)
        .map(|_| s.next_unsent().unwrap().unwrap().seq)
        .collect();
    assert_eq!(sent, [0, 1, 2, 3, 4, 5]);
    assert_eq!(s.in_flight(), 6);
    s.ack(3).unwrap();
    assert_eq!(s.in_flight(), 2);
    // The link drops: resend from the first unacknowledged event.
    s.rewind().unwrap();
    let resent: Vec<u64> = std::iter::from_fn(|| s.next_unsent().unwrap().map(|e| e.seq)).collect();
    assert_eq!(resent, [4, 5, 6, 7, 8, 9]);
    assert!(!s.all_acked());
    s.ack(9).unwrap();
    assert!(s.all_acked() && !s.has_unsent());
    // An ack beyond what exists is clamped, and a stale one changes nothing.
    s.ack(100).unwrap();
    s.ack(2).unwrap();
    assert!(s.all_acked());
}

#[test]
fn acked_segments_are_trimmed_and_the_bound_holds() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b");
    let mut s = Spool::create(&path, MIN_SPOOL_BYTES).unwrap();
    let chunk = "x".repeat(16 * 1024);
    let mut seq = 0;
    while !s.is_full() {
        s.append(&ev(seq, &chunk)).unwrap();
        seq += 1;
    }
    let full = s.bytes();
    assert!(
        (MIN_SPOOL_BYTES..MIN_SPOOL_BYTES + 64 * 1024).contains(&full),
        "{full}"
    );
    let on_disk: u64 = std::fs::read_dir(&path)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert_eq!(on_disk, full);
    // Sending alone frees nothing; acknowledging does, segment by segment.
    while s.next_unsent().unwrap().is_some() {}
    assert!(s.is_full());
    s.ack(seq / 2).unwrap();
    assert!(!s.is_full() && s.bytes() < full);
    s.ack(seq - 1).unwrap();
    let files = std::fs::read_dir(&path).unwrap().count();
    assert_eq!(files, 1, "only the segment being written stays");
    s.remove().unwrap();
    assert!(!path.exists());
}

#[test]
fn reopen_cuts_a_torn_tail_and_resends_what_is_left() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c");
    let mut s = Spool::create(&path, MIN_SPOOL_BYTES).unwrap();
    for i in 0..5 {
        s.append(&ev(i, "payload")).unwrap();
    }
    s.ack(1).unwrap();
    drop(s);
    let seg = segment_path(&path, 0);
    let len = std::fs::metadata(&seg).unwrap().len();
    // A crash in the middle of writing the last record.
    let f = OpenOptions::new().write(true).open(&seg).unwrap();
    f.set_len(len - 3).unwrap();
    drop(f);
    let (mut s, rec) = Spool::open(&path, MIN_SPOOL_BYTES).unwrap();
    assert_eq!(rec.events, 4);
    assert!(matches!(rec.cut, Some((n, RecordError::Truncated { .. })) if n > 0));
    assert_eq!(s.next_seq(), 4);
    // Acks are not persisted: everything kept is resent (the coordinator acks duplicates).
    let resent: Vec<u64> = std::iter::from_fn(|| s.next_unsent().unwrap().map(|e| e.seq)).collect();
    assert_eq!(resent, [0, 1, 2, 3]);
    s.append(&ev(4, "again")).unwrap();
    assert_eq!(s.next_unsent().unwrap().unwrap().payload, "again");
}

#[test]
fn reopen_cuts_at_a_corrupt_record_and_drops_later_segments() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d");
    // The smallest bound makes 512 KiB segments, so 200 KiB events span three.
    let mut s = Spool::create(&path, MIN_SPOOL_BYTES).unwrap();
    let chunk = "y".repeat(200 * 1024);
    for i in 0..8 {
        s.append(&ev(i, &chunk)).unwrap();
    }
    drop(s);
    let mut segs: Vec<_> = std::fs::read_dir(&path)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    segs.sort();
    assert!(segs.len() >= 3, "{segs:?}");
    // Flip a byte inside the first record of the second segment.
    let mut bytes = std::fs::read(&segs[1]).unwrap();
    bytes[SEGMENT_MAGIC.len() + RECORD_HEADER + 20] ^= 0x55;
    std::fs::write(&segs[1], &bytes).unwrap();
    let (mut s, rec) = Spool::open(&path, MIN_SPOOL_BYTES).unwrap();
    assert!(matches!(rec.cut, Some((_, RecordError::Checksum { .. }))));
    let kept: Vec<u64> = std::iter::from_fn(|| s.next_unsent().unwrap().map(|e| e.seq)).collect();
    assert_eq!(kept.len() as u64, rec.events);
    assert_eq!(kept, (0..rec.events).collect::<Vec<_>>());
    assert_eq!(std::fs::read_dir(&path).unwrap().count(), 2);
}

#[test]
fn a_file_that_is_not_a_segment_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("e");
    std::fs::create_dir_all(&path).unwrap();
    std::fs::write(segment_path(&path, 0), b"not a spool").unwrap();
    let err = Spool::open(&path, MIN_SPOOL_BYTES).unwrap_err();
    assert!(err.to_string().contains("not a spool segment"), "{err}");
}
