//! Fuzz the hostile-archive unpacker (worker-agent/src/archive.rs, included by path): inputs
//! archives reach workers and outputs archives reach the coordinator over the network.
//!
//! Each input is unpacked into a fresh directory inside a fresh sandbox directory; checks,
//! besides "no panic": nothing is created outside the destination (the sandbox directory
//! holds only it afterwards), the limits hold, and `list` agrees with `unpack` on success.

#![no_main]

#[allow(dead_code)]
#[path = "../../worker-agent/src/archive.rs"]
mod archive;

use libfuzzer_sys::fuzz_target;

const MAX_BYTES: u64 = 1 << 20;
const MAX_ENTRIES: u64 = 64;

fuzz_target!(|data: &[u8]| {
    let listed = archive::list(data, MAX_BYTES, MAX_ENTRIES);
    let base = std::env::temp_dir().join(format!("drover-fuzz-unpack-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).expect("fuzz scratch dir");
    let dest = base.join("dest");
    std::fs::create_dir(&dest).expect("dest");
    let opts = archive::UnpackOptions {
        max_bytes: MAX_BYTES,
        max_entries: MAX_ENTRIES,
        overwrite: false,
    };
    let unpacked = archive::unpack(data, &dest, opts);
    let others: Vec<_> = std::fs::read_dir(&base)
        .expect("read scratch dir")
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n != "dest")
        .collect();
    assert!(others.is_empty(), "written outside the destination: {others:?}");
    if let (Ok(l), Ok(u)) = (&listed, &unpacked) {
        assert_eq!(l.files, u.files);
        assert_eq!(l.bytes, u.bytes);
    }
    if let Ok(u) = &unpacked {
        assert!(u.bytes <= MAX_BYTES);
    }
    let _ = std::fs::remove_dir_all(&base);
});
