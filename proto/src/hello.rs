//! Key hellos: the exact bytes a peer signs, and the limits the shard checks them against.
//!
//! A peer registered with an ed25519 public key proves itself without a token:
//!
//! 1. the client sends `{"op":"challenge"}`; the session answers with a 32-byte nonce that the
//!    node drew from its OS RNG for this session only;
//! 2. the client signs [`hello_message`] with its private key and sends `hello` with `sig`
//!    (hex of the 64-byte signature) and `ts` (its clock, unix ms);
//! 3. the session forwards the nonce *it* issued (never one named by the client) with `sig` and
//!    `ts` to the mesh's shard, which verifies the signature with the stored public key.
//!
//! The nonce is single-use: a hello replayed on another session fails because that session's
//! nonce differs, and a second hello on the same session is refused.

/// The first bytes of every signed hello message: a domain separator and format version.
pub const HELLO_CONTEXT: &[u8] = b"fabric-hello/1\0";
/// Largest difference between the node's clock and a key hello's `ts`, either way.
pub const HELLO_SKEW_MS_MAX: u64 = 60_000;
/// Length of an ed25519 public key, in bytes.
pub const PUBLIC_KEY_BYTES: usize = 32;
/// Length of an ed25519 signature, in bytes.
pub const SIGNATURE_BYTES: usize = 64;
/// Length of a session's hello nonce, in bytes.
pub const NONCE_BYTES: usize = 32;

/// The bytes a key hello signs:
/// `"fabric-hello/1" 0x00 mesh 0x00 peer 0x00 ts 0x00 nonce`, where `ts` is the decimal text of
/// the unix-ms timestamp and `nonce` is the lowercase hex (64 characters) of the session's nonce.
/// Ids cannot contain a NUL byte, so the fields cannot run into each other.
pub fn hello_message(mesh: &str, peer: &str, ts: u64, nonce: &[u8; NONCE_BYTES]) -> Vec<u8> {
    let mut m = Vec::with_capacity(HELLO_CONTEXT.len() + mesh.len() + peer.len() + 24 + 64);
    m.extend_from_slice(HELLO_CONTEXT);
    m.extend_from_slice(mesh.as_bytes());
    m.push(0);
    m.extend_from_slice(peer.as_bytes());
    m.push(0);
    m.extend_from_slice(ts.to_string().as_bytes());
    m.push(0);
    m.extend_from_slice(hex::encode(nonce).as_bytes());
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signed_message_has_the_documented_bytes() {
        // Proves the hello message is exactly the byte string docs/PROTOCOL.md shows.
        let nonce = [0xab; 32];
        let m = hello_message("m1", "alice", 1_700_000_000_123, &nonce);
        let want = format!(
            "fabric-hello/1\0m1\0alice\01700000000123\0{}",
            "ab".repeat(32)
        );
        assert_eq!(m, want.as_bytes());
    }
}
