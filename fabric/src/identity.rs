//! ed25519 peer identities: key generation from the OS RNG, the private key file of
//! `fabric keygen`, public key text, and signing the hello message of a key hello
//! (docs/PROTOCOL.md, "Key hellos").
//!
//! # Key file format
//!
//! UTF-8 text, one field per line, `#` lines ignored:
//!
//! ```text
//! fabric-ed25519-private-key/1
//! secret <hex of the 32-byte ed25519 seed>
//! public <hex of the 32-byte public key>
//! ```
//!
//! The `public` line is optional; when present it must match the secret. The file is written
//! with mode 0600 and never overwritten.
//!
//! # Public keys
//!
//! A public key is written as 64 lowercase hex characters (32 bytes); uppercase is accepted.

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use fabric_proto::hello::{NONCE_BYTES, PUBLIC_KEY_BYTES};
use rand::TryRngCore;
use std::path::{Path, PathBuf};

pub use fabric_proto::hello::{hello_message, HELLO_SKEW_MS_MAX};

/// The first line of a private key file.
pub const KEY_FILE_HEADER: &str = "fabric-ed25519-private-key/1";

/// Everything that can go wrong with keys and key files.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("not a fabric private key file: {0}")]
    Format(String),
    #[error("not an ed25519 public key: {0}")]
    PublicKey(String),
    #[error("the OS RNG failed: {0}")]
    Rng(String),
    #[error("key file: {0}")]
    File(#[from] crate::files::FileError),
}

/// A peer's ed25519 signing key. `Debug` shows only the public key.
#[derive(Clone)]
pub struct Identity {
    key: SigningKey,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identity(public {})", self.public_key_hex())
    }
}

/// 32 bytes from the OS RNG.
fn os_random() -> Result<[u8; 32], IdentityError> {
    let mut b = [0u8; 32];
    rand::rngs::OsRng
        .try_fill_bytes(&mut b)
        .map_err(|e| IdentityError::Rng(e.to_string()))?;
    Ok(b)
}

/// A session's hello nonce, from the OS RNG (the glue gives it to `Session::set_challenge_nonce`).
/// Falls back to the thread RNG (itself seeded from the OS) should the OS RNG fail.
pub fn new_nonce() -> [u8; NONCE_BYTES] {
    os_random().unwrap_or_else(|_| {
        let mut b = [0u8; NONCE_BYTES];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut b);
        b
    })
}

impl Identity {
    /// A new key from the OS RNG.
    pub fn generate() -> Result<Identity, IdentityError> {
        Ok(Identity::from_seed(os_random()?))
    }

    /// The key of a 32-byte ed25519 seed (the secret of a key file).
    pub fn from_seed(seed: [u8; 32]) -> Identity {
        Identity {
            key: SigningKey::from_bytes(&seed),
        }
    }

    pub fn public_key(&self) -> [u8; PUBLIC_KEY_BYTES] {
        self.key.verifying_key().to_bytes()
    }

    /// The public key as registered with `POST /v1/meshes/M/peers` (`public_key`).
    pub fn public_key_hex(&self) -> String {
        hex::encode(self.public_key())
    }

    /// Signs the hello message of `mesh`, `peer`, `ts` (unix ms) and the session's nonce.
    pub fn sign_hello(
        &self,
        mesh: &str,
        peer: &str,
        ts: u64,
        nonce: &[u8; NONCE_BYTES],
    ) -> [u8; 64] {
        self.key
            .sign(&hello_message(mesh, peer, ts, nonce))
            .to_bytes()
    }

    /// The key file text (see the module docs).
    pub fn to_file_text(&self) -> String {
        format!(
            "{KEY_FILE_HEADER}\n# keep this file secret: it is the peer's identity\nsecret {}\npublic {}\n",
            hex::encode(self.key.to_bytes()),
            self.public_key_hex()
        )
    }

    /// Parses key file text.
    pub fn from_file_text(text: &str) -> Result<Identity, IdentityError> {
        let mut lines = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'));
        if lines.next() != Some(KEY_FILE_HEADER) {
            return Err(IdentityError::Format(format!(
                "the first line must be {KEY_FILE_HEADER:?}"
            )));
        }
        let mut secret = None;
        let mut public = None;
        for line in lines {
            match line.split_once(' ') {
                Some(("secret", v)) => secret = Some(v.trim()),
                Some(("public", v)) => public = Some(v.trim()),
                _ => {
                    return Err(IdentityError::Format(format!(
                        "unexpected line {:?}",
                        line.chars().take(20).collect::<String>()
                    )))
                }
            }
        }
        let secret = secret.ok_or_else(|| IdentityError::Format("no \"secret\" line".into()))?;
        let seed: [u8; 32] = hex::decode(secret)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| IdentityError::Format("\"secret\" is not 64 hex characters".into()))?;
        let id = Identity::from_seed(seed);
        if let Some(p) = public {
            if parse_public_key(p)? != id.public_key() {
                return Err(IdentityError::Format(
                    "\"public\" does not belong to \"secret\"".into(),
                ));
            }
        }
        Ok(id)
    }

    /// Reads a key file.
    pub fn load(path: &Path) -> Result<Identity, IdentityError> {
        let text = std::fs::read_to_string(path).map_err(|source| IdentityError::Io {
            what: "cannot read key file",
            path: path.to_path_buf(),
            source,
        })?;
        Identity::from_file_text(&text)
    }

    /// Writes a new key file, readable by its owner only (mode 0600 from creation), durably
    /// (temp file, fsync, link, directory fsync: a crash never leaves a half-written key under
    /// the name); an existing file is never replaced.
    pub fn save(&self, path: &Path) -> Result<(), IdentityError> {
        crate::files::write_new(
            path,
            self.to_file_text().as_bytes(),
            crate::files::MODE_SECRET,
        )?;
        Ok(())
    }
}

/// Parses a public key: 64 hex characters that encode a valid ed25519 point.
pub fn parse_public_key(text: &str) -> Result<[u8; PUBLIC_KEY_BYTES], IdentityError> {
    let bytes: [u8; PUBLIC_KEY_BYTES] = hex::decode(text.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| IdentityError::PublicKey("expected 64 hex characters (32 bytes)".into()))?;
    VerifyingKey::from_bytes(&bytes)
        .map_err(|_| IdentityError::PublicKey("the bytes are not a valid ed25519 point".into()))?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_round_trip_and_bad_ones_are_refused() {
        // Proves a generated key survives its file text, and tampered files are refused.
        let id = Identity::generate().unwrap();
        let text = id.to_file_text();
        let back = Identity::from_file_text(&text).unwrap();
        assert_eq!(back.public_key(), id.public_key());
        assert_ne!(Identity::generate().unwrap().public_key(), id.public_key());
        let other = Identity::generate().unwrap();
        let mixed = format!(
            "{KEY_FILE_HEADER}\nsecret {}\npublic {}\n",
            hex::encode(id.key.to_bytes()),
            other.public_key_hex()
        );
        assert!(Identity::from_file_text(&mixed).is_err());
        assert!(Identity::from_file_text("secret 00").is_err());
        assert!(Identity::from_file_text(&format!("{KEY_FILE_HEADER}\nsecret 0011\n")).is_err());
        assert_eq!(
            parse_public_key(&id.public_key_hex().to_uppercase()).unwrap(),
            id.public_key()
        );
        assert!(parse_public_key("abcd").is_err());
    }

    #[test]
    fn a_key_file_is_0600_durable_and_never_replaced() {
        // Proves `fabric keygen`'s file is created 0600 with its full text, an existing file
        // is refused and kept, and no temp file is left.
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("peer.key");
        let id = Identity::generate().unwrap();
        id.save(&path).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(Identity::load(&path).unwrap().public_key(), id.public_key());
        let e = Identity::generate().unwrap().save(&path).unwrap_err();
        assert!(e.to_string().contains("exists"), "{e}");
        assert_eq!(Identity::load(&path).unwrap().public_key(), id.public_key());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn sign_hello_verifies_with_the_public_key_over_the_documented_message() {
        // Proves the signature is over hello_message and only verifies for that message.
        let id = Identity::from_seed([5; 32]);
        let nonce = [1; 32];
        let sig = ed25519_dalek::Signature::from_bytes(&id.sign_hello("m", "p", 42, &nonce));
        let vk = VerifyingKey::from_bytes(&id.public_key()).unwrap();
        assert!(vk
            .verify_strict(&hello_message("m", "p", 42, &nonce), &sig)
            .is_ok());
        assert!(vk
            .verify_strict(&hello_message("m", "p", 43, &nonce), &sig)
            .is_err());
    }
}
