//! What both ends of a TLS client leg need: reading PEM certificate chains and keys with errors
//! that name the file, and certificate pins.
//!
//! A pin is `sha256:` and the hex SHA-256 of a certificate's SubjectPublicKeyInfo (its public
//! key, not the whole certificate), so a certificate renewed with the same key keeps its pin.
//! The client-proxy logs the pin of the certificate it serves at start and on every reload.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use std::path::Path;

/// The crypto provider of every TLS config ferry builds (aws-lc-rs: rustls's default, with
/// the post-quantum hybrid key exchange preferred).
pub fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Every certificate in a PEM file, in order (the end-entity first in a chain file).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read certificates from {}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("bad certificate PEM in {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("no certificate in {}", path.display()));
    }
    Ok(certs)
}

/// The private key in a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| format!("cannot read a private key from {}: {e}", path.display()))
}

/// The pin of a certificate: `sha256:` + hex SHA-256 of its SubjectPublicKeyInfo.
pub fn pin_of(cert: &CertificateDer<'_>) -> Result<String, String> {
    let parsed = rustls::server::ParsedCertificate::try_from(cert)
        .map_err(|e| format!("cannot parse the certificate: {e}"))?;
    let spki = parsed.subject_public_key_info();
    Ok(format!(
        "sha256:{}",
        hex::encode(Sha256::digest(spki.as_ref()))
    ))
}

/// Checks a pin's form (`sha256:` and 64 hex digits) and returns it in lower case.
pub fn parse_pin(s: &str) -> Result<String, String> {
    let t = s.trim();
    let hex_part = t.strip_prefix("sha256:").ok_or_else(|| {
        format!("bad pin {t:?}: expected sha256:<64 hex digits> (see ferry-proxy's start log)")
    })?;
    if hex_part.len() != 64 || !hex_part.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "bad pin {t:?}: expected sha256:<64 hex digits> (see ferry-proxy's start log)"
        ));
    }
    Ok(format!("sha256:{}", hex_part.to_ascii_lowercase()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_have_one_form() {
        let h = "Ab".repeat(32);
        assert_eq!(
            parse_pin(&format!(" sha256:{h} ")).unwrap(),
            format!("sha256:{}", h.to_lowercase())
        );
        for bad in [
            "",
            "sha256:",
            "sha1:00",
            &format!("sha256:{}", "g".repeat(64)),
            &h,
        ] {
            assert!(parse_pin(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn missing_and_empty_files_are_named() {
        let dir = std::env::temp_dir().join(format!("ferry-tls-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let e = load_certs(&empty).unwrap_err();
        assert!(
            e.contains("no certificate in") && e.contains("empty.pem"),
            "{e}"
        );
        let e = load_key(&dir.join("absent.pem")).unwrap_err();
        assert!(e.contains("absent.pem"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
