//! An attempt's outputs on the worker's side, without I/O to the coordinator: the spec's
//! globs matched in the workspace ([`collect_outputs`]), the matches packed ([`pack`]), and the
//! session events that say what was stored ([`outputs_events`]).
//!
//! Outputs never escape the workspace: the walk does not follow symlinks; a symlink that
//! matches is stored as the file it points to only when that file is inside the workspace,
//! and is otherwise skipped with a note. Files past [`MAX_OUTPUT_BYTES`] or
//! [`MAX_OUTPUT_FILES`] (in path order) are skipped and reported.

use crate::archive::Packer;
use crate::workspace::WorkspaceError;
use drover_protocol::task::{MAX_OUTPUT_BYTES, MAX_OUTPUT_FILES};
use serde_json::json;
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

/// Most workspace entries the outputs walk visits before it stops (with a note).
pub const MAX_WALK_ENTRIES: u64 = 200_000;
/// Most paths listed in one `outputs_stored` event (the archive holds them all).
pub const MAX_LISTED: usize = 100;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> WorkspaceError + '_ {
    move |source| WorkspaceError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One file to store: where it lands in the archive and where it is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputFile {
    pub path: PathBuf,
    pub source: PathBuf,
    pub bytes: u64,
}

/// What the outputs globs found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Collected {
    /// Files to store, sorted by path, within the limits.
    pub files: Vec<OutputFile>,
    /// Matches left out, and why (symlinks leaving the workspace, special files, limits).
    pub skipped: Vec<(String, String)>,
    /// Globs that matched nothing.
    pub unmatched: Vec<String>,
    /// Set when files were left out for the limits: (matched files, matched bytes).
    pub over_limit: Option<(u64, u64)>,
}

fn pattern(glob: &str) -> Result<glob::Pattern, String> {
    let g = glob.trim_start_matches("./").trim_end_matches('/');
    glob::Pattern::new(g).map_err(|e| format!("{glob:?} is not a valid glob: {e}"))
}

const MATCH: glob::MatchOptions = glob::MatchOptions {
    case_sensitive: true,
    require_literal_separator: true,
    require_literal_leading_dot: false,
};

/// Match `globs` (relative to the workspace) against what the workspace holds. A glob that
/// matches a directory takes everything beneath it. Symlinks are never followed in the walk.
pub fn collect_outputs(workspace: &Path, globs: &[String]) -> Result<Collected, WorkspaceError> {
    let root = fs::canonicalize(workspace).map_err(io_err(workspace))?;
    let mut out = Collected::default();
    let mut patterns = Vec::new();
    for g in globs {
        match pattern(g) {
            Ok(p) => patterns.push((g.clone(), p, false)),
            Err(why) => out.skipped.push((g.clone(), why)),
        }
    }
    let mut found: BTreeMap<PathBuf, OutputFile> = BTreeMap::new();
    let mut visited = 0u64;
    // (directory, its path relative to the workspace, whether a glob matched it or a parent)
    let mut stack = vec![(root.clone(), PathBuf::new(), false)];
    'walk: while let Some((dir, rel, inherited)) = stack.pop() {
        let items = fs::read_dir(&dir).map_err(io_err(&dir))?;
        for item in items {
            let item = item.map_err(io_err(&dir))?;
            visited += 1;
            if visited > MAX_WALK_ENTRIES {
                out.skipped.push((
                    rel.display().to_string(),
                    format!("the workspace has more than {MAX_WALK_ENTRIES} entries; the rest was not searched"),
                ));
                break 'walk;
            }
            let path = item.path();
            let rel_path = rel.join(item.file_name());
            let rel_text = rel_path.to_string_lossy();
            let mut matched = inherited;
            for (_, p, hit) in patterns.iter_mut() {
                if p.matches_with(&rel_text, MATCH) {
                    *hit = true;
                    matched = true;
                }
            }
            let kind = item.file_type().map_err(io_err(&path))?;
            if kind.is_dir() {
                stack.push((path, rel_path, matched));
                continue;
            }
            if !matched {
                continue;
            }
            if kind.is_file() {
                let bytes = fs::symlink_metadata(&path).map_err(io_err(&path))?.len();
                found.insert(
                    rel_path.clone(),
                    OutputFile {
                        path: rel_path,
                        source: path,
                        bytes,
                    },
                );
            } else if kind.is_symlink() {
                let shown = fs::read_link(&path)
                    .map(|t| t.display().to_string())
                    .unwrap_or_default();
                match fs::canonicalize(&path) {
                    Ok(t) if !t.starts_with(&root) => out.skipped.push((
                        rel_text.into_owned(),
                        format!("symlink to {shown}, outside the workspace; not followed"),
                    )),
                    Ok(t) => match fs::metadata(&t) {
                        Ok(m) if m.is_file() => {
                            found.insert(
                                rel_path.clone(),
                                OutputFile {
                                    path: rel_path,
                                    source: t,
                                    bytes: m.len(),
                                },
                            );
                        }
                        _ => out.skipped.push((
                            rel_text.into_owned(),
                            format!("symlink to {shown}, not a regular file; not followed"),
                        )),
                    },
                    Err(_) => out.skipped.push((
                        rel_text.into_owned(),
                        format!("symlink to {shown}, which does not exist"),
                    )),
                }
            } else {
                out.skipped.push((
                    rel_text.into_owned(),
                    "not a regular file (a fifo, socket or device)".into(),
                ));
            }
        }
    }
    out.unmatched = patterns
        .into_iter()
        .filter(|(_, _, hit)| !hit)
        .map(|(g, _, _)| g)
        .collect();
    let (all_files, all_bytes) = (
        found.len() as u64,
        found.values().map(|f| f.bytes).sum::<u64>(),
    );
    let mut bytes = 0u64;
    for f in found.into_values() {
        let reason = if out.files.len() as u64 >= MAX_OUTPUT_FILES {
            Some(format!("over the {MAX_OUTPUT_FILES}-file outputs limit"))
        } else if bytes + f.bytes > MAX_OUTPUT_BYTES {
            Some(format!(
                "over the {} MiB outputs limit",
                MAX_OUTPUT_BYTES >> 20
            ))
        } else {
            None
        };
        match reason {
            Some(r) => {
                out.skipped.push((f.path.display().to_string(), r));
                out.over_limit = Some((all_files, all_bytes));
            }
            None => {
                bytes += f.bytes;
                out.files.push(f);
            }
        }
    }
    Ok(out)
}

/// Pack `files` into a new archive at `path`; returns its size.
pub fn pack(files: &[OutputFile], path: &Path) -> Result<u64, WorkspaceError> {
    let file = fs::File::create(path).map_err(io_err(path))?;
    let mut packer = Packer::new(std::io::BufWriter::new(file), MAX_OUTPUT_BYTES);
    for f in files {
        packer.add_file(&f.source, &f.path)?;
    }
    let w = packer.finish()?;
    let file = w.into_inner().map_err(|e| WorkspaceError::Io {
        path: path.to_path_buf(),
        source: e.into_error(),
    })?;
    Ok(file.metadata().map_err(io_err(path))?.len())
}

/// The session events for stored outputs.
pub fn outputs_events(
    c: &Collected,
    globs: &[String],
    files: u64,
    bytes: u64,
    archive_bytes: u64,
    sha256: &str,
) -> Vec<(String, String)> {
    let paths: Vec<String> = c
        .files
        .iter()
        .take(MAX_LISTED)
        .map(|f| f.path.display().to_string())
        .collect();
    let skipped: Vec<_> = c
        .skipped
        .iter()
        .take(MAX_LISTED)
        .map(|(p, r)| json!({ "path": p, "reason": r }))
        .collect();
    let mut stored = json!({
        "files": files,
        "bytes": bytes,
        "archive_bytes": archive_bytes,
        "sha256": sha256,
        "paths": paths,
        "more_paths": c.files.len().saturating_sub(MAX_LISTED),
        "skipped": skipped,
        "more_skipped": c.skipped.len().saturating_sub(MAX_LISTED),
        "unmatched": c.unmatched,
    });
    if files == 0 {
        stored["note"] = json!(format!(
            "no file matched the outputs globs {globs:?}; nothing was stored"
        ));
    }
    let mut events = vec![("outputs_stored".to_owned(), stored.to_string())];
    if let Some((matched_files, matched_bytes)) = c.over_limit {
        let over = json!({
            "message": format!(
                "the outputs matched {matched_files} files of {matched_bytes} bytes, over the limits \
                 ({} MiB, {MAX_OUTPUT_FILES} files); {files} files of {bytes} bytes were stored, \
                 the rest is listed under skipped in outputs_stored",
                MAX_OUTPUT_BYTES >> 20
            ),
            "limit_bytes": MAX_OUTPUT_BYTES,
            "limit_files": MAX_OUTPUT_FILES,
            "matched_files": matched_files,
            "matched_bytes": matched_bytes,
            "stored_files": files,
            "stored_bytes": bytes,
        });
        events.push(("outputs_over_limit".to_owned(), over.to_string()));
    }
    events
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::archive::{self, UnpackOptions};
    use std::os::unix::fs::symlink;

    fn globs(g: &[&str]) -> Vec<String> {
        g.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn globs_match_files_and_directories_without_leaving_the_workspace() {
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("secret"), b"s").unwrap();
        let ws = tempfile::tempdir().unwrap();
        let w = ws.path();
        fs::create_dir_all(w.join("out/deep")).unwrap();
        fs::write(w.join("out/a.json"), b"{}").unwrap();
        fs::write(w.join("out/deep/b.txt"), b"bb").unwrap();
        fs::write(w.join("report.md"), b"# r").unwrap();
        fs::write(w.join("notes.txt"), b"n").unwrap();
        symlink(outside.path().join("secret"), w.join("out/leak")).unwrap();
        symlink("report.md", w.join("alias.md")).unwrap();
        symlink("nowhere", w.join("dangling.md")).unwrap();
        let c = collect_outputs(w, &globs(&["out/", "*.md", "missing/*.bin"])).unwrap();
        let paths: Vec<_> = c
            .files
            .iter()
            .map(|f| f.path.display().to_string())
            .collect();
        assert_eq!(
            paths,
            ["alias.md", "out/a.json", "out/deep/b.txt", "report.md"]
        );
        let alias = &c.files[0];
        assert_eq!(alias.source, fs::canonicalize(w.join("report.md")).unwrap());
        assert_eq!(c.unmatched, ["missing/*.bin"]);
        let skipped: BTreeMap<_, _> = c.skipped.iter().cloned().collect();
        assert!(
            skipped["out/leak"].contains("outside the workspace"),
            "{skipped:?}"
        );
        assert!(skipped["dangling.md"].contains("does not exist"));
        assert_eq!(c.over_limit, None);

        // `*` does not cross directories; `**` does.
        let c = collect_outputs(w, &globs(&["*.txt"])).unwrap();
        assert_eq!(c.files.len(), 1);
        let c = collect_outputs(w, &globs(&["**/*.txt"])).unwrap();
        assert_eq!(c.files.len(), 2);

        // Packed and unpacked, the files come back byte-identical.
        let c = collect_outputs(w, &globs(&["out", "*.md"])).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let at = dir.path().join("o.tar");
        pack(&c.files, &at).unwrap();
        let dest = dir.path().join("dest");
        fs::create_dir(&dest).unwrap();
        let opts = UnpackOptions {
            overwrite: false,
            max_bytes: MAX_OUTPUT_BYTES,
            max_entries: 100,
        };
        let s = archive::unpack(fs::File::open(&at).unwrap(), &dest, opts).unwrap();
        assert_eq!(s.files, 4);
        assert_eq!(fs::read(dest.join("alias.md")).unwrap(), b"# r");
        assert_eq!(fs::read(dest.join("out/deep/b.txt")).unwrap(), b"bb");
        assert!(!dest.join("out/leak").exists());
    }

    #[test]
    fn nothing_matched_says_so() {
        let ws = tempfile::tempdir().unwrap();
        let c = collect_outputs(ws.path(), &globs(&["*.json"])).unwrap();
        assert!(c.files.is_empty());
        let events = outputs_events(&c, &globs(&["*.json"]), 0, 0, 1024, "x");
        assert_eq!(events.len(), 1);
        let v: serde_json::Value = serde_json::from_str(&events[0].1).unwrap();
        assert_eq!(v["files"], 0);
        assert!(v["note"].as_str().unwrap().contains("no file matched"));
        assert_eq!(v["unmatched"][0], "*.json");
    }

    #[test]
    fn files_past_the_limit_are_skipped_and_reported() {
        let ws = tempfile::tempdir().unwrap();
        // Sparse files: no disk used, sizes as the limit sees them.
        for (name, len) in [("a", MAX_OUTPUT_BYTES - 10), ("b", 20), ("c", 5)] {
            fs::File::create(ws.path().join(name))
                .unwrap()
                .set_len(len)
                .unwrap();
        }
        let c = collect_outputs(ws.path(), &globs(&["*"])).unwrap();
        let kept: Vec<_> = c
            .files
            .iter()
            .map(|f| f.path.display().to_string())
            .collect();
        assert_eq!(kept, ["a", "c"]);
        assert_eq!(c.skipped.len(), 1);
        assert!(c.skipped[0].1.contains("256 MiB outputs limit"));
        assert_eq!(c.over_limit, Some((3, MAX_OUTPUT_BYTES + 15)));
        let events = outputs_events(&c, &globs(&["*"]), 2, MAX_OUTPUT_BYTES - 5, 0, "x");
        assert_eq!(events[1].0, "outputs_over_limit");
    }
}
