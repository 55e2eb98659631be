//! A spec's `inputs`: found beside the spec file, sized, and checked against
//! [`MAX_INPUT_BYTES`] before anything is packed.
//!
//! Each entry lands in the attempt's workspace under its last path component
//! (`data/words.txt` → `words.txt`), so two entries with the same last component are refused.
//! [`pack_inputs`] packs them into the tar archive `drover submit` sends with the spec; the
//! coordinator stores it and each attempt's worker unpacks a fresh copy into its workspace.
//! Inside a shipped directory, symlinks are packed as symlinks when they point inside it and
//! left out otherwise (the caller is told which).

use super::units::format_size;
use super::validate::{invalid, InvalidField};
use drover_protocol::task::TaskSpec;
use drover_worker::archive::{pack_tree, ArchiveError, Packer, Skipped};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Most bytes a task's inputs may hold in all: 64 MiB (defined beside the wire types, as the
/// coordinator and the worker check it too).
pub use drover_protocol::task::MAX_INPUT_BYTES;

/// One `inputs` entry, found and sized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputFile {
    /// The entry as written in the spec.
    pub entry: String,
    /// Absolute path with symlinks resolved.
    pub path: PathBuf,
    /// Where it lands, relative to the attempt's workspace: the entry's last path component
    /// (`data/words.txt` → `words.txt`, `assets/` → `assets`). Unique within a spec.
    pub workspace_name: String,
    pub is_dir: bool,
    /// Bytes of the file, or of every regular file beneath the directory. Symlinks inside a
    /// directory are not followed and count as nothing.
    pub bytes: u64,
}

/// Find and size every input of `spec`, relative to `base_dir` (the spec file's directory).
///
/// Walking stops as soon as the total passes [`MAX_INPUT_BYTES`], so pointing `inputs` at a
/// huge tree fails fast instead of reading it all.
pub fn resolve_inputs(spec: &TaskSpec, base_dir: &Path) -> Result<Vec<InputFile>, InvalidField> {
    let mut inputs: Vec<InputFile> = Vec::with_capacity(spec.inputs.len());
    let mut total: u64 = 0;
    for (i, entry) in spec.inputs.iter().enumerate() {
        let field = format!("inputs[{i}]");
        let joined = base_dir.join(entry);
        let path = std::fs::canonicalize(&joined).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                invalid(
                    &field,
                    format!(
                        "{entry:?} does not exist (looked for {}); input paths are relative to the spec file's directory",
                        joined.display()
                    ),
                )
            } else {
                invalid(&field, format!("cannot read {entry:?} ({}): {e}", joined.display()))
            }
        })?;
        let workspace_name = match path.file_name() {
            Some(n) => n.to_string_lossy().into_owned(),
            None => {
                return Err(invalid(
                    &field,
                    format!(
                        "{entry:?} is the filesystem root; name a file or directory beneath it"
                    ),
                ))
            }
        };
        if let Some((j, other)) = inputs
            .iter()
            .enumerate()
            .find(|(_, o)| o.workspace_name == workspace_name)
        {
            let what = if other.path == path {
                format!("{entry:?} is listed twice (also inputs[{j}])")
            } else {
                format!(
                    "{entry:?} would land at {workspace_name} in the workspace, as inputs[{j}] \
                     {:?} does; inputs land under their last path component, so rename one or \
                     ship their parent directory",
                    other.entry
                )
            };
            return Err(invalid(&field, what));
        }
        let meta = std::fs::metadata(&path)
            .map_err(|e| invalid(&field, format!("cannot read {}: {e}", path.display())))?;
        let is_dir = meta.is_dir();
        let bytes = if is_dir {
            dir_bytes(&path, total, &field, entry)?
        } else if meta.is_file() {
            meta.len()
        } else {
            return Err(invalid(
                &field,
                format!("{} is not a regular file or a directory", path.display()),
            ));
        };
        total = total.saturating_add(bytes);
        if total > MAX_INPUT_BYTES {
            return Err(too_large(&field, entry, bytes, total));
        }
        inputs.push(InputFile {
            entry: entry.clone(),
            path,
            workspace_name,
            is_dir,
            bytes,
        });
    }
    Ok(inputs)
}

/// Pack the resolved inputs into a tar archive written to `out`, each under its workspace
/// name. Returns the writer and the symlinks left out because they point outside what is
/// shipped. Fails past [`MAX_INPUT_BYTES`] (files may have grown since they were sized).
pub fn pack_inputs<W: Write>(
    inputs: &[InputFile],
    out: W,
) -> Result<(W, Vec<Skipped>), ArchiveError> {
    let mut packer = Packer::new(out, MAX_INPUT_BYTES);
    let mut skipped = Vec::new();
    for input in inputs {
        let name = Path::new(&input.workspace_name);
        if input.is_dir {
            skipped.extend(pack_tree(&mut packer, &input.path, name)?);
        } else {
            packer.add_file(&input.path, name)?;
        }
    }
    Ok((packer.finish()?, skipped))
}

fn too_large(field: &str, entry: &str, bytes: u64, total: u64) -> InvalidField {
    invalid(
        "inputs",
        format!(
            "together hold at least {} ({field} {entry:?}: at least {}), over the {} limit; \
             remove large files from the inputs, or fetch big data from inside the task \
             (network = \"host\")",
            format_size(total),
            format_size(bytes),
            format_size(MAX_INPUT_BYTES)
        ),
    )
}

/// Bytes of regular files beneath `dir`, without following symlinks. `before` is the total
/// of earlier inputs, to stop once the limit is passed.
fn dir_bytes(dir: &Path, before: u64, field: &str, entry: &str) -> Result<u64, InvalidField> {
    let mut bytes: u64 = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let read = std::fs::read_dir(&d)
            .map_err(|e| invalid(field, format!("cannot list {}: {e}", d.display())))?;
        for item in read {
            let item =
                item.map_err(|e| invalid(field, format!("cannot list {}: {e}", d.display())))?;
            let kind = item.file_type().map_err(|e| {
                invalid(field, format!("cannot read {}: {e}", item.path().display()))
            })?;
            if kind.is_dir() {
                stack.push(item.path());
            } else if kind.is_file() {
                let len = item
                    .metadata()
                    .map_err(|e| {
                        invalid(field, format!("cannot read {}: {e}", item.path().display()))
                    })?
                    .len();
                bytes = bytes.saturating_add(len);
                if before.saturating_add(bytes) > MAX_INPUT_BYTES {
                    return Err(too_large(field, entry, bytes, before.saturating_add(bytes)));
                }
            } else if !kind.is_symlink() {
                return Err(invalid(
                    field,
                    format!(
                        "{} is not a regular file, directory or symlink; inputs can only ship those",
                        item.path().display()
                    ),
                ));
            }
        }
    }
    Ok(bytes)
}

#[cfg(test)]
#[path = "inputs_tests.rs"]
mod tests;
