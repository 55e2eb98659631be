//! Who may join the fleet and which certificates are refused: join tokens (stored hashed,
//! single- or multi-use, expiring), failed-enrollment rate limits, the certificates this
//! coordinator issued (enrollment, renewal) and the revocation list.
//!
//! [`Trust`] is plain state fed with the time as a parameter; each change returns the
//! [`TrustWrite`]s the runtime queues in the store. [`service`] is the thin async shell used
//! by the connection tasks: it signs with the CA and waits for writes to be durable.
//!
//! Invariants: a token's secret never leaves [`Trust::create_token`] except in its return
//! value (only `SHA-256(secret)` is kept, compared in constant time); a token's use is counted
//! before the certificate it pays for is sent; a revoked name stays refused until
//! [`Trust::reinstate`], and the certificates issued to it before stay refused for good.

pub mod limiter;
pub mod service;

use drover_protocol::TokenInfo;
use limiter::{Limited, Limiter};
use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;

/// A join token as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    pub id: String,
    /// SHA-256 of the secret part.
    pub hash: Vec<u8>,
    pub label: Option<String>,
    pub name: Option<String>,
    pub max_uses: u32,
    pub uses: u32,
    pub created_ms: u64,
    pub expires_ms: u64,
    pub revoked: bool,
}

impl TokenRecord {
    pub fn info(&self) -> TokenInfo {
        TokenInfo {
            id: self.id.clone(),
            label: self.label.clone(),
            name: self.name.clone(),
            max_uses: self.max_uses,
            uses: self.uses,
            created_ms: self.created_ms,
            expires_ms: self.expires_ms,
            revoked: self.revoked,
        }
    }
}

/// A certificate this coordinator signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedRecord {
    pub fingerprint: String,
    pub name: String,
    pub serial: String,
    pub not_after_ms: u64,
    pub issued_ms: u64,
    pub revoked_ms: Option<u64>,
}

/// A change to persist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrustWrite {
    /// Insert or replace a token.
    Token(TokenRecord),
    Issued(IssuedRecord),
    /// Revoke a name and every certificate issued to it.
    RevokeName {
        name: String,
        at_ms: u64,
    },
    ReinstateName {
        name: String,
    },
}

/// What the store holds, loaded at start-up.
#[derive(Debug, Default, Clone)]
pub struct LoadedTrust {
    pub tokens: Vec<TokenRecord>,
    pub issued: Vec<IssuedRecord>,
    pub revoked_names: Vec<(String, u64)>,
}

/// Why an enrollment was refused. The worker sees [`EnrollRefusal::to_string`]; an attempt with a
/// wrong or unknown token learns nothing about which tokens exist.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnrollRefusal {
    #[error("too many failed enrollment attempts from this address; retry in {}s", retry_after_ms.div_ceil(1000))]
    RateLimited { retry_after_ms: u64 },
    #[error("too many failed enrollment attempts; retry in {}s", retry_after_ms.div_ceil(1000))]
    GloballyLimited { retry_after_ms: u64 },
    #[error("join token not accepted; check it, or ask the operator for a new one (drover token create)")]
    NotAccepted,
    #[error("join token expired; ask the operator for a new one (drover token create)")]
    Expired,
    #[error("join token already used up; ask the operator for a new one (drover token create)")]
    UsedUp,
    #[error("join token revoked; ask the operator for a new one (drover token create)")]
    Revoked,
    #[error("worker name {name:?} is revoked; the operator must reinstate it first (drover worker reinstate {name})")]
    NameRevoked { name: String },
    #[error("a worker named {name:?} already exists; give this host another name, or have the operator make a token for that name (drover token create --name {name})")]
    NameTaken { name: String },
    #[error("invalid worker name {name:?}: {rule}")]
    BadName { name: String, rule: &'static str },
    #[error("the certificate signing request is not valid: {0}")]
    BadCsr(String),
    #[error("this coordinator cannot sign certificates (no CA key configured: tls.ca_key); ask the operator")]
    NoCaKey,
    #[error("the coordinator could not store the enrollment: {0}; retry")]
    Store(String),
    #[error("unsupported protocol version: {0}")]
    Version(String),
}

impl EnrollRefusal {
    /// Whether this counts as a failed attempt for the rate limits (a guess at a token).
    fn counts(&self) -> bool {
        matches!(
            self,
            EnrollRefusal::NotAccepted
                | EnrollRefusal::Expired
                | EnrollRefusal::UsedUp
                | EnrollRefusal::Revoked
        )
    }
}

/// A token the caller presented and that was accepted (its use is counted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redeemed {
    pub token_id: String,
    /// The name to issue: the token's, else the requested one.
    pub name: String,
    /// Whether the token named the worker (then an existing worker of that name is replaced).
    pub named_by_token: bool,
    pub write: TrustWrite,
}

/// Length of the public id (hex digits) and of the secret (bytes, hex-encoded in the token).
const ID_BYTES: usize = 6;
const SECRET_BYTES: usize = 32;

#[derive(Debug)]
pub struct Trust {
    tokens: BTreeMap<String, TokenRecord>,
    issued: BTreeMap<String, IssuedRecord>,
    revoked_names: BTreeMap<String, u64>,
    revoked_certs: HashSet<String>,
    limiter: Limiter,
}

impl Trust {
    pub fn restore(loaded: LoadedTrust, now_ms: u64) -> Self {
        let mut revoked_certs = HashSet::new();
        let mut issued = BTreeMap::new();
        for rec in loaded.issued {
            if rec.revoked_ms.is_some() {
                revoked_certs.insert(rec.fingerprint.clone());
            }
            issued.insert(rec.fingerprint.clone(), rec);
        }
        Self {
            tokens: loaded
                .tokens
                .into_iter()
                .map(|t| (t.id.clone(), t))
                .collect(),
            issued,
            revoked_names: loaded.revoked_names.into_iter().collect(),
            revoked_certs,
            limiter: Limiter::new(limiter::PER_SOURCE, limiter::GLOBAL, now_ms),
        }
    }

    /// Replace the rate limits (tests use small ones).
    pub fn set_limits(&mut self, per_source: limiter::Rate, global: limiter::Rate, now_ms: u64) {
        self.limiter = Limiter::new(per_source, global, now_ms);
    }

    /// Make a token; returns it (`<id>.<secret>`, shown once) and what to store.
    pub fn create_token(
        &mut self,
        now_ms: u64,
        ttl_ms: u64,
        max_uses: u32,
        label: Option<String>,
        name: Option<String>,
        rng: &mut impl rand::RngCore,
    ) -> (String, TokenRecord, TrustWrite) {
        let mut id_bytes = [0u8; ID_BYTES];
        let mut secret = [0u8; SECRET_BYTES];
        loop {
            rng.fill_bytes(&mut id_bytes);
            if !self.tokens.contains_key(&hex(&id_bytes)) {
                break;
            }
        }
        rng.fill_bytes(&mut secret);
        let id = hex(&id_bytes);
        let secret = hex(&secret);
        let rec = TokenRecord {
            id: id.clone(),
            hash: sha256(secret.as_bytes()),
            label,
            name,
            max_uses: max_uses.max(1),
            uses: 0,
            created_ms: now_ms,
            expires_ms: now_ms.saturating_add(ttl_ms),
            revoked: false,
        };
        self.tokens.insert(id.clone(), rec.clone());
        (
            format!("{id}.{secret}"),
            rec.clone(),
            TrustWrite::Token(rec),
        )
    }

    /// Check a presented token from `source` asking for `requested_name`, and count its use.
    /// Failures are rate limited per source and globally; the caller logs them.
    pub fn redeem(
        &mut self,
        now_ms: u64,
        source: IpAddr,
        token: &str,
        requested_name: &str,
    ) -> Result<Redeemed, EnrollRefusal> {
        match self.limiter.check(now_ms, source) {
            Ok(()) => {}
            Err(Limited::Source { retry_after_ms }) => {
                return Err(EnrollRefusal::RateLimited { retry_after_ms })
            }
            Err(Limited::Global { retry_after_ms }) => {
                return Err(EnrollRefusal::GloballyLimited { retry_after_ms })
            }
        }
        let result = self.check_token(now_ms, token, requested_name);
        if let Err(e) = &result {
            if e.counts() {
                self.limiter.failed(now_ms, source);
            }
        }
        result
    }

    fn check_token(
        &mut self,
        now_ms: u64,
        token: &str,
        requested_name: &str,
    ) -> Result<Redeemed, EnrollRefusal> {
        let (id, secret) = token
            .trim()
            .split_once('.')
            .ok_or(EnrollRefusal::NotAccepted)?;
        let rec = self.tokens.get(id).ok_or(EnrollRefusal::NotAccepted)?;
        if !constant_time_eq(&rec.hash, &sha256(secret.as_bytes())) {
            return Err(EnrollRefusal::NotAccepted);
        }
        if rec.revoked {
            return Err(EnrollRefusal::Revoked);
        }
        if now_ms >= rec.expires_ms {
            return Err(EnrollRefusal::Expired);
        }
        if rec.uses >= rec.max_uses {
            return Err(EnrollRefusal::UsedUp);
        }
        let name = rec
            .name
            .clone()
            .unwrap_or_else(|| requested_name.to_owned());
        if !drover_protocol::identity::valid_name(&name) {
            return Err(EnrollRefusal::BadName {
                name,
                rule: drover_protocol::identity::NAME_RULE,
            });
        }
        if self.revoked_names.contains_key(&name) {
            return Err(EnrollRefusal::NameRevoked { name });
        }
        let named_by_token = rec.name.is_some();
        let rec = self.tokens.get_mut(id).expect("checked above");
        rec.uses += 1;
        Ok(Redeemed {
            token_id: rec.id.clone(),
            name,
            named_by_token,
            write: TrustWrite::Token(rec.clone()),
        })
    }

    /// Give a use back (the certificate could not be issued after all).
    pub fn unredeem(&mut self, token_id: &str) -> Option<TrustWrite> {
        let rec = self.tokens.get_mut(token_id)?;
        rec.uses = rec.uses.saturating_sub(1);
        Some(TrustWrite::Token(rec.clone()))
    }

    /// Remember a certificate this coordinator signed.
    pub fn record_issued(&mut self, rec: IssuedRecord) -> TrustWrite {
        self.issued.insert(rec.fingerprint.clone(), rec.clone());
        TrustWrite::Issued(rec)
    }

    /// Tokens still usable (not expired, used up or revoked), oldest first.
    pub fn tokens(&self, now_ms: u64) -> Vec<TokenInfo> {
        let mut list: Vec<TokenInfo> = self
            .tokens
            .values()
            .filter(|t| !t.revoked && t.expires_ms > now_ms && t.uses < t.max_uses)
            .map(TokenRecord::info)
            .collect();
        list.sort_by_key(|t| t.created_ms);
        list
    }

    /// Revoke a token; `None` if there is no such token, `Some(None)` if it already was.
    pub fn revoke_token(&mut self, id: &str) -> Option<Option<TrustWrite>> {
        let rec = self.tokens.get_mut(id)?;
        if rec.revoked {
            return Some(None);
        }
        rec.revoked = true;
        Some(Some(TrustWrite::Token(rec.clone())))
    }

    /// Revoke a worker name: its certificates (any, by name) are refused from now on, and the
    /// ones this coordinator issued to it stay refused even after [`Trust::reinstate`].
    /// Returns whether it changed, how many issued certificates it covers, and the write.
    pub fn revoke_name(&mut self, now_ms: u64, name: &str) -> (bool, u32, Option<TrustWrite>) {
        let mut count = 0;
        for rec in self.issued.values_mut().filter(|r| r.name == name) {
            count += 1;
            if rec.revoked_ms.is_none() {
                rec.revoked_ms = Some(now_ms);
                self.revoked_certs.insert(rec.fingerprint.clone());
            }
        }
        if self.revoked_names.contains_key(name) {
            return (false, count, None);
        }
        self.revoked_names.insert(name.to_owned(), now_ms);
        let write = TrustWrite::RevokeName {
            name: name.to_owned(),
            at_ms: now_ms,
        };
        (true, count, Some(write))
    }

    /// Let a revoked name enroll again (explicit operator action).
    pub fn reinstate(&mut self, name: &str) -> Option<TrustWrite> {
        self.revoked_names.remove(name)?;
        Some(TrustWrite::ReinstateName {
            name: name.to_owned(),
        })
    }

    pub fn is_name_revoked(&self, name: &str) -> bool {
        self.revoked_names.contains_key(name)
    }

    /// Why a certificate of `name` with `fingerprint` must be refused, if it must.
    pub fn refusal(&self, name: &str, fingerprint: &str) -> Option<String> {
        if self.revoked_certs.contains(fingerprint) {
            return Some(format!("certificate {fingerprint} of {name:?} is revoked"));
        }
        if self.revoked_names.contains_key(name) {
            return Some(format!("worker {name:?} is revoked"));
        }
        None
    }
}

pub fn sha256(data: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .to_vec()
}

/// Equality whose time does not depend on where the inputs differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests;
