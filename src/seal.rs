//! The operator's secret key: it seals BMC passwords before they reach the
//! inventory database, and signs the per-boot check-in tokens.
//!
//! The key is 32 random bytes in a file the operator controls
//! (`[power] key_file`, by default `bmc.key` in the state directory,
//! created with mode 0600 on first use), never in the database: a copy of
//! the database, or a PostgreSQL server that several bootfleet servers
//! share, holds only sealed secrets. Servers that share a database must
//! share the key file too.
//!
//! Sealing is ChaCha20-Poly1305 (RustCrypto's `chacha20poly1305`, the
//! field's audited AEAD) with a random 96-bit nonce per secret and the
//! owning machine's MAC as associated data, so a sealed password copied
//! onto another machine's row does not open. Signing is HMAC-SHA-256 with
//! a key derived from the same file for that one purpose.

use std::io::Write;
use std::path::{Path, PathBuf};

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use hmac::{Hmac, Mac as _};
use sha2::Sha256;

/// What went wrong with the key file or a sealed secret.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("key file {path}: {source} (bootfleet creates it when it is missing; make its directory writable, or point [power] key_file at an existing key)")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("key file {0}: it must hold 64 hexadecimal digits (32 bytes); make a new one with `head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'`")]
    Malformed(PathBuf),
    #[error("a sealed secret does not open with this key file: it was sealed with another key, or for another machine; set the BMC's password again")]
    WrongKey,
    #[error("a sealed secret is damaged ({0}); set the BMC's password again")]
    Damaged(&'static str),
}

/// The loaded key.
#[derive(Clone)]
pub struct SealKey {
    cipher: ChaCha20Poly1305,
    signing: [u8; 32],
}

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealKey(..)")
    }
}

/// The prefix of every sealed secret (the format's version).
const SEALED_PREFIX: &str = "v1.";

impl SealKey {
    /// Reads the key at `path`, creating a new random one (mode 0600) if
    /// there is no file there yet.
    pub fn load_or_create(path: &Path) -> Result<Self, SealError> {
        let io = |source| SealError::Io {
            path: path.to_path_buf(),
            source,
        };
        match std::fs::read_to_string(path) {
            Ok(text) => Self::from_hex(text.trim()).ok_or(SealError::Malformed(path.into())),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                let bytes: [u8; 32] = rand::random();
                let mut file = open_new_private(path).map_err(io)?;
                writeln!(file, "{}", crate::proto::lower_hex(&bytes)).map_err(io)?;
                file.sync_all().map_err(io)?;
                crate::durable::sync_parent_dir(path).map_err(io)?;
                tracing::info!(path = %path.display(), "created a new key file for BMC passwords and check-in tokens; keep a copy with the database backups");
                Ok(Self::from_bytes(&bytes))
            }
            Err(error) => Err(io(error)),
        }
    }

    fn from_hex(text: &str) -> Option<Self> {
        if text.len() != 64 {
            return None;
        }
        let mut bytes = [0u8; 32];
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(Self::from_bytes(&bytes))
    }

    fn from_bytes(bytes: &[u8; 32]) -> Self {
        let mut derive =
            <Hmac<Sha256> as hmac::Mac>::new_from_slice(bytes).expect("HMAC takes any key length");
        derive.update(b"bootfleet check-in tokens v1");
        Self {
            cipher: ChaCha20Poly1305::new(Key::from_slice(bytes)),
            signing: derive.finalize().into_bytes().into(),
        }
    }

    /// `secret` sealed for the record named `owner` (a MAC address).
    pub fn seal(&self, owner: &str, secret: &str) -> String {
        let nonce: [u8; 12] = rand::random();
        let sealed = self
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: secret.as_bytes(),
                    aad: owner.as_bytes(),
                },
            )
            .expect("ChaCha20-Poly1305 seals any message under 256 GiB");
        format!(
            "{SEALED_PREFIX}{}{}",
            crate::proto::lower_hex(&nonce),
            crate::proto::lower_hex(&sealed)
        )
    }

    /// The secret that [`Self::seal`] sealed for `owner`.
    pub fn open(&self, owner: &str, sealed: &str) -> Result<String, SealError> {
        let body = sealed
            .strip_prefix(SEALED_PREFIX)
            .ok_or(SealError::Damaged("unknown format"))?;
        let bytes = unhex(body).ok_or(SealError::Damaged("not hexadecimal"))?;
        if bytes.len() < 12 + 16 {
            return Err(SealError::Damaged("too short"));
        }
        let (nonce, sealed) = bytes.split_at(12);
        let plain = self
            .cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: owner.as_bytes(),
                },
            )
            .map_err(|_| SealError::WrongKey)?;
        String::from_utf8(plain).map_err(|_| SealError::Damaged("not UTF-8"))
    }

    /// HMAC-SHA-256 of `message` under the signing key, as hex.
    pub fn sign(&self, message: &[u8]) -> String {
        let mut mac = <Hmac<Sha256> as hmac::Mac>::new_from_slice(&self.signing)
            .expect("HMAC takes any key length");
        mac.update(message);
        crate::proto::lower_hex(&mac.finalize().into_bytes())
    }

    /// Whether `signature` is [`Self::sign`] of `message` (compared in
    /// constant time).
    pub fn verify(&self, message: &[u8], signature: &str) -> bool {
        let Some(bytes) = unhex(signature) else {
            return false;
        };
        let mut mac = <Hmac<Sha256> as hmac::Mac>::new_from_slice(&self.signing)
            .expect("HMAC takes any key length");
        mac.update(message);
        mac.verify_slice(&bytes).is_ok()
    }
}

/// Creates `path` for writing, failing if it exists, readable by its owner
/// only.
fn open_new_private(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || !text.is_ascii() {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_file_is_created_private_and_read_back() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bmc.key");
        let key = SealKey::load_or_create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let sealed = key.seal("52:54:00:00:00:01", "hunter2");
        assert!(!sealed.contains("hunter2"));
        let again = SealKey::load_or_create(&path).unwrap();
        assert_eq!(again.open("52:54:00:00:00:01", &sealed).unwrap(), "hunter2");
    }

    #[test]
    fn a_sealed_secret_opens_only_for_its_owner_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let key = SealKey::load_or_create(&dir.path().join("a")).unwrap();
        let other = SealKey::load_or_create(&dir.path().join("b")).unwrap();
        let sealed = key.seal("owner", "pw");
        assert_ne!(sealed, key.seal("owner", "pw"), "a fresh nonce each time");
        assert!(matches!(
            key.open("thief", &sealed),
            Err(SealError::WrongKey)
        ));
        assert!(matches!(
            other.open("owner", &sealed),
            Err(SealError::WrongKey)
        ));
        let mut flipped = sealed.clone().into_bytes();
        let last = flipped.len() - 1;
        flipped[last] = if flipped[last] == b'0' { b'1' } else { b'0' };
        let flipped = String::from_utf8(flipped).unwrap();
        assert!(matches!(
            key.open("owner", &flipped),
            Err(SealError::WrongKey)
        ));
        assert!(matches!(
            key.open("owner", "v1.zz"),
            Err(SealError::Damaged(_))
        ));
        assert!(matches!(
            key.open("owner", "plain"),
            Err(SealError::Damaged(_))
        ));
    }

    #[test]
    fn a_malformed_key_file_is_refused_with_how_to_make_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bmc.key");
        std::fs::write(&path, "short\n").unwrap();
        let error = SealKey::load_or_create(&path).unwrap_err().to_string();
        assert!(error.contains("64 hexadecimal digits"), "{error}");
    }

    #[test]
    fn signatures_verify_only_for_their_message() {
        let dir = tempfile::tempdir().unwrap();
        let key = SealKey::load_or_create(&dir.path().join("k")).unwrap();
        let signature = key.sign(b"checkin 52:54:00:00:00:01 1");
        assert!(key.verify(b"checkin 52:54:00:00:00:01 1", &signature));
        assert!(!key.verify(b"checkin 52:54:00:00:00:02 1", &signature));
        assert!(!key.verify(b"checkin 52:54:00:00:00:01 1", "00"));
        assert!(!key.verify(b"checkin 52:54:00:00:00:01 1", "not hex"));
    }
}
