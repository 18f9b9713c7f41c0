//! The client's side of TLS to `tls://` proxies: which certificates it trusts (the system's
//! roots, or `--ca`), optional public-key pins on top, and the handshake of one connection.

use crate::error::{ClientError, Result};
use crate::settings::TlsOptions;
use ferry_common::tls;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::sync::Arc;

/// The TLS config every `tls://` connection of a client uses.
pub fn client_config(opts: &TlsOptions) -> Result<Arc<ClientConfig>> {
    let input = |e: String| ClientError::Input(e);
    let mut roots = RootCertStore::empty();
    match &opts.ca {
        Some(path) => {
            for cert in tls::load_certs(path).map_err(input)? {
                roots.add(cert).map_err(|e| {
                    input(format!(
                        "--ca {}: not a usable CA certificate: {e}",
                        path.display()
                    ))
                })?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                log::debug!("system root certificates: {e}");
            }
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(input(
                    "no system root certificates found to check tls:// proxies with; give the \
                     CA with --ca FILE (FERRY_CA, config `ca`)"
                        .into(),
                ));
            }
        }
    }
    let provider = tls::provider();
    let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| input(format!("TLS verifier: {e}")))?;
    let verifier: Arc<dyn ServerCertVerifier> = if opts.pins.is_empty() {
        webpki
    } else {
        Arc::new(Pinned {
            inner: webpki,
            pins: opts.pins.clone(),
        })
    };
    let cfg = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| input(format!("TLS config: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// The name a `tls://` entry's certificate must be valid for.
pub fn server_name(host: &str) -> std::result::Result<ServerName<'static>, String> {
    ServerName::try_from(host.to_owned())
        .map_err(|e| format!("{host:?} is no TLS server name: {e}"))
}

/// The usual chain and name checks, then the pins: the certificate's public key must be one
/// of them (a CA that signs for the name is not enough).
#[derive(Debug)]
struct Pinned {
    inner: Arc<WebPkiServerVerifier>,
    pins: Vec<String>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let ok = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        let pin = tls::pin_of(end_entity).map_err(rustls::Error::General)?;
        if self.pins.contains(&pin) {
            Ok(ok)
        } else {
            Err(rustls::Error::General(format!(
                "the certificate's key ({pin}) matches none of the pinned keys"
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
