//! Fuzz the certificate and CSR decoders that see network input: the identity (role and name)
//! read from every TLS peer certificate (`drover_protocol::identity::parse_identity`), and the
//! certificate signing requests enrolling and renewing workers send (parsed with rcgen's
//! x509-parser, as `drover::pki::csr_name` does), from DER and from PEM.

#![no_main]

use libfuzzer_sys::fuzz_target;
use rcgen::CertificateSigningRequestParams;

fuzz_target!(|data: &[u8]| {
    if let Ok(id) = drover_protocol::identity::parse_identity(data) {
        assert!(!id.name.is_empty());
    }
    let der = rustls_pki_types::CertificateSigningRequestDer::from(data.to_vec());
    let _ = CertificateSigningRequestParams::from_der(&der);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = CertificateSigningRequestParams::from_pem(text);
    }
});
