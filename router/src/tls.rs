//! TLS termination for the HTTP listener: certificates and keys from PEM files, one chosen
//! per connection by the client's SNI (the certificate that covers the name, checked by
//! webpki as a client would; the first one when none does or no name was sent).

use std::path::PathBuf;
use std::sync::Arc;

use crate::RouterError;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// One certificate chain and its private key, both PEM files.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug)]
struct BySni {
    /// (leaf certificate, what it signs with), in the order given.
    certs: Vec<(CertificateDer<'static>, Arc<CertifiedKey>)>,
}

impl ResolvesServerCert for BySni {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello
            .server_name()
            .and_then(|n| ServerName::try_from(n.to_string()).ok());
        if let Some(name) = name {
            for (leaf, key) in &self.certs {
                let covers = webpki::EndEntityCert::try_from(leaf)
                    .is_ok_and(|c| c.verify_is_valid_for_subject_name(&name).is_ok());
                if covers {
                    return Some(key.clone());
                }
            }
        }
        self.certs.first().map(|(_, k)| k.clone())
    }
}

fn load(
    files: &TlsFiles,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<(CertificateDer<'static>, Arc<CertifiedKey>), RouterError> {
    let bad = |path: &PathBuf, reason: String| RouterError::Tls {
        path: path.clone(),
        reason,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| bad(&files.cert, format!("reading certificates: {e}")))?
        .collect::<Result<_, _>>()
        .map_err(|e| bad(&files.cert, format!("not a PEM certificate chain: {e}")))?;
    let leaf = chain
        .first()
        .cloned()
        .ok_or_else(|| bad(&files.cert, "holds no certificate".into()))?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| bad(&files.key, format!("no PEM private key: {e}")))?;
    let signer = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| bad(&files.key, format!("unusable private key: {e}")))?;
    let certified = CertifiedKey::new(chain, signer);
    certified.keys_match().map_err(|e| {
        bad(
            &files.key,
            format!("is not the key of {}: {e}", files.cert.display()),
        )
    })?;
    Ok((leaf, Arc::new(certified)))
}

/// The server configuration for `files` (at least one). ALPN offers h2 (served by the
/// router's HTTP/2 front, each stream to a VM as HTTP/1.1) and http/1.1.
pub fn server_config(files: &[TlsFiles]) -> Result<Arc<rustls::ServerConfig>, RouterError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut certs = Vec::new();
    for f in files {
        certs.push(load(f, &provider)?);
    }
    if certs.is_empty() {
        return Err(RouterError::Config(
            "TLS needs at least one certificate".into(),
        ));
    }
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| RouterError::Config(format!("TLS configuration: {e}")))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(BySni { certs }));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
