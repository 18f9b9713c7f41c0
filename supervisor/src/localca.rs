//! The local CA of `ferry demo` and `ferry cluster up`: a fresh CA, and one certificate it signs
//! for the client-proxies (valid for `localhost` and the addresses they listen on), so the local
//! cluster's client leg runs on TLS the way a deployment's does. The CA's key is never written:
//! nothing else is ever signed with it.

use ferry_client::error::{ClientError, Result};
use ferry_proxy::config::TlsConfig;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

/// Where the generated files are.
#[derive(Debug, Clone)]
pub struct LocalCa {
    /// The CA certificate: what clients trust (`--ca`, config `ca`).
    pub ca: PathBuf,
    /// The client-proxies' certificate and its key (`[tls] cert`, `key`).
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl LocalCa {
    /// Makes the CA and the proxies' certificate in `dir` (created), for `localhost` and `ips`.
    pub fn make(dir: &Path, ips: &[IpAddr]) -> Result<LocalCa> {
        let fail =
            |what: &str, e: rcgen::Error| ClientError::Cluster(format!("local CA: {what}: {e}"));
        let ca_key = KeyPair::generate().map_err(|e| fail("CA key", e))?;
        let mut ca_params =
            CertificateParams::new(Vec::<String>::new()).map_err(|e| fail("CA", e))?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        // A name of its own: two local CAs never pass for each other's issuer.
        let tag: u64 = rand::random();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, format!("ferry local CA {tag:016x}"));
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca_params.self_signed(&ca_key).map_err(|e| fail("CA", e))?;
        let issuer = Issuer::new(ca_params, ca_key);

        let mut names = vec!["localhost".to_string()];
        names.extend(ips.iter().map(|ip| ip.to_string()));
        names.dedup();
        let key = KeyPair::generate().map_err(|e| fail("proxy key", e))?;
        let mut params = CertificateParams::new(names).map_err(|e| fail("proxy names", e))?;
        params
            .distinguished_name
            .push(DnType::CommonName, "ferry client-proxy");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(|e| fail("proxy certificate", e))?;

        std::fs::create_dir_all(dir)
            .map_err(|e| ClientError::io(format!("creating {}", dir.display()), e))?;
        let out = LocalCa {
            ca: dir.join("ca.pem"),
            cert: dir.join("proxy.pem"),
            key: dir.join("proxy.key"),
        };
        // Private like every generated config (the certificates hold nothing secret, but one
        // rule for the whole directory is easier to check).
        for (path, text) in [
            (&out.ca, ca_cert.pem()),
            (&out.cert, cert.pem()),
            (&out.key, key.serialize_pem()),
        ] {
            crate::secrets::write_private(path, &text)?;
        }
        Ok(out)
    }

    /// The `[tls]` section of a client-proxy config that serves this certificate.
    pub fn proxy_tls(&self) -> TlsConfig {
        TlsConfig {
            cert: self.cert.clone(),
            key: self.key.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_proxy_certificate_chains_to_the_ca_for_its_names_only() {
        let dir = tempfile::tempdir().unwrap();
        let ca = LocalCa::make(dir.path(), &["127.0.0.1".parse().unwrap()]).unwrap();
        let roots = ferry_common::tls::load_certs(&ca.ca).unwrap();
        let mut store = rustls::RootCertStore::empty();
        store.add(roots[0].clone()).unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            std::sync::Arc::new(store),
            ferry_common::tls::provider(),
        )
        .build()
        .unwrap();
        let chain = ferry_common::tls::load_certs(&ca.cert).unwrap();
        let now = rustls::pki_types::UnixTime::now();
        let check = |name: &str| {
            use rustls::client::danger::ServerCertVerifier;
            let name = rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap();
            verifier.verify_server_cert(&chain[0], &[], &name, &[], now)
        };
        check("localhost").unwrap();
        check("127.0.0.1").unwrap();
        assert!(check("other.example").is_err());
        assert!(check("127.0.0.2").is_err());
        // The key is private to its owner; the key and certificate make a pair.
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&ca.key).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "{mode:o}");
        assert!(ferry_common::tls::load_key(&ca.key).is_ok());
        assert_eq!(ca.proxy_tls().cert, ca.cert);
    }
}
