//! Fuzz the worker's event-spool record decoder (worker-agent/src/spool.rs, included by path:
//! it needs only drover-protocol and thiserror, so the fuzz build stays small).
//!
//! Checks, besides "no panic, no runaway allocation":
//! - a decoded record never claims more bytes than it was given, and re-encodes to exactly
//!   those bytes (the format has one encoding per event);
//! - scanning a segment (magic + the input) stops within the input, and every record before
//!   the stop point decodes again on its own.

#![no_main]

#[allow(dead_code)]
#[path = "../../worker-agent/src/spool.rs"]
mod spool;

use libfuzzer_sys::fuzz_target;
use spool::{decode_record, encode_record, scan_segment, SEGMENT_MAGIC};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((ev, n))) = decode_record(data) {
        assert!(n <= data.len());
        let mut again = Vec::new();
        encode_record(&ev, &mut again).expect("a decoded event re-encodes");
        assert_eq!(again, &data[..n], "one encoding per event");
    }
    let mut seg = SEGMENT_MAGIC.to_vec();
    seg.extend_from_slice(data);
    let scan = scan_segment(&seg).expect("the magic is there");
    assert!(scan.valid_len <= seg.len());
    let mut off = SEGMENT_MAGIC.len();
    for seq in &scan.seqs {
        let (ev, n) = decode_record(&seg[off..scan.valid_len])
            .expect("a scanned record decodes")
            .expect("not empty");
        assert_eq!(ev.seq, *seq);
        off += n;
    }
    assert_eq!(off, scan.valid_len);
});
