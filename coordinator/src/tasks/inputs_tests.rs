#![allow(clippy::unwrap_used)]

use super::*;
use crate::tasks::spec::{load_spec, SpecError};
use std::fs;

/// A spec file in a fresh directory, with `files` beside it.
fn spec_dir(spec: &str, files: &[(&str, u64)]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    for (name, len) in files {
        let p = dir.path().join(name);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        // Sparse: set_len costs no disk, so the size tests stay cheap.
        fs::File::create(&p).unwrap().set_len(*len).unwrap();
    }
    let path = dir.path().join("job.toml");
    fs::write(&path, spec).unwrap();
    (dir, path)
}

#[test]
fn inputs_resolve_beside_the_spec_and_are_sized() {
    let (dir, path) = spec_dir(
        "command = [\"true\"]\ninputs = [\"data/a.txt\", \"assets\", \"./assets/../b.bin\"]\n",
        &[
            ("data/a.txt", 10),
            ("assets/x", 100),
            ("assets/sub/y", 1000),
            ("b.bin", 7),
        ],
    );
    #[cfg(unix)]
    std::os::unix::fs::symlink("/etc", dir.path().join("assets/link")).unwrap();
    let loaded = load_spec(&path).unwrap();
    let root = fs::canonicalize(dir.path()).unwrap();
    let got: Vec<_> = loaded
        .inputs
        .iter()
        .map(|i| {
            (
                i.entry.as_str(),
                i.path.clone(),
                i.workspace_name.as_str(),
                i.is_dir,
                i.bytes,
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("data/a.txt", root.join("data/a.txt"), "a.txt", false, 10),
            ("assets", root.join("assets"), "assets", true, 1100),
            ("./assets/../b.bin", root.join("b.bin"), "b.bin", false, 7),
        ]
    );
    assert_eq!(loaded.input_bytes(), 1117);
    assert_eq!(
        loaded.spec.inputs.len(),
        3,
        "the wire spec keeps the entries as written"
    );
}

#[test]
fn missing_input_says_where_it_looked() {
    let (dir, path) = spec_dir("command = [\"true\"]\ninputs = [\"nope.txt\"]\n", &[]);
    let err = load_spec(&path).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("inputs[0]: \"nope.txt\" does not exist"),
        "{text}"
    );
    assert!(
        text.contains(&dir.path().join("nope.txt").display().to_string()),
        "{text}"
    );
    assert!(
        text.contains("relative to the spec file's directory"),
        "{text}"
    );
}

#[test]
fn inputs_over_the_limit_say_limit_and_size() {
    let (_dir, path) = spec_dir(
        "command = [\"true\"]\ninputs = [\"small\", \"big\"]\n",
        &[
            ("small", 1 << 20),
            ("big/part1", 40 << 20),
            ("big/part2", 40 << 20),
        ],
    );
    let err = load_spec(&path).unwrap_err();
    let SpecError::Invalid { source, .. } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(source.field, "inputs");
    assert!(source.message.contains("over the 64 MiB limit"), "{err}");
    assert!(source.message.contains("at least 81 MiB"), "{err}");
    assert!(source.message.contains("inputs[1] \"big\""), "{err}");

    let (_dir, path) = spec_dir(
        "command = [\"true\"]\ninputs = [\"exact\"]\n",
        &[("exact", MAX_INPUT_BYTES)],
    );
    assert_eq!(load_spec(&path).unwrap().input_bytes(), MAX_INPUT_BYTES);
}

#[test]
fn inputs_may_not_collide_in_the_workspace() {
    let (_dir, path) = spec_dir(
        "command = [\"true\"]\ninputs = [\"a/x.txt\", \"b/x.txt\"]\n",
        &[("a/x.txt", 1), ("b/x.txt", 1)],
    );
    let text = load_spec(&path).unwrap_err().to_string();
    assert!(
        text.contains("inputs[1]: \"b/x.txt\" would land at x.txt"),
        "{text}"
    );

    let (_dir, path) = spec_dir(
        "command = [\"true\"]\ninputs = [\"x.txt\", \"./x.txt\"]\n",
        &[("x.txt", 1)],
    );
    let text = load_spec(&path).unwrap_err().to_string();
    assert!(text.contains("listed twice (also inputs[0])"), "{text}");
}

#[test]
fn inputs_pack_under_their_workspace_names_and_unpack_identically() {
    let (dir, path) = spec_dir(
        "command = [\"true\"]\ninputs = [\"data/a.txt\", \"assets\"]\n",
        &[("data/a.txt", 0), ("assets/x", 3), ("assets/sub/y", 5)],
    );
    fs::write(dir.path().join("data/a.txt"), b"alpha").unwrap();
    std::os::unix::fs::symlink("/etc/passwd", dir.path().join("assets/leak")).unwrap();
    std::os::unix::fs::symlink("sub/y", dir.path().join("assets/alias")).unwrap();
    let loaded = load_spec(&path).unwrap();
    let (archive, skipped) = pack_inputs(&loaded.inputs, Vec::new()).unwrap();
    assert_eq!(skipped.len(), 1);
    assert!(skipped[0].path.ends_with("assets/leak"), "{skipped:?}");
    let ws = tempfile::tempdir().unwrap();
    let opts = drover_worker::archive::UnpackOptions {
        overwrite: false,
        max_bytes: MAX_INPUT_BYTES,
        max_entries: 100,
    };
    let summary = drover_worker::archive::unpack(&archive[..], ws.path(), opts).unwrap();
    assert_eq!((summary.files, summary.bytes), (3, 13));
    assert_eq!(fs::read(ws.path().join("a.txt")).unwrap(), b"alpha");
    assert_eq!(fs::read(ws.path().join("assets/sub/y")).unwrap(), [0u8; 5]);
    assert_eq!(
        fs::read_link(ws.path().join("assets/alias")).unwrap(),
        Path::new("sub/y")
    );
    assert!(!ws.path().join("assets/leak").exists());
}
