#![allow(clippy::unwrap_used)]

use super::*;
use std::os::unix::fs::symlink;

const BIG: UnpackOptions = UnpackOptions {
    overwrite: false,
    max_bytes: 1 << 30,
    max_entries: 10_000,
};

/// An archive entry written byte by byte, the way a hostile packer would: no checks at all.
fn raw(out: &mut Vec<u8>, name: &str, kind: tar::EntryType, link: &str, data: &[u8]) {
    let mut h = tar::Header::new_old();
    {
        let old = h.as_old_mut();
        old.name[..name.len()].copy_from_slice(name.as_bytes());
        old.linkname[..link.len()].copy_from_slice(link.as_bytes());
    }
    h.set_entry_type(kind);
    h.set_mode(0o644);
    h.set_size(data.len() as u64);
    h.set_cksum();
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
}

fn end(mut out: Vec<u8>) -> Vec<u8> {
    out.extend_from_slice(&[0u8; 1024]);
    out
}

/// Unpack `archive` into a fresh `dest` inside a fresh root; returns the error text, and
/// checks nothing appeared next to `dest`.
fn refused(archive: Vec<u8>) -> String {
    let root = tempfile::tempdir().unwrap();
    let dest = root.path().join("ws");
    fs::create_dir(&dest).unwrap();
    let err = unpack(&archive[..], &dest, BIG).unwrap_err().to_string();
    let beside: Vec<_> = fs::read_dir(root.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(beside, ["ws"], "nothing written outside the destination");
    assert!(
        list(&archive[..], 1 << 30, 10_000).is_err(),
        "list refuses it too"
    );
    err
}

#[test]
fn a_tree_round_trips_byte_identical_with_modes() {
    let src = tempfile::tempdir().unwrap();
    let s = src.path();
    fs::create_dir_all(s.join("data/sub")).unwrap();
    fs::write(s.join("data/a.txt"), b"alpha\n").unwrap();
    let binary: Vec<u8> = (0..70_000u32).map(|i| (i * 7 % 251) as u8).collect();
    fs::write(s.join("data/sub/b.bin"), &binary).unwrap();
    fs::write(s.join("data/run.sh"), b"#!/bin/sh\necho hi\n").unwrap();
    fs::set_permissions(s.join("data/run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    symlink("sub/b.bin", s.join("data/inside")).unwrap();
    symlink("/etc/passwd", s.join("data/outside")).unwrap();
    symlink("../../x", s.join("data/sub/climbs")).unwrap();
    let long = "n".repeat(150);
    fs::write(s.join("data").join(&long), b"long name").unwrap();
    fs::write(s.join("single.txt"), b"one").unwrap();

    let mut packer = Packer::new(Vec::new(), 1 << 20);
    let skipped = pack_tree(&mut packer, &s.join("data"), Path::new("data")).unwrap();
    packer
        .add_file(&s.join("single.txt"), Path::new("single.txt"))
        .unwrap();
    assert_eq!(packer.totals(), (5, 6 + 70_000 + 18 + 9 + 3));
    let archive = packer.finish().unwrap();
    let mut reasons: Vec<_> = skipped
        .iter()
        .map(|k| k.path.file_name().unwrap().to_owned())
        .collect();
    reasons.sort();
    assert_eq!(reasons, ["climbs", "outside"]);

    let summary = list(&archive[..], 1 << 20, 100).unwrap();
    assert_eq!((summary.files, summary.bytes), (5, 70_036));

    let dest = tempfile::tempdir().unwrap();
    let d = dest.path();
    unpack(&archive[..], d, BIG).unwrap();
    assert_eq!(fs::read(d.join("data/a.txt")).unwrap(), b"alpha\n");
    assert_eq!(fs::read(d.join("data/sub/b.bin")).unwrap(), binary);
    assert_eq!(fs::read(d.join("data").join(&long)).unwrap(), b"long name");
    assert_eq!(fs::read(d.join("single.txt")).unwrap(), b"one");
    assert_eq!(
        fs::metadata(d.join("data/run.sh")).unwrap().mode() & 0o777,
        0o755
    );
    assert_eq!(
        fs::read_link(d.join("data/inside")).unwrap(),
        Path::new("sub/b.bin")
    );
    assert!(!d.join("data/outside").exists() && !d.join("data/sub/climbs").exists());

    // Unpacking again: existing files are refused without overwrite, replaced with it.
    let again = unpack(&archive[..], d, BIG).unwrap_err();
    assert!(matches!(again, ArchiveError::Exists { .. }), "{again}");
    fs::write(d.join("single.txt"), b"changed").unwrap();
    let opts = UnpackOptions {
        overwrite: true,
        ..BIG
    };
    unpack(&archive[..], d, opts).unwrap();
    assert_eq!(fs::read(d.join("single.txt")).unwrap(), b"one");
}

#[test]
fn limits_are_enforced_when_packing_and_unpacking() {
    let src = tempfile::tempdir().unwrap();
    fs::write(src.path().join("f"), vec![1u8; 1000]).unwrap();
    let mut packer = Packer::new(Vec::new(), 999);
    let err = packer
        .add_file(&src.path().join("f"), Path::new("f"))
        .unwrap_err();
    assert!(
        matches!(err, ArchiveError::TooLarge { limit: 999, .. }),
        "{err}"
    );

    let mut packer = Packer::new(Vec::new(), 1 << 20);
    packer
        .add_file(&src.path().join("f"), Path::new("f"))
        .unwrap();
    packer
        .add_file(&src.path().join("f"), Path::new("g"))
        .unwrap();
    let archive = packer.finish().unwrap();
    let dest = tempfile::tempdir().unwrap();
    let opts = UnpackOptions {
        max_bytes: 1500,
        ..BIG
    };
    let err = unpack(&archive[..], dest.path(), opts).unwrap_err();
    assert!(matches!(err, ArchiveError::TooLarge { .. }), "{err}");
    let err = list(&archive[..], 1 << 20, 1).unwrap_err();
    assert!(
        matches!(err, ArchiveError::TooManyEntries { limit: 1 }),
        "{err}"
    );
}

#[test]
fn packing_refuses_a_symlink_in_place_of_a_file() {
    let src = tempfile::tempdir().unwrap();
    symlink("/etc/hostname", src.path().join("f")).unwrap();
    let mut packer = Packer::new(Vec::new(), 1 << 20);
    assert!(packer
        .add_file(&src.path().join("f"), Path::new("f"))
        .is_err());
}

#[test]
fn path_traversal_is_refused() {
    let mut a = Vec::new();
    raw(&mut a, "../evil", tar::EntryType::Regular, "", b"x");
    assert!(refused(end(a)).contains("\"..\""));

    let mut a = Vec::new();
    raw(&mut a, "ok/../../evil", tar::EntryType::Regular, "", b"x");
    assert!(refused(end(a)).contains("\"..\""));

    let mut a = Vec::new();
    raw(&mut a, "/tmp/evil-abs", tar::EntryType::Regular, "", b"x");
    let text = refused(end(a));
    assert!(text.contains("absolute"), "{text}");
    assert!(!Path::new("/tmp/evil-abs").exists());
}

#[test]
fn symlink_escapes_are_refused() {
    // A symlink out of the destination, then a file written through it.
    let mut a = Vec::new();
    raw(&mut a, "link", tar::EntryType::Symlink, "..", b"");
    raw(&mut a, "link/evil", tar::EntryType::Regular, "", b"x");
    let text = refused(end(a));
    assert!(text.contains("outside the destination"), "{text}");

    let mut a = Vec::new();
    raw(&mut a, "etc", tar::EntryType::Symlink, "/etc", b"");
    assert!(refused(end(a)).contains("/etc"));

    // The trick lexical checks alone miss: `sub/b -> ..` is inside, `a -> sub/b/..` looks
    // inside, but resolves through the first link to the destination's parent. Writing
    // through either is refused because no entry is ever written through a symlink.
    let root = tempfile::tempdir().unwrap();
    let dest = root.path().join("ws");
    fs::create_dir(&dest).unwrap();
    let mut a = Vec::new();
    raw(&mut a, "sub/", tar::EntryType::Directory, "", b"");
    raw(&mut a, "sub/b", tar::EntryType::Symlink, "..", b"");
    raw(&mut a, "a", tar::EntryType::Symlink, "sub/b/..", b"");
    raw(&mut a, "a/evil", tar::EntryType::Regular, "", b"x");
    let err = unpack(&end(a)[..], &dest, BIG).unwrap_err().to_string();
    assert!(err.contains("not a real directory"), "{err}");
    assert!(!root.path().join("evil").exists());

    // A symlink already in the destination is not written through either.
    let root = tempfile::tempdir().unwrap();
    let dest = root.path().join("ws");
    fs::create_dir(&dest).unwrap();
    symlink(root.path(), dest.join("up")).unwrap();
    let mut a = Vec::new();
    raw(&mut a, "up/evil", tar::EntryType::Regular, "", b"x");
    assert!(unpack(&end(a)[..], &dest, BIG).is_err());
    assert!(!root.path().join("evil").exists());
    // Nor is an existing symlink replaced by a file through O_NOFOLLOW tricks.
    let mut a = Vec::new();
    raw(&mut a, "up", tar::EntryType::Regular, "", b"x");
    assert!(matches!(
        unpack(&end(a)[..], &dest, BIG).unwrap_err(),
        ArchiveError::Exists { .. }
    ));
}

#[test]
fn hard_links_must_point_at_unpacked_files() {
    let mut a = Vec::new();
    raw(&mut a, "pw", tar::EntryType::Link, "/etc/passwd", b"");
    assert!(refused(end(a)).contains("hard link"));

    let mut a = Vec::new();
    raw(&mut a, "pw", tar::EntryType::Link, "../outside", b"");
    assert!(refused(end(a)).contains("hard link"));

    // A hard link to a file unpacked before it is fine.
    let dest = tempfile::tempdir().unwrap();
    let mut a = Vec::new();
    raw(&mut a, "f", tar::EntryType::Regular, "", b"data");
    raw(&mut a, "g", tar::EntryType::Link, "f", b"");
    let s = unpack(&end(a)[..], dest.path(), BIG).unwrap();
    assert_eq!(s.files, 2);
    assert_eq!(fs::read(dest.path().join("g")).unwrap(), b"data");
}

#[test]
fn special_files_and_garbage_are_refused() {
    let mut a = Vec::new();
    raw(&mut a, "dev", tar::EntryType::Char, "", b"");
    assert!(refused(end(a)).contains("special file"));
    let mut a = Vec::new();
    raw(&mut a, "fifo", tar::EntryType::Fifo, "", b"");
    assert!(refused(end(a)).contains("special file"));
    let garbage = vec![0x41u8; 2048];
    let dest = tempfile::tempdir().unwrap();
    assert!(unpack(&garbage[..], dest.path(), BIG).is_err());
}

#[test]
fn symlink_containment_is_lexical_from_the_link() {
    assert!(symlink_stays_inside(Path::new("a/b"), Path::new("../c")));
    assert!(symlink_stays_inside(
        Path::new("a/b"),
        Path::new("./c/../d")
    ));
    assert!(!symlink_stays_inside(
        Path::new("a/b"),
        Path::new("../../c")
    ));
    assert!(!symlink_stays_inside(Path::new("b"), Path::new("..")));
    assert!(!symlink_stays_inside(Path::new("b"), Path::new("/etc")));
    assert!(!symlink_stays_inside(Path::new("b"), Path::new("")));
}
