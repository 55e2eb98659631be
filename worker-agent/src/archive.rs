//! Tar archives of task files: inputs packed by the CLI and unpacked into an attempt's
//! workspace, outputs packed by the worker and unpacked by `drover outputs`.
//!
//! Archives are plain ustar/GNU tar streams (the `tar` crate), uncompressed. Packing reads
//! each file once through a descriptor opened with `O_NOFOLLOW`, so a symlink swapped in at the
//! last moment is refused rather than followed; a file that changes size while packed fails
//! the pack instead of producing a corrupt archive.
//!
//! Unpacking treats every archive as hostile. It refuses (and stops at) any entry that is:
//! - absolute, or has a `..` component;
//! - a symlink whose target is absolute or climbs out of the destination (resolved from the
//!   link's own directory);
//! - a hard link whose target is not a regular file already unpacked inside the destination;
//! - a device, fifo or other special file;
//! - beneath a path that is not a real directory (a symlink, even one pointing inside, is never
//!   written through: every parent is checked with `lstat`, and files are created with
//!   `O_CREAT|O_EXCL|O_NOFOLLOW`);
//! - past the byte or entry limit the caller gives.
//!
//! So nothing is ever written outside the destination, whatever the archive holds.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

/// Why packing or unpacking failed.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("archive entry {entry:?} refused: {reason}")]
    Unsafe { entry: String, reason: String },
    #[error("{what} hold more than the {limit} byte limit")]
    TooLarge { what: String, limit: u64 },
    #[error("archive has more than {limit} entries")]
    TooManyEntries { limit: u64 },
    #[error("{path} already exists; pass --force to overwrite it")]
    Exists { path: PathBuf },
    #[error("not a valid tar archive: {0}")]
    Corrupt(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ArchiveError + '_ {
    move |source| ArchiveError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn unsafe_entry(entry: &Path, reason: impl Into<String>) -> ArchiveError {
    ArchiveError::Unsafe {
        entry: entry.display().to_string(),
        reason: reason.into(),
    }
}

/// What kind of entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    Hardlink,
}

/// One entry of an archive, as listed or unpacked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Relative path, normalized (no `.` components).
    pub path: PathBuf,
    pub kind: EntryKind,
    /// Content bytes (regular files; 0 otherwise).
    pub bytes: u64,
}

/// Totals of an archive.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Regular files (hard links included).
    pub files: u64,
    /// Content bytes of the regular files.
    pub bytes: u64,
    /// Every entry, in archive order.
    pub entries: Vec<Entry>,
}

/// The entry's path made relative and checked: no root, no prefix, no `..`; `.` dropped.
pub fn safe_relative(raw: &Path) -> Result<PathBuf, ArchiveError> {
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir => return Err(unsafe_entry(raw, "its path contains \"..\"")),
            Component::RootDir | Component::Prefix(_) => {
                return Err(unsafe_entry(raw, "its path is absolute"))
            }
        }
    }
    if out.as_os_str().is_empty() {
        return Err(unsafe_entry(raw, "its path is empty"));
    }
    Ok(out)
}

/// Whether a symlink at `link` (relative to the destination) pointing at `target` stays inside
/// the destination, resolving the target lexically from the link's directory.
pub fn symlink_stays_inside(link: &Path, target: &Path) -> bool {
    if target.is_absolute() || target.as_os_str().is_empty() {
        return false;
    }
    let mut depth = link.components().count().saturating_sub(1) as i64;
    for c in target.components() {
        match c {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => {
                depth -= 1;
                if depth < 0 {
                    return false;
                }
            }
            Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    true
}

/// Builds an archive entry by entry.
pub struct Packer<W: Write> {
    builder: tar::Builder<W>,
    files: u64,
    bytes: u64,
    max_bytes: u64,
}

impl<W: Write> std::fmt::Debug for Packer<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Packer")
            .field("files", &self.files)
            .field("bytes", &self.bytes)
            .finish()
    }
}

/// A reader that fails unless exactly `left` bytes come out of it.
struct Exact<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let want = buf.len().min(self.left.min(usize::MAX as u64) as usize);
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the file shrank while it was being packed",
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

fn header(kind: tar::EntryType, mode: u32, size: u64, mtime: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode & 0o777);
    h.set_size(size);
    h.set_mtime(mtime);
    h.set_uid(0);
    h.set_gid(0);
    h
}

impl<W: Write> Packer<W> {
    /// A packer writing to `out` that refuses to pack more than `max_bytes` of file content.
    pub fn new(out: W, max_bytes: u64) -> Self {
        let mut builder = tar::Builder::new(out);
        builder.mode(tar::HeaderMode::Deterministic);
        builder.follow_symlinks(false);
        Packer {
            builder,
            files: 0,
            bytes: 0,
            max_bytes,
        }
    }

    /// Files and content bytes packed so far.
    pub fn totals(&self) -> (u64, u64) {
        (self.files, self.bytes)
    }

    /// Pack the regular file `src` as `name`. `src` itself must not be a symlink.
    pub fn add_file(&mut self, src: &Path, name: &Path) -> Result<u64, ArchiveError> {
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(src)
            .map_err(io_err(src))?;
        let meta = file.metadata().map_err(io_err(src))?;
        if !meta.is_file() {
            return Err(ArchiveError::Io {
                path: src.to_path_buf(),
                source: io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"),
            });
        }
        let len = meta.len();
        if self.bytes.saturating_add(len) > self.max_bytes {
            return Err(ArchiveError::TooLarge {
                what: "the files".into(),
                limit: self.max_bytes,
            });
        }
        let mut h = header(
            tar::EntryType::Regular,
            meta.mode(),
            len,
            meta.mtime().max(0) as u64,
        );
        let data = Exact {
            inner: file,
            left: len,
        };
        self.builder
            .append_data(&mut h, name, data)
            .map_err(io_err(src))?;
        self.files += 1;
        self.bytes += len;
        Ok(len)
    }

    /// A directory entry `name`.
    pub fn add_dir(&mut self, name: &Path, mode: u32) -> Result<(), ArchiveError> {
        let mut h = header(tar::EntryType::Directory, mode | 0o700, 0, 0);
        self.builder
            .append_data(&mut h, name, io::empty())
            .map_err(io_err(name))
    }

    /// A symlink entry `name` → `target`.
    pub fn add_symlink(&mut self, name: &Path, target: &Path) -> Result<(), ArchiveError> {
        let mut h = header(tar::EntryType::Symlink, 0o777, 0, 0);
        self.builder
            .append_link(&mut h, name, target)
            .map_err(io_err(name))
    }

    /// Write the end of the archive; returns the writer.
    pub fn finish(self) -> Result<W, ArchiveError> {
        self.builder
            .into_inner()
            .map_err(|e| ArchiveError::Corrupt(format!("cannot finish the archive: {e}")))
    }
}

/// A symlink inside a packed tree that was left out, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub path: PathBuf,
    pub reason: String,
}

/// Pack the directory `src` as `name` and everything beneath it, without following symlinks:
/// a symlink is packed as a symlink when its target stays inside the packed tree and skipped
/// (listed in the result) otherwise. Entries go in sorted order, so the same tree packs to the
/// same bytes.
pub fn pack_tree<W: Write>(
    packer: &mut Packer<W>,
    src: &Path,
    name: &Path,
) -> Result<Vec<Skipped>, ArchiveError> {
    let mut skipped = Vec::new();
    let meta = fs::symlink_metadata(src).map_err(io_err(src))?;
    packer.add_dir(name, meta.mode())?;
    let mut stack = vec![(src.to_path_buf(), name.to_path_buf(), PathBuf::new())];
    while let Some((dir, arch, rel)) = stack.pop() {
        let mut items: Vec<_> = fs::read_dir(&dir)
            .map_err(io_err(&dir))?
            .collect::<Result<_, _>>()
            .map_err(io_err(&dir))?;
        items.sort_by_key(|e| e.file_name());
        let mut subdirs = Vec::new();
        for item in items {
            let path = item.path();
            let kind = item.file_type().map_err(io_err(&path))?;
            let arch_path = arch.join(item.file_name());
            let rel_path = rel.join(item.file_name());
            if kind.is_dir() {
                let meta = fs::symlink_metadata(&path).map_err(io_err(&path))?;
                packer.add_dir(&arch_path, meta.mode())?;
                subdirs.push((path, arch_path, rel_path));
            } else if kind.is_file() {
                packer.add_file(&path, &arch_path)?;
            } else if kind.is_symlink() {
                let target = fs::read_link(&path).map_err(io_err(&path))?;
                if symlink_stays_inside(&rel_path, &target) {
                    packer.add_symlink(&arch_path, &target)?;
                } else {
                    skipped.push(Skipped {
                        path,
                        reason: format!(
                            "symlink to {} leaves the shipped directory",
                            target.display()
                        ),
                    });
                }
            } else {
                skipped.push(Skipped {
                    path,
                    reason: "not a regular file, directory or symlink".into(),
                });
            }
        }
        // Reverse so the stack pops them in sorted order.
        stack.extend(subdirs.into_iter().rev());
    }
    Ok(skipped)
}

/// Limits and behaviour of [`unpack`].
#[derive(Debug, Clone, Copy)]
pub struct UnpackOptions {
    /// Replace existing files (never directories); otherwise an existing file is an error.
    pub overwrite: bool,
    /// Most content bytes to write.
    pub max_bytes: u64,
    /// Most entries to accept.
    pub max_entries: u64,
}

/// Read the whole archive and check it as [`unpack`] would, writing nothing. Refuses unsafe
/// paths, special files, and archives past the limits.
pub fn list<R: Read>(r: R, max_bytes: u64, max_entries: u64) -> Result<Summary, ArchiveError> {
    walk(r, max_bytes, max_entries, |_, _| Ok(()))
}

/// Unpack `r` into the existing directory `dest` (see the module doc for what is refused).
/// Stops at the first refused entry; entries before it stay written.
pub fn unpack<R: Read>(r: R, dest: &Path, opts: UnpackOptions) -> Result<Summary, ArchiveError> {
    let meta = fs::symlink_metadata(dest).map_err(io_err(dest))?;
    if !meta.is_dir() {
        return Err(ArchiveError::Io {
            path: dest.to_path_buf(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "not a directory"),
        });
    }
    walk(r, opts.max_bytes, opts.max_entries, |e, entry| {
        write_entry(dest, e, entry, opts.overwrite)
    })
}

fn walk<R: Read>(
    r: R,
    max_bytes: u64,
    max_entries: u64,
    mut each: impl FnMut(&Entry, &mut tar::Entry<'_, R>) -> Result<(), ArchiveError>,
) -> Result<Summary, ArchiveError> {
    let mut archive = tar::Archive::new(r);
    let mut summary = Summary::default();
    let corrupt = |e: io::Error| ArchiveError::Corrupt(e.to_string());
    for entry in archive.entries().map_err(corrupt)? {
        let mut entry = entry.map_err(corrupt)?;
        if summary.entries.len() as u64 >= max_entries {
            return Err(ArchiveError::TooManyEntries { limit: max_entries });
        }
        let raw = entry.path().map_err(corrupt)?.into_owned();
        let path = safe_relative(&raw)?;
        let kind = match entry.header().entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous => EntryKind::File,
            tar::EntryType::Directory => EntryKind::Dir,
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(corrupt)?
                    .map(|t| t.into_owned())
                    .unwrap_or_default();
                if !symlink_stays_inside(&path, &target) {
                    return Err(unsafe_entry(
                        &raw,
                        format!(
                            "it is a symlink to {}, outside the destination",
                            target.display()
                        ),
                    ));
                }
                EntryKind::Symlink
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(corrupt)?
                    .map(|t| t.into_owned())
                    .unwrap_or_default();
                safe_relative(&target).map_err(|_| {
                    unsafe_entry(
                        &raw,
                        format!(
                            "it is a hard link to {}, outside the destination",
                            target.display()
                        ),
                    )
                })?;
                EntryKind::Hardlink
            }
            other => {
                return Err(unsafe_entry(
                    &raw,
                    format!("it is a special file ({other:?}); only files, directories and links are unpacked"),
                ))
            }
        };
        let bytes = if kind == EntryKind::File {
            entry.size()
        } else {
            0
        };
        if summary.bytes.saturating_add(bytes) > max_bytes {
            return Err(ArchiveError::TooLarge {
                what: "the archive's files".into(),
                limit: max_bytes,
            });
        }
        let e = Entry { path, kind, bytes };
        each(&e, &mut entry)?;
        if matches!(kind, EntryKind::File | EntryKind::Hardlink) {
            summary.files += 1;
        }
        summary.bytes += bytes;
        summary.entries.push(e);
    }
    Ok(summary)
}

/// Create every missing parent of `rel` under `dest` as a real directory; refuse to go
/// through anything that is not one (a symlink above all).
fn real_parents(dest: &Path, rel: &Path, create: bool) -> Result<(), ArchiveError> {
    let mut at = dest.to_path_buf();
    let Some(parent) = rel.parent() else {
        return Ok(());
    };
    for c in parent.components() {
        at.push(c);
        match fs::symlink_metadata(&at) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(unsafe_entry(
                    rel,
                    format!(
                        "{} is not a real directory (a symlink or a file); nothing is written through it",
                        at.display()
                    ),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                fs::create_dir(&at).map_err(io_err(&at))?
            }
            Err(e) => return Err(ArchiveError::Io { path: at, source: e }),
        }
    }
    Ok(())
}

/// Make room for a new non-directory at `path`: an error if something is there, unless
/// `overwrite` and it is not a directory.
fn clear(path: &Path, overwrite: bool) -> Result<(), ArchiveError> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ArchiveError::Io {
            path: path.to_path_buf(),
            source: e,
        }),
        Ok(m) if m.is_dir() => Err(ArchiveError::Exists {
            path: path.to_path_buf(),
        }),
        Ok(_) if overwrite => fs::remove_file(path).map_err(io_err(path)),
        Ok(_) => Err(ArchiveError::Exists {
            path: path.to_path_buf(),
        }),
    }
}

fn write_entry<R: Read>(
    dest: &Path,
    e: &Entry,
    entry: &mut tar::Entry<'_, R>,
    overwrite: bool,
) -> Result<(), ArchiveError> {
    real_parents(dest, &e.path, true)?;
    let path = dest.join(&e.path);
    let mode = entry.header().mode().unwrap_or(0o644) & 0o777;
    match e.kind {
        EntryKind::Dir => match fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => Ok(()),
            Ok(_) => Err(unsafe_entry(
                &e.path,
                "a file or symlink of that name is already there",
            )),
            Err(_) => {
                fs::create_dir(&path).map_err(io_err(&path))?;
                fs::set_permissions(&path, fs::Permissions::from_mode(mode | 0o700))
                    .map_err(io_err(&path))
            }
        },
        EntryKind::File => {
            clear(&path, overwrite)?;
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(nix::libc::O_NOFOLLOW)
                .open(&path)
                .map_err(io_err(&path))?;
            let copied = io::copy(&mut entry.take(e.bytes), &mut file).map_err(io_err(&path))?;
            if copied != e.bytes {
                return Err(ArchiveError::Corrupt(format!(
                    "{} ends after {copied} of {} bytes",
                    e.path.display(),
                    e.bytes
                )));
            }
            file.set_permissions(fs::Permissions::from_mode(mode))
                .map_err(io_err(&path))
        }
        EntryKind::Symlink => {
            clear(&path, overwrite)?;
            let target = entry
                .link_name()
                .map_err(|e| ArchiveError::Corrupt(e.to_string()))?
                .unwrap_or_default();
            std::os::unix::fs::symlink(&target, &path).map_err(io_err(&path))
        }
        EntryKind::Hardlink => {
            clear(&path, overwrite)?;
            let raw = entry
                .link_name()
                .map_err(|e| ArchiveError::Corrupt(e.to_string()))?
                .unwrap_or_default()
                .into_owned();
            let target = safe_relative(&raw)?;
            real_parents(dest, &target, false)?;
            let source = dest.join(&target);
            match fs::symlink_metadata(&source) {
                Ok(m) if m.is_file() => fs::hard_link(&source, &path).map_err(io_err(&path)),
                _ => Err(unsafe_entry(
                    &e.path,
                    format!(
                        "it is a hard link to {}, which is not a file unpacked before it",
                        raw.display()
                    ),
                )),
            }
        }
    }
}

/// Open `path` for reading without following a symlink at its last component.
pub fn open_nofollow(path: &Path) -> Result<File, ArchiveError> {
    OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
        .map_err(io_err(path))
}

#[cfg(test)]
#[path = "archive_tests.rs"]
mod tests;
