//! TLS for the HTTP clients (the Apps Script bridge, LLM judges): rustls on `ring`, installed
//! once as the process's crypto provider. reqwest 0.13's own rustls feature would build
//! `aws-lc-sys` (a C and CMake build); the AMQP client already uses rustls on ring.

/// Installs the ring provider as the process default, once; every HTTP client is built after.
pub fn ensure_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Err means another provider was installed first: that one serves.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// A rustls client configuration for the stores' TLS (`rediss://`, PostgreSQL's
/// `sslmode=require`): the Mozilla roots (webpki-roots, so the image needs no CA bundle) and,
/// when given, the certificates of `ca_file` (PEM: a private CA). The server's certificate and
/// name are always verified.
pub fn client_config(ca_file: Option<&std::path::Path>) -> Result<rustls::ClientConfig, String> {
    ensure_crypto_provider();
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(path) = ca_file {
        for cert in ca_certificates(path)? {
            roots
                .add(cert)
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
    }
    Ok(rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// The certificates in a PEM file; an error names the file when there are none.
pub fn ca_certificates(
    path: &std::path::Path,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    let certs = rustls::pki_types::CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate in it", path.display()));
    }
    Ok(certs)
}
