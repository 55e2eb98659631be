//! Enrollment and renewal material: a worker makes its key and a certificate signing request
//! (CSR) locally, so no private key ever travels; the coordinator signs the CSR with the fleet
//! CA ([`Signer`]). Also the CA fingerprint a new worker pins, the self-signed certificate it
//! presents on the enrollment connection, and the rustls configs for that connection.

use std::path::Path;
use std::sync::Arc;

use drover_protocol::Role;
use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType, KeyPair, SanType,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use time::{Duration, OffsetDateTime};

use super::files::{self, CertInfo};
use super::issue::{check_name, leaf_params, leaf_sans, Ca};
use super::{CertRequest, PkiError, Validity, BACKDATE, ENROLL_ALPN};

/// Subject CN of the self-signed certificate a worker presents while enrolling.
pub const ENROLL_CN: &str = "drover-enrollment";

/// A private key made here and a CSR for it, both PEM.
#[derive(Debug, Clone)]
pub struct KeyAndCsr {
    pub key_pem: String,
    pub csr_pem: String,
}

/// Make a new ECDSA P-256 key and a CSR whose subject CN is `name`.
pub fn make_csr(name: &str) -> Result<KeyAndCsr, PkiError> {
    check_name(name)?;
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|source| {
        PkiError::Generate {
            action: "generate a key",
            source,
        }
    })?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    let csr = params
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(|source| PkiError::Generate {
            action: "make a certificate signing request",
            source,
        })?;
    Ok(KeyAndCsr {
        key_pem: key.serialize_pem(),
        csr_pem: csr,
    })
}

/// The subject CN a CSR asks for, after checking its signature (proof that the sender holds
/// the key).
pub fn csr_name(csr_pem: &str) -> Result<String, PkiError> {
    let csr = CertificateSigningRequestParams::from_pem(csr_pem)
        .map_err(|source| PkiError::BadCsr { source })?;
    csr.params
        .distinguished_name
        .get(&DnType::CommonName)
        .and_then(s_of)
        .ok_or(PkiError::BadCsr {
            source: rcgen::Error::CouldNotParseCertificationRequest,
        })
}

fn s_of(v: &rcgen::DnValue) -> Option<String> {
    match v {
        rcgen::DnValue::Utf8String(s) => Some(s.clone()),
        rcgen::DnValue::PrintableString(s) => Some(s.as_str().to_owned()),
        rcgen::DnValue::Ia5String(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// SHA-256 of a certificate's DER, lowercase hex: the CA fingerprint workers pin, and the
/// key of the coordinator's revocation list.
pub fn fingerprint(der: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, der).as_ref())
}

/// Parse a SHA-256 fingerprint as an operator may paste it: 64 hex digits, upper or lower case,
/// optionally separated by colons and prefixed with `sha256:`. `None` if it is not one.
pub fn parse_fingerprint(s: &str) -> Option<String> {
    let s = s.trim();
    let s = s.strip_prefix("sha256:").unwrap_or(s);
    let hex: String = s.chars().filter(|c| *c != ':').collect();
    (hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit())).then(|| hex.to_lowercase())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A certificate the coordinator signed.
#[derive(Debug, Clone)]
pub struct Issued {
    pub name: String,
    pub cert_pem: String,
    /// [`fingerprint`] of the certificate.
    pub fingerprint: String,
    /// Serial number, hex.
    pub serial: String,
    pub not_after: OffsetDateTime,
}

/// The fleet CA, loaded for signing worker CSRs (the coordinator's side of enrollment and
/// renewal).
pub struct Signer {
    ca: Ca,
    ca_pem: String,
    fingerprint: String,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("ca", &self.ca.cert_path)
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// Load the CA certificate (first in `cert`) and its key.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, PkiError> {
        let ca = Ca::load_files(cert, key)?;
        let der = files::load_certs(cert)?.remove(0);
        let ca_pem = String::from_utf8_lossy(&files::read(cert)?).into_owned();
        Ok(Self {
            fingerprint: fingerprint(&der),
            ca,
            ca_pem,
        })
    }

    /// The CA certificate file's text (PEM; several CAs while rotating).
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The CA's [`fingerprint`].
    pub fn ca_fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Sign a worker certificate named `name` for the key in `csr_pem` (whose signature is
    /// checked), valid for `lifetime` from `now`. `notBefore` is set back by a quarter of the
    /// lifetime (at most [`BACKDATE`]) for peers whose clock runs a little behind.
    pub fn sign_worker(
        &self,
        csr_pem: &str,
        name: &str,
        lifetime: std::time::Duration,
        now: OffsetDateTime,
    ) -> Result<Issued, PkiError> {
        check_name(name)?;
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|source| PkiError::BadCsr { source })?;
        let lifetime = Duration::try_from(lifetime).unwrap_or(Duration::days(1));
        let backdate: Duration = (lifetime / 4_i32).min(BACKDATE);
        let not_before = now - backdate;
        let not_after = (now + lifetime).min(self.ca.info.not_after);
        let req = CertRequest {
            role: Role::Worker,
            name: name.to_owned(),
            validity: Validity::Window {
                not_before,
                not_after,
            },
            extra_sans: vec![],
        };
        let sans: Vec<SanType> = leaf_sans(&req)?;
        let signed = CertificateSigningRequestParams {
            params: leaf_params(&req, sans, not_before, not_after),
            public_key: csr.public_key,
        }
        .signed_by(&self.ca.issuer, &self.ca.key)
        .map_err(|source| PkiError::Generate {
            action: "sign the worker certificate",
            source,
        })?;
        let der = signed.der().to_vec();
        let serial = {
            use x509_parser::prelude::*;
            X509Certificate::from_der(&der)
                .map(|(_, c)| c.raw_serial_as_string().replace(':', ""))
                .unwrap_or_default()
        };
        Ok(Issued {
            name: name.to_owned(),
            cert_pem: signed.pem(),
            fingerprint: fingerprint(&der),
            serial,
            not_after,
        })
    }
}

/// Whether `der` is the self-signed enrollment certificate a worker presents while enrolling:
/// subject = issuer with CN [`ENROLL_CN`], and a valid signature by its own key.
pub fn is_enrollment_cert(der: &[u8]) -> bool {
    use x509_parser::prelude::*;
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return false;
    };
    let cn_ok = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        == Some(ENROLL_CN);
    cn_ok
        && cert.subject().as_raw() == cert.issuer().as_raw()
        && cert.verify_signature(None).is_ok()
}

/// Client config for the enrollment connection: presents a self-signed certificate over the
/// worker's new key (`key_pem`), ALPN [`ENROLL_ALPN`], and accepts the server only if the
/// chain it presents includes a CA certificate with the pinned SHA-256 `ca_fingerprint` and
/// the server's certificate is a coordinator certificate issued by that CA.
pub fn enroll_client_config(key_pem: &str, ca_fingerprint: &str) -> Result<ClientConfig, PkiError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let key = KeyPair::from_pem(key_pem).map_err(|source| PkiError::Generate {
        action: "load the new key",
        source,
    })?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, ENROLL_CN);
    params.distinguished_name = dn;
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + Duration::hours(1);
    let cert = params
        .self_signed(&key)
        .map_err(|source| PkiError::Generate {
            action: "make the enrollment certificate",
            source,
        })?;
    let verifier = PinnedCa {
        fingerprint: ca_fingerprint.to_owned(),
        provider: provider.clone(),
    };
    let key_der = PrivateKeyDer::try_from(key.serialize_der()).map_err(|_| PkiError::Tls {
        source: rustls::Error::General("cannot encode the new key".into()),
    })?;
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| PkiError::Tls { source })?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(vec![cert.der().clone()], key_der)
        .map_err(|source| PkiError::Tls { source })?;
    config.alpn_protocols = vec![ENROLL_ALPN.to_vec()];
    Ok(config)
}

/// Trusts exactly the CA with the pinned fingerprint, taken from the chain the server sends.
#[derive(Debug)]
struct PinnedCa {
    fingerprint: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| fingerprint(c) == self.fingerprint)
            .ok_or_else(|| {
                rustls::Error::General(format!(
                    "the coordinator's CA does not have the pinned fingerprint {}; check \
                     ca_fingerprint (drover token create prints it) and the coordinator address",
                    self.fingerprint
                ))
            })?;
        if !CertInfo::parse(Path::new("<coordinator CA>"), ca).is_ok_and(|i| i.is_ca) {
            return Err(rustls::Error::General(
                "the pinned certificate is not a CA certificate".into(),
            ));
        }
        let mut roots = RootCertStore::empty();
        roots
            .add(ca.clone().into_owned())
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        let inner =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{create_ca, CA_CERT_FILE, CA_KEY_FILE};

    fn signer(dir: &Path) -> Signer {
        create_ca(dir, "t").unwrap();
        Signer::load(&dir.join(CA_CERT_FILE), &dir.join(CA_KEY_FILE)).unwrap()
    }

    #[test]
    fn csr_round_trip_signs_a_worker_certificate() {
        use rustls::pki_types::pem::PemObject;
        let dir = tempfile::tempdir().unwrap();
        let s = signer(dir.path());
        let m = make_csr("pi-7").unwrap();
        assert_eq!(csr_name(&m.csr_pem).unwrap(), "pi-7");
        let now = OffsetDateTime::now_utc();
        let issued = s
            .sign_worker(&m.csr_pem, "pi-7", std::time::Duration::from_secs(40), now)
            .unwrap();
        // The certificate carries the worker role and the name, for the key in the CSR.
        let der =
            rustls::pki_types::CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap();
        let id = drover_protocol::identity::parse_identity(&der).unwrap();
        assert_eq!((id.name.as_str(), id.role), ("pi-7", Role::Worker));
        let info = CertInfo::parse(Path::new("x"), &der).unwrap();
        let key = KeyPair::from_pem(&m.key_pem).unwrap();
        assert_eq!(info.spki, key.public_key_der());
        // Short lifetimes are backdated by a quarter, not 5 minutes.
        assert_eq!(
            info.not_after.unix_timestamp(),
            (now + Duration::seconds(40)).unix_timestamp()
        );
        assert_eq!(
            info.not_before.unix_timestamp(),
            (now - Duration::seconds(10)).unix_timestamp()
        );
        assert_eq!(issued.fingerprint, fingerprint(&der));
    }

    #[test]
    fn a_tampered_csr_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = signer(dir.path());
        let m = make_csr("w").unwrap();
        // A CSR whose signature does not match its key proves nothing: refused.
        use rustls::pki_types::pem::PemObject;
        let der =
            rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(m.csr_pem.as_bytes())
                .unwrap();
        let mut bytes = der.as_ref().to_vec();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01;
        assert!(CertificateSigningRequestParams::from_der(&bytes.into()).is_err());
        assert!(s
            .sign_worker(
                "garbage",
                "w",
                std::time::Duration::from_secs(60),
                OffsetDateTime::now_utc()
            )
            .is_err());
        assert!(csr_name("not a csr").is_err());
    }

    #[test]
    fn fingerprints_parse_in_common_spellings() {
        let fp = "ab".repeat(32);
        assert_eq!(parse_fingerprint(&fp.to_uppercase()), Some(fp.clone()));
        let colons: Vec<String> = (0..32).map(|_| "AB".to_owned()).collect();
        assert_eq!(
            parse_fingerprint(&format!("sha256:{}", colons.join(":"))),
            Some(fp)
        );
        assert_eq!(parse_fingerprint("abc"), None);
    }

    #[test]
    fn enrollment_certificate_is_recognised() {
        let m = make_csr("w").unwrap();
        let config = enroll_client_config(&m.key_pem, &"00".repeat(32)).unwrap();
        assert_eq!(config.alpn_protocols, vec![ENROLL_ALPN.to_vec()]);
        let dir = tempfile::tempdir().unwrap();
        create_ca(dir.path(), "t").unwrap();
        let ca = files::load_certs(&dir.path().join(CA_CERT_FILE)).unwrap();
        assert!(
            !is_enrollment_cert(&ca[0]),
            "a CA is not an enrollment certificate"
        );
    }
}
