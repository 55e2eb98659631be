//! Task secrets on the coordinator: stored encrypted at rest, handed only to the worker that
//! runs an attempt whose spec grants them, and masked in every event a worker sends.
//!
//! Encryption: AES-256-GCM (ring) under the coordinator's secrets key — 32 random bytes in
//! `secrets_key` (default `<state_dir>/secrets.key`, mode 0600, made on first start). Each
//! value gets a fresh random 96-bit nonce, and the secret's name is the associated data, so a
//! ciphertext moved to another name does not decrypt. The database holds only ciphertexts; the
//! values live in this process's memory (the coordinator needs them for every assignment that
//! grants one and for masking events).
//!
//! [`Secrets`] is cheap to clone (shared state). Changes are durable before they are
//! answered, like everything else in the store; the in-memory view changes with them.

use crate::store::{Durable, Store};
use drover_protocol::secrets::{check_secret_name, MAX_SECRET_BYTES, MIN_SECRET_BYTES};
use drover_protocol::task::TaskSpec;
use drover_protocol::{
    ErrorKind, OperatorRequest, OperatorResponse, Secret, SecretInfo, SecretValue,
};
use drover_worker::redact::Redactor;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// File name of the secrets key in the state directory (when `secrets_key` is not set).
pub const KEY_FILE: &str = "secrets.key";
const KEY_LEN: usize = 32;
const AAD_PREFIX: &str = "drover-secret-v1:";

/// Why the secrets key cannot be used (a start-up error: exit 64 naming the file).
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("secrets key {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("secrets key {} holds {len} bytes, not {KEY_LEN}; restore the right file (or, losing every stored secret, remove it)", path.display())]
    Length { path: PathBuf, len: usize },
}

/// A secret as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSecret {
    pub name: String,
    pub nonce: Vec<u8>,
    pub ciphertext: Vec<u8>,
    pub created_ms: u64,
    pub updated_ms: u64,
    pub version: u32,
}

/// A change to the secrets table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretWrite {
    Put(StoredSecret),
    Delete(String),
}

/// The key, loaded (or made) at start-up.
pub struct SecretsKey(LessSafeKey);

impl std::fmt::Debug for SecretsKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretsKey(<redacted>)")
    }
}

impl SecretsKey {
    /// Read the key at `path`, or make one there (mode 0600) if there is none.
    pub fn load_or_create(path: &Path) -> Result<SecretsKey, KeyError> {
        let io = |source| KeyError::Io {
            path: path.into(),
            source,
        };
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut key = [0u8; KEY_LEN];
                SystemRandom::new()
                    .fill(&mut key)
                    .map_err(|_| io(std::io::Error::other("no randomness")))?;
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(io)?;
                }
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(io)?;
                f.write_all(&key).and_then(|()| f.sync_all()).map_err(io)?;
                tracing::info!(path = %path.display(), "made a new secrets key; back it up with the database");
                key.to_vec()
            }
            Err(e) => return Err(io(e)),
        };
        if bytes.len() != KEY_LEN {
            return Err(KeyError::Length {
                path: path.into(),
                len: bytes.len(),
            });
        }
        if let Ok(meta) = std::fs::metadata(path) {
            if meta.permissions().mode() & 0o077 != 0 {
                tracing::warn!(path = %path.display(), "the secrets key is readable by others; chmod 600 it");
            }
        }
        let key = UnboundKey::new(&AES_256_GCM, &bytes).expect("32 bytes is an AES-256 key");
        Ok(SecretsKey(LessSafeKey::new(key)))
    }

    fn seal(&self, name: &str, value: &str) -> (Vec<u8>, Vec<u8>) {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .expect("the system's randomness works");
        let mut data = value.as_bytes().to_vec();
        self.0
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(format!("{AAD_PREFIX}{name}")),
                &mut data,
            )
            .expect("sealing a bounded value cannot fail");
        (nonce.to_vec(), data)
    }

    fn open(&self, s: &StoredSecret) -> Option<String> {
        let nonce = Nonce::try_assume_unique_for_key(&s.nonce).ok()?;
        let mut data = s.ciphertext.clone();
        let plain = self
            .0
            .open_in_place(
                nonce,
                Aad::from(format!("{AAD_PREFIX}{}", s.name)),
                &mut data,
            )
            .ok()?;
        String::from_utf8(plain.to_vec()).ok()
    }
}

struct Entry {
    stored: StoredSecret,
    /// `None`: the ciphertext does not open under this key.
    value: Option<Secret>,
}

struct State {
    key: SecretsKey,
    entries: BTreeMap<String, Entry>,
    /// Masks every stored value; rebuilt on each change.
    redactor: Arc<Redactor>,
}

impl State {
    fn rebuild(&mut self) {
        self.redactor =
            Arc::new(Redactor::new(self.entries.iter().filter_map(|(n, e)| {
                e.value.as_ref().map(|v| (n.as_str(), v.expose()))
            })));
    }
}

/// The coordinator's secrets; shared by the core (assignments, submit checks) and the
/// connections (operator requests, masking events).
#[derive(Clone)]
pub struct Secrets {
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secrets")
            .field("names", &self.lock().entries.keys().collect::<Vec<_>>())
            .finish()
    }
}

fn info(s: &StoredSecret) -> SecretInfo {
    SecretInfo {
        name: s.name.clone(),
        created_ms: s.created_ms,
        updated_ms: s.updated_ms,
        version: s.version,
    }
}

impl Secrets {
    /// From the stored rows; a row that does not decrypt under `key` is kept (and named in
    /// the log) but unusable until set again.
    pub fn restore(key: SecretsKey, rows: Vec<StoredSecret>) -> Secrets {
        let secrets = Secrets {
            state: Arc::new(Mutex::new(State {
                key,
                entries: BTreeMap::new(),
                redactor: Arc::new(Redactor::new([])),
            })),
        };
        secrets.load(rows);
        secrets
    }

    /// Replace the in-memory view with the stored rows (once the database is open).
    pub fn load(&self, rows: Vec<StoredSecret>) {
        let mut state = self.lock();
        let mut entries = BTreeMap::new();
        for stored in rows {
            let value = state.key.open(&stored).map(Secret);
            if value.is_none() {
                tracing::error!(
                    secret = %stored.name,
                    "stored secret does not decrypt with this secrets key (wrong or replaced \
                     key file?); tasks granting it will fail until `drover secret set` stores it again"
                );
            }
            entries.insert(stored.name.clone(), Entry { stored, value });
        }
        state.entries = entries;
        state.rebuild();
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What masks every stored value (cheap to clone; empty when none is stored).
    pub fn redactor(&self) -> Arc<Redactor> {
        self.lock().redactor.clone()
    }

    /// The first secret `spec` grants that is not stored (or cannot be decrypted).
    pub fn missing(&self, spec: &TaskSpec) -> Option<String> {
        let state = self.lock();
        spec.secrets
            .iter()
            .find(|g| state.entries.get(&g.name).is_none_or(|e| e.value.is_none()))
            .map(|g| g.name.clone())
    }

    /// The values `spec` grants, for an assignment; missing ones are left out (the worker
    /// then fails the attempt, naming the secret).
    pub fn values_for(&self, spec: &TaskSpec) -> Vec<SecretValue> {
        if spec.secrets.is_empty() {
            return Vec::new();
        }
        let state = self.lock();
        spec.secrets
            .iter()
            .filter_map(|g| {
                let value = state.entries.get(&g.name)?.value.clone()?;
                Some(SecretValue {
                    name: g.name.clone(),
                    value,
                })
            })
            .collect()
    }

    /// Answer a secrets request; `None` for other requests.
    pub async fn operator(
        &self,
        store: &Store,
        operator: &str,
        req: &OperatorRequest,
    ) -> Option<OperatorResponse> {
        let now = crate::clock::wall_ms();
        let bad = |message: String| OperatorResponse::Error {
            kind: ErrorKind::InvalidRequest,
            message,
        };
        let (answer, write) = match req {
            OperatorRequest::SetSecret { name, value } => {
                if let Err(why) = check_secret_name(name) {
                    return Some(bad(why));
                }
                let len = value.expose().len();
                if !(MIN_SECRET_BYTES..=MAX_SECRET_BYTES).contains(&len) {
                    return Some(bad(format!(
                        "the value of {name:?} has {len} bytes; secrets are {MIN_SECRET_BYTES} to \
                         {MAX_SECRET_BYTES} bytes (shorter ones would mask ordinary text in every event)"
                    )));
                }
                let (answer, write) = self.set(now, name, value.expose());
                tracing::info!(%operator, secret = %name, "secret set");
                (answer, write)
            }
            OperatorRequest::ListSecrets => {
                let list = self
                    .lock()
                    .entries
                    .values()
                    .map(|e| info(&e.stored))
                    .collect();
                return Some(OperatorResponse::Secrets(list));
            }
            OperatorRequest::RemoveSecret { name } => {
                let removed = self.lock().entries.contains_key(name);
                if !removed {
                    return Some(OperatorResponse::SecretRemoved {
                        name: name.clone(),
                        changed: false,
                    });
                }
                tracing::info!(%operator, secret = %name, "secret removed");
                (
                    OperatorResponse::SecretRemoved {
                        name: name.clone(),
                        changed: true,
                    },
                    SecretWrite::Delete(name.clone()),
                )
            }
            _ => return None,
        };
        let durable: Durable = store.put_secrets(vec![write.clone()]);
        match durable.await {
            Ok(Ok(())) => {
                self.apply(write);
                Some(answer)
            }
            Ok(Err(e)) => Some(OperatorResponse::Error {
                kind: ErrorKind::Internal,
                message: e,
            }),
            Err(_) => Some(OperatorResponse::Error {
                kind: ErrorKind::Internal,
                message: "database writer stopped".into(),
            }),
        }
    }

    /// The write and answer for setting `name` (applied once durable).
    fn set(&self, now: u64, name: &str, value: &str) -> (OperatorResponse, SecretWrite) {
        let state = self.lock();
        let (nonce, ciphertext) = state.key.seal(name, value);
        let old = state.entries.get(name).map(|e| &e.stored);
        let stored = StoredSecret {
            name: name.to_owned(),
            nonce,
            ciphertext,
            created_ms: old.map_or(now, |o| o.created_ms),
            updated_ms: now,
            version: old.map_or(1, |o| o.version.saturating_add(1)),
        };
        let answer = OperatorResponse::SecretSet {
            info: info(&stored),
            created: old.is_none(),
        };
        (answer, SecretWrite::Put(stored))
    }

    fn apply(&self, write: SecretWrite) {
        let mut state = self.lock();
        match write {
            SecretWrite::Put(stored) => {
                let value = state.key.open(&stored).map(Secret);
                state
                    .entries
                    .insert(stored.name.clone(), Entry { stored, value });
            }
            SecretWrite::Delete(name) => {
                state.entries.remove(&name);
            }
        }
        state.rebuild();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(dir: &Path) -> SecretsKey {
        SecretsKey::load_or_create(&dir.join(KEY_FILE)).unwrap()
    }

    #[test]
    fn key_file_is_made_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join(KEY_FILE);
        let _ = SecretsKey::load_or_create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let first = std::fs::read(&path).unwrap();
        let _ = SecretsKey::load_or_create(&path).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), first);
        std::fs::write(&path, b"short").unwrap();
        let err = SecretsKey::load_or_create(&path).unwrap_err().to_string();
        assert!(
            err.contains("5 bytes") && err.contains("secrets.key"),
            "{err}"
        );
    }

    #[test]
    fn sealed_values_open_only_under_their_name_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let k = key(dir.path());
        let (nonce, ciphertext) = k.seal("gh", "value-of-the-secret");
        assert!(!ciphertext
            .windows(b"value-of".len())
            .any(|w| w == b"value-of"));
        let stored = StoredSecret {
            name: "gh".into(),
            nonce,
            ciphertext,
            created_ms: 1,
            updated_ms: 1,
            version: 1,
        };
        assert_eq!(k.open(&stored).as_deref(), Some("value-of-the-secret"));
        let moved = StoredSecret {
            name: "other".into(),
            ..stored.clone()
        };
        assert_eq!(k.open(&moved), None);
        let other_dir = tempfile::tempdir().unwrap();
        assert_eq!(key(other_dir.path()).open(&stored), None);
        // A restore with the wrong key keeps the row but grants nothing.
        let s = Secrets::restore(key(other_dir.path()), vec![stored]);
        let spec: TaskSpec = serde_json::from_value(serde_json::json!({
            "name": "t", "command": ["true"],
            "secrets": [{"name": "gh", "hosts": ["h"], "header": "Authorization", "scheme": "bearer"}],
        }))
        .unwrap();
        assert_eq!(s.missing(&spec).as_deref(), Some("gh"));
        assert!(s.values_for(&spec).is_empty());
    }

    #[test]
    fn set_then_apply_grants_and_masks() {
        let dir = tempfile::tempdir().unwrap();
        let s = Secrets::restore(key(dir.path()), Vec::new());
        assert!(s.redactor().is_empty());
        let (answer, write) = s.set(5, "gh", "ghp_abcdefghijkl");
        assert!(matches!(
            answer,
            OperatorResponse::SecretSet { created: true, .. }
        ));
        s.apply(write);
        let spec: TaskSpec = serde_json::from_value(serde_json::json!({
            "name": "t", "command": ["true"],
            "secrets": [{"name": "gh", "hosts": ["h"], "header": "Authorization", "scheme": "bearer"}],
        }))
        .unwrap();
        assert_eq!(s.missing(&spec), None);
        assert_eq!(s.values_for(&spec)[0].value.expose(), "ghp_abcdefghijkl");
        assert_eq!(
            s.redactor().redact_str("x ghp_abcdefghijkl y"),
            "x [REDACTED:gh] y"
        );
        let (answer, write) = s.set(9, "gh", "ghp_second-value");
        match answer {
            OperatorResponse::SecretSet { info, created } => {
                assert!(!created);
                assert_eq!((info.created_ms, info.updated_ms, info.version), (5, 9, 2));
            }
            other => panic!("{other:?}"),
        }
        s.apply(write);
        s.apply(SecretWrite::Delete("gh".into()));
        assert_eq!(s.missing(&spec).as_deref(), Some("gh"));
    }
}
