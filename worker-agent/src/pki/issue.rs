//! Creating the fleet CA and issuing leaf certificates from it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use drover_protocol::identity::{role_uri, valid_name, COORDINATOR_SERVER_NAME};
use drover_protocol::Role;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use time::{Duration, OffsetDateTime};

use super::files::{self, CertInfo, CERT_MODE, KEY_MODE};
use super::{
    CaPaths, CertPaths, CertRequest, PkiError, Validity, BACKDATE, CA_CERT_FILE, CA_KEY_FILE,
    CA_VALIDITY_DAYS,
};

/// Mode of a CA directory this creates: only the owner may list the CA key.
const CA_DIR_MODE: u32 = 0o700;
/// Mode of an output directory this creates; the keys inside are 0600 on their own.
const OUT_DIR_MODE: u32 = 0o755;

/// Create a new fleet CA in `dir` (created with mode 0700 if missing): an ECDSA P-256 key and a
/// self-signed certificate with CA:TRUE (path length 0), key usages keyCertSign and cRLSign,
/// valid for [`CA_VALIDITY_DAYS`] and named `drover fleet CA <name>`. Writes [`CA_CERT_FILE`]
/// (0644) and [`CA_KEY_FILE`] (0600).
///
/// Refuses if either file already exists: replacing a CA invalidates every certificate it
/// issued, so that is left to a deliberate `rm`.
pub fn create_ca(dir: &Path, name: &str) -> Result<CaPaths, PkiError> {
    check_name(name)?;
    let paths = CaPaths {
        cert: dir.join(CA_CERT_FILE),
        key: dir.join(CA_KEY_FILE),
    };
    for path in [&paths.key, &paths.cert] {
        if path.symlink_metadata().is_ok() {
            return Err(PkiError::CaExists { path: path.clone() });
        }
    }
    files::ensure_dir(dir, CA_DIR_MODE)?;

    let key = generate_key("generate the CA key")?;
    let now = OffsetDateTime::now_utc();
    let params = ca_params(
        &format!("drover fleet CA {name}"),
        now - BACKDATE,
        now + Duration::days(CA_VALIDITY_DAYS.into()),
    );
    let cert = params
        .self_signed(&key)
        .map_err(|source| PkiError::Generate {
            action: "sign the CA certificate",
            source,
        })?;

    files::write_new(&paths.key, key.serialize_pem().as_bytes(), KEY_MODE, false).map_err(|e| {
        match e {
            PkiError::FileExists { path } => PkiError::CaExists { path },
            e => e,
        }
    })?;
    if let Err(e) = files::write_new(&paths.cert, cert.pem().as_bytes(), CERT_MODE, false) {
        // Without its certificate the new key is useless and would block a retry.
        let _ = std::fs::remove_file(&paths.key);
        return Err(match e {
            PkiError::FileExists { path } => PkiError::CaExists { path },
            e => e,
        });
    }
    tracing::info!(cert = %paths.cert.display(), key = %paths.key.display(), "created fleet CA");
    Ok(paths)
}

/// Issue a leaf certificate signed by the CA in `ca_dir`, writing `<out_dir>/<name>.crt` (0644)
/// and `<out_dir>/<name>.key` (0600). `out_dir` is created (0755) if missing.
///
/// The leaf has an ECDSA P-256 key, CN = name, the SAN URI `role_uri(role)`, key usage
/// digitalSignature and extended key usage clientAuth; coordinator certificates also get
/// serverAuth and the SANs DNS `drover-coordinator` ([`COORDINATOR_SERVER_NAME`]), DNS
/// `localhost`, IP 127.0.0.1 and ::1, and their name (as DNS name or IP address, when it is
/// one). `extra_sans` are added for every role.
///
/// Refuses to replace existing files unless `overwrite`; nothing is written then.
pub fn issue_cert(
    ca_dir: &Path,
    out_dir: &Path,
    req: &CertRequest,
    overwrite: bool,
) -> Result<CertPaths, PkiError> {
    check_name(&req.name)?;
    let (not_before, not_after) = window(&req.validity, OffsetDateTime::now_utc())?;
    let sans = leaf_sans(req)?;
    let ca = Ca::load(ca_dir)?;
    if not_after > ca.info.not_after {
        tracing::warn!(
            ca = %ca.cert_path.display(),
            "certificate for {:?} is valid until {not_after}, but the fleet CA expires at {}; \
             it will stop working then",
            req.name,
            ca.info.not_after,
        );
    }

    let paths = CertPaths {
        cert: out_dir.join(format!("{}.crt", req.name)),
        key: out_dir.join(format!("{}.key", req.name)),
    };
    if !overwrite {
        for path in [&paths.key, &paths.cert] {
            if path.symlink_metadata().is_ok() {
                return Err(PkiError::FileExists { path: path.clone() });
            }
        }
    }
    files::ensure_dir(out_dir, OUT_DIR_MODE)?;

    let key = generate_key("generate the certificate key")?;
    let params = leaf_params(req, sans, not_before, not_after);
    let cert = params
        .signed_by(&key, &ca.issuer, &ca.key)
        .map_err(|source| PkiError::Generate {
            action: "sign the certificate",
            source,
        })?;
    // webpki chains by comparing the issuer name bytes to the CA's subject bytes; the issuer
    // here is rebuilt from the CA's CN, so make sure it came out identical.
    if CertInfo::parse(&paths.cert, cert.der())?.issuer != ca.info.subject {
        return Err(PkiError::NotIssuedByCa {
            cert: paths.cert,
            ca: ca.cert_path,
        });
    }

    files::write_new(
        &paths.key,
        key.serialize_pem().as_bytes(),
        KEY_MODE,
        overwrite,
    )?;
    if let Err(e) = files::write_new(&paths.cert, cert.pem().as_bytes(), CERT_MODE, overwrite) {
        if !overwrite {
            let _ = std::fs::remove_file(&paths.key);
        }
        return Err(e);
    }
    tracing::info!(
        name = %req.name,
        role = %req.role,
        cert = %paths.cert.display(),
        %not_after,
        "issued certificate"
    );
    Ok(paths)
}

/// The fleet CA loaded for signing.
pub(super) struct Ca {
    pub(super) cert_path: PathBuf,
    pub(super) info: CertInfo,
    pub(super) key: KeyPair,
    /// rcgen signs with an issuer `Certificate`; only its subject name and key identifier
    /// method are used, so one rebuilt from the CA's CN and key serves.
    pub(super) issuer: rcgen::Certificate,
}

impl Ca {
    fn load(dir: &Path) -> Result<Self, PkiError> {
        Self::load_files(&dir.join(CA_CERT_FILE), &dir.join(CA_KEY_FILE))
    }

    /// Load the CA certificate (its first certificate) and its key from two files.
    pub(super) fn load_files(cert_path: &Path, key_path: &Path) -> Result<Self, PkiError> {
        let (cert_path, key_path) = (cert_path.to_path_buf(), key_path.to_path_buf());
        let certs = files::load_certs(&cert_path)?;
        let info = CertInfo::parse(&cert_path, &certs[0])?;
        if !info.is_ca {
            return Err(PkiError::NotACa { path: cert_path });
        }
        let now = OffsetDateTime::now_utc();
        if info.not_after < now {
            return Err(PkiError::Expired {
                path: cert_path,
                not_after: info.not_after,
            });
        }
        let key =
            KeyPair::try_from(&files::load_key(&key_path)?).map_err(|source| PkiError::BadKey {
                path: key_path.clone(),
                source,
            })?;
        if key.public_key_der() != info.spki {
            return Err(PkiError::KeyMismatch {
                cert: cert_path,
                key: key_path,
            });
        }
        let cn = info
            .common_name
            .clone()
            .ok_or_else(|| PkiError::BadCertificate {
                path: cert_path.clone(),
                reason: "the CA certificate has no subject common name".into(),
            })?;
        let issuer = ca_params(&cn, info.not_before, info.not_after)
            .self_signed(&key)
            .map_err(|source| PkiError::Generate {
                action: "load the CA for signing",
                source,
            })?;
        Ok(Ca {
            cert_path,
            info,
            key,
            issuer,
        })
    }
}

pub(super) fn check_name(name: &str) -> Result<(), PkiError> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(PkiError::InvalidName {
            name: name.to_owned(),
        })
    }
}

fn generate_key(action: &'static str) -> Result<KeyPair, PkiError> {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
        .map_err(|source| PkiError::Generate { action, source })
}

/// `(not_before, not_after)` for `validity`, relative to `now`.
fn window(
    validity: &Validity,
    now: OffsetDateTime,
) -> Result<(OffsetDateTime, OffsetDateTime), PkiError> {
    match *validity {
        Validity::Days(0) => Err(PkiError::ZeroDays),
        Validity::Days(days) => Ok((now - BACKDATE, now + Duration::days(days.into()))),
        Validity::Window {
            not_before,
            not_after,
        } if not_after <= not_before => Err(PkiError::EmptyWindow {
            not_before,
            not_after,
        }),
        Validity::Window {
            not_before,
            not_after,
        } => Ok((not_before, not_after)),
    }
}

fn ca_params(cn: &str, not_before: OffsetDateTime, not_after: OffsetDateTime) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = common_name(cn);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = not_before;
    params.not_after = not_after;
    params.serial_number = Some(random_serial());
    params
}

pub(super) fn leaf_params(
    req: &CertRequest,
    sans: Vec<SanType>,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = common_name(&req.name);
    params.is_ca = IsCa::ExplicitNoCa;
    params.subject_alt_names = sans;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = match req.role {
        Role::Coordinator => vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
        Role::Worker | Role::Operator => vec![ExtendedKeyUsagePurpose::ClientAuth],
    };
    params.use_authority_key_identifier_extension = true;
    params.not_before = not_before;
    params.not_after = not_after;
    params.serial_number = Some(random_serial());
    params
}

fn common_name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

/// 128 random bits, positive (RFC 5280 serials are positive and at most 20 bytes).
fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f;
    SerialNumber::from_slice(&bytes)
}

/// The SANs of a leaf for `req`, role URI first, without duplicates.
pub(super) fn leaf_sans(req: &CertRequest) -> Result<Vec<SanType>, PkiError> {
    let mut sans = vec![SanType::URI(ia5(&role_uri(req.role))?)];
    if req.role == Role::Coordinator {
        sans.push(SanType::DnsName(ia5(COORDINATOR_SERVER_NAME)?));
        sans.push(SanType::DnsName(ia5("localhost")?));
        sans.push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        sans.push(SanType::IpAddress(IpAddr::V6(Ipv6Addr::LOCALHOST)));
        if let Ok(ip) = req.name.parse::<IpAddr>() {
            sans.push(SanType::IpAddress(ip));
        } else if is_dns_name(&req.name) {
            sans.push(SanType::DnsName(ia5(&req.name)?));
        }
    }
    for extra in &req.extra_sans {
        let san = if let Ok(ip) = extra.parse::<IpAddr>() {
            SanType::IpAddress(ip)
        } else if is_dns_name(extra.strip_prefix("*.").unwrap_or(extra)) {
            SanType::DnsName(ia5(extra)?)
        } else {
            return Err(PkiError::InvalidSan { san: extra.clone() });
        };
        sans.push(san);
    }
    let mut unique = Vec::with_capacity(sans.len());
    for san in sans {
        if !unique.contains(&san) {
            unique.push(san);
        }
    }
    Ok(unique)
}

fn ia5(s: &str) -> Result<rcgen::Ia5String, PkiError> {
    rcgen::Ia5String::try_from(s).map_err(|_| PkiError::InvalidSan { san: s.to_owned() })
}

/// A host name as RFC 1123 allows it: dot-separated labels of letters, digits and inner
/// hyphens, each 1-63 characters, at most 253 in all.
fn is_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_names() {
        assert!(is_dns_name("coord-1.example"));
        assert!(is_dns_name("localhost"));
        assert!(!is_dns_name("under_score"));
        assert!(!is_dns_name("-x"));
        assert!(!is_dns_name("a..b"));
        assert!(!is_dns_name(""));
    }

    #[test]
    fn validity_windows() {
        let now = OffsetDateTime::now_utc();
        assert!(matches!(
            window(&Validity::Days(0), now),
            Err(PkiError::ZeroDays)
        ));
        let (nb, na) = window(&Validity::Days(2), now).expect("window");
        assert_eq!(nb, now - BACKDATE);
        assert_eq!(na, now + Duration::days(2));
        let w = Validity::Window {
            not_before: now,
            not_after: now,
        };
        assert!(matches!(window(&w, now), Err(PkiError::EmptyWindow { .. })));
    }

    #[test]
    fn worker_sans_are_role_and_extras_only() {
        let req = CertRequest {
            role: Role::Worker,
            name: "w_1".into(),
            validity: Validity::Days(1),
            extra_sans: vec![
                "10.0.0.5".into(),
                "*.fleet.example".into(),
                "10.0.0.5".into(),
            ],
        };
        let sans = leaf_sans(&req).expect("sans");
        assert_eq!(sans.len(), 3);
        let bad = CertRequest {
            extra_sans: vec!["not a host".into()],
            ..req
        };
        assert!(matches!(leaf_sans(&bad), Err(PkiError::InvalidSan { .. })));
    }
}
