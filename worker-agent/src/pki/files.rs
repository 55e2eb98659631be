//! File I/O for PEM material: loading certificates and keys, and writing new files with the
//! right mode from the start.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use time::OffsetDateTime;

use super::PkiError;

/// Mode of private key files.
pub(super) const KEY_MODE: u32 = 0o600;
/// Mode of certificate files.
pub(super) const CERT_MODE: u32 = 0o644;

/// Read all PEM `CERTIFICATE` sections of `path`, in order (leaf first for a chain file).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| pem_error(path, "certificate", source))?;
    if certs.is_empty() {
        return Err(pem_error(
            path,
            "certificate",
            rustls::pki_types::pem::Error::NoItemsFound,
        ));
    }
    Ok(certs)
}

/// Read the first PEM private key of `path` (PKCS#8, SEC1 or PKCS#1).
///
/// A key file that group or others can read still loads, with a warning that names the file
/// and the fix: refusing would turn a permissions slip into an outage.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, PkiError> {
    warn_if_key_exposed(path);
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|source| pem_error(path, "private key", source))
}

/// When the certificate in `path` (its first, for a chain) stops being valid.
pub fn cert_not_after(path: &Path) -> Result<OffsetDateTime, PkiError> {
    let certs = load_certs(path)?;
    Ok(CertInfo::parse(path, &certs[0])?.not_after)
}

/// The validity window `(notBefore, notAfter)` of the certificate in `path` (its first).
pub fn cert_window(path: &Path) -> Result<(OffsetDateTime, OffsetDateTime), PkiError> {
    let certs = load_certs(path)?;
    let info = CertInfo::parse(path, &certs[0])?;
    Ok((info.not_before, info.not_after))
}

/// The parts of a parsed certificate this module looks at.
#[derive(Debug)]
pub(super) struct CertInfo {
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    pub is_ca: bool,
    /// DER SubjectPublicKeyInfo.
    pub spki: Vec<u8>,
    /// DER subject and issuer names, compared byte for byte (as webpki does) to check chaining.
    pub subject: Vec<u8>,
    pub issuer: Vec<u8>,
    pub common_name: Option<String>,
}

impl CertInfo {
    pub fn parse(path: &Path, der: &[u8]) -> Result<Self, PkiError> {
        use x509_parser::prelude::*;
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| PkiError::BadCertificate {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        let validity = cert.validity();
        let common_name = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned);
        Ok(CertInfo {
            not_before: validity.not_before.to_datetime(),
            not_after: validity.not_after.to_datetime(),
            is_ca: cert.is_ca(),
            spki: cert.public_key().raw.to_vec(),
            subject: cert.subject().as_raw().to_vec(),
            issuer: cert.issuer().as_raw().to_vec(),
            common_name,
        })
    }
}

/// Write `contents` to `path` with `mode`. Without `overwrite`, an existing file is an error
/// ([`PkiError::FileExists`]) and the check is atomic (`O_EXCL`). With `overwrite`, the new
/// content goes to a temporary file that is renamed over `path`, so the result always has
/// `mode` (truncating an existing file would keep its old, maybe looser, mode) and a crash
/// leaves either the old or the new file.
///
/// Key files get their mode at creation; `umask` can only narrow it. Certificate files are
/// public and additionally set to exactly [`CERT_MODE`] so a strict umask does not hide them
/// from the service user.
pub(super) fn write_new(
    path: &Path,
    contents: &[u8],
    mode: u32,
    overwrite: bool,
) -> Result<(), PkiError> {
    if !overwrite {
        let file = open_new(path, mode).map_err(|source| {
            if source.kind() == std::io::ErrorKind::AlreadyExists {
                PkiError::FileExists {
                    path: path.to_owned(),
                }
            } else {
                io_error("create", path, source)
            }
        })?;
        if let Err(e) = fill(file, path, contents, mode) {
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
        sync_parent(path);
        return Ok(());
    }
    let tmp = temp_path(path);
    let file = open_new(&tmp, mode).map_err(|source| io_error("create", &tmp, source))?;
    let written = fill(file, &tmp, contents, mode).and_then(|()| {
        std::fs::rename(&tmp, path).map_err(|source| io_error("replace", path, source))
    });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    sync_parent(path);
    Ok(())
}

/// Install a key (mode 0600) and its certificate (0644) made elsewhere (enrollment, renewal),
/// replacing what is there: each file is written to a temporary file and renamed over the old
/// one, the key first. Missing parent directories are created (0755).
pub fn install_leaf(
    key: &Path,
    key_pem: &str,
    cert: &Path,
    cert_pem: &str,
) -> Result<(), PkiError> {
    for p in [key, cert] {
        if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            ensure_dir(dir, 0o755)?;
        }
    }
    write_new(key, key_pem.as_bytes(), KEY_MODE, true)?;
    write_new(cert, cert_pem.as_bytes(), CERT_MODE, true)
}

/// Install the fleet CA certificate (0644), replacing what is there.
pub fn install_ca(path: &Path, pem: &str) -> Result<(), PkiError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        ensure_dir(dir, 0o755)?;
    }
    write_new(path, pem.as_bytes(), CERT_MODE, true)
}

/// Create `dir` (and missing parents) if needed; a directory this creates gets `mode`.
pub(super) fn ensure_dir(dir: &Path, mode: u32) -> Result<(), PkiError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)
        .map_err(|source| io_error("create directory", dir, source))
}

pub(super) fn read(path: &Path) -> Result<Vec<u8>, PkiError> {
    std::fs::read(path).map_err(|source| io_error("read", path, source))
}

pub(super) fn io_error(action: &'static str, path: &Path, source: std::io::Error) -> PkiError {
    PkiError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

fn pem_error(path: &Path, what: &'static str, source: rustls::pki_types::pem::Error) -> PkiError {
    PkiError::Pem {
        path: path.to_owned(),
        what,
        source,
    }
}

fn warn_if_key_exposed(path: &Path) {
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format_args!("{mode:o}"),
                "private key {} is readable by group or others; run `chmod 600 {}`",
                path.display(),
                path.display(),
            );
        }
    }
}

fn open_new(path: &Path, mode: u32) -> std::io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
}

fn fill(mut file: File, path: &Path, contents: &[u8], mode: u32) -> Result<(), PkiError> {
    if mode == CERT_MODE {
        // fchmod on the handle we created: only widens a umask-narrowed public file.
        file.set_permissions(std::fs::Permissions::from_mode(CERT_MODE))
            .map_err(|source| io_error("set permissions of", path, source))?;
    }
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(|source| io_error("write", path, source))
}

fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let suffix: u64 = rand::random();
    path.with_file_name(format!(".{name}.{}.{suffix:x}.tmp", std::process::id()))
}

/// Make a new directory entry durable. Best effort: some filesystems cannot fsync directories.
fn sync_parent(path: &Path) {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if let Ok(dir) = File::open(parent) {
        let _ = dir.sync_all();
    }
}
