//! Request signing for the bridge contract: `sig = hex(HMAC-SHA256(secret, ts + "." + body))`.
//! Apps Script's doPost can't read headers, so `ts` and `sig` travel in the query string.

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The shortest secret accepted for the bridge, the store seal and the audit chain.
pub const MIN_SECRET_BYTES: usize = 32;

/// True for the values templates ship and people type where a secret belongs.
pub fn is_placeholder(value: &str) -> bool {
    let v = value.trim().to_ascii_lowercase();
    [
        "change-me",
        "changeme",
        "change_me",
        "replace-me",
        "replaceme",
    ]
    .iter()
    .any(|p| v.contains(p))
        || ["secret", "password", "placeholder", "todo", "xxx", "test"].contains(&v.as_str())
}

/// A shared secret. Its `Debug` never shows the value, so it can't leak into a log line.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl Secret {
    pub fn new(value: impl Into<Vec<u8>>) -> Self {
        Self(value.into())
    }

    /// A random secret for a bridge that lives and dies with this process (the embedded
    /// simulator).
    pub fn random() -> Self {
        let a = uuid::Uuid::new_v4();
        let b = uuid::Uuid::new_v4();
        Self(format!("{}{}", a.simple(), b.simple()).into_bytes())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Refuses a template's placeholder or a key shorter than [`MIN_SECRET_BYTES`], naming the
    /// variable `var` (never the value): a key someone could guess seals nothing.
    pub fn check_strong(&self, var: &str) -> Result<(), String> {
        if is_placeholder(&String::from_utf8_lossy(&self.0)) {
            return Err(format!(
                "{var} holds a placeholder (as the shipped templates do): set a random value of at least {MIN_SECRET_BYTES} bytes"
            ));
        }
        if self.0.len() < MIN_SECRET_BYTES {
            return Err(format!(
                "{var} is shorter than {MIN_SECRET_BYTES} bytes: set a random value (`openssl rand -hex 32`)"
            ));
        }
        Ok(())
    }

    /// The value as text, for a client that sends it itself (an API key as a Bearer token).
    /// Never log it.
    pub fn expose(&self) -> String {
        String::from_utf8_lossy(&self.0).into_owned()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// `hex(HMAC-SHA256(secret, data))`.
pub fn mac(secret: &Secret, data: &[u8]) -> String {
    let mut mac = HmacSha256::new_from_slice(&secret.0).expect("HMAC takes any key length");
    mac.update(data);
    hex::encode(mac.finalize().into_bytes())
}

/// Constant-time check of [`mac`].
pub fn verify_mac(secret: &Secret, data: &[u8], mac_hex: &str) -> bool {
    let Ok(tag) = hex::decode(mac_hex) else {
        return false;
    };
    let mut mac = HmacSha256::new_from_slice(&secret.0).expect("HMAC takes any key length");
    mac.update(data);
    mac.verify_slice(&tag).is_ok()
}

pub fn sign(secret: &Secret, ts: i64, body: &[u8]) -> String {
    let mut mac = HmacSha256::new_from_slice(&secret.0).expect("HMAC takes any key length");
    mac.update(ts.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

/// Constant-time check of a lower-hex signature.
pub fn verify(secret: &Secret, ts: i64, body: &[u8], sig_hex: &str) -> bool {
    let Ok(sig) = hex::decode(sig_hex) else {
        return false;
    };
    let mut mac = HmacSha256::new_from_slice(&secret.0).expect("HMAC takes any key length");
    mac.update(ts.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.verify_slice(&sig).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_and_short_keys_are_refused_naming_the_variable_only() {
        for weak in [
            "CHANGE-ME",
            "change-me-please-0123456789abcdef0123",
            "k3y-1234",
        ] {
            let e = Secret::new(weak).check_strong("BRIDGE_SECRET").unwrap_err();
            assert!(e.contains("BRIDGE_SECRET"), "{e}");
            assert!(!e.contains(weak), "the value echoed: {e}");
        }
        assert!(Secret::random().check_strong("X").is_ok());
        assert!(is_placeholder(
            "https://script.google.com/macros/s/CHANGE-ME/exec"
        ));
    }

    #[test]
    fn known_vector_and_roundtrip() {
        // Reference: python3 -c 'import hmac,hashlib;print(hmac.new(b"k",b"1.x",hashlib.sha256).hexdigest())'
        let s = Secret::new("k");
        assert_eq!(
            sign(&s, 1, b"x"),
            "976cb87e4f568d1c0f03f32859e90af8597cf00b978ba37c229c97d3a15b8449"
        );
        assert!(verify(&s, 1, b"x", &sign(&s, 1, b"x")));
        assert!(!verify(&s, 2, b"x", &sign(&s, 1, b"x")));
        assert!(!verify(&Secret::new("other"), 1, b"x", &sign(&s, 1, b"x")));
        assert!(!verify(&s, 1, b"x", "zz"));
        assert_eq!(format!("{s:?}"), "Secret(<redacted>)");
    }
}
