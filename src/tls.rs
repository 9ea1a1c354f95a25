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
