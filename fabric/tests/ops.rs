//! The node's operational surface against a real node: the files it writes (modes, a
//! half-written generated certificate), the HTTP port's timeouts and connection caps, QUIC's
//! caps, and what the client port reveals when a metrics port exists.

mod common;
use common::*;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_dir_is_private_and_secrets_are_0600() {
    // Proves a fresh start makes the data dir and tls/ 0700, the admin token and TLS key 0600,
    // node.json and the certificate 0644, and leaves no temp files behind.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("nested").join("data");
    let node = fabric::node::start(fabric::config::Config {
        data_dir: data.clone(),
        admin_token: None,
        ..config(dir.path())
    })
    .await
    .unwrap();
    assert_eq!(mode_of(&dir.path().join("nested")), 0o700);
    assert_eq!(mode_of(&data), 0o700);
    assert_eq!(mode_of(&data.join("admin-token")), 0o600);
    assert_eq!(
        std::fs::read_to_string(data.join("admin-token")).unwrap(),
        node.admin_token()
    );
    assert_eq!(mode_of(&data.join("node.json")), 0o644);
    assert_eq!(mode_of(&data.join("tls")), 0o700);
    assert_eq!(mode_of(&data.join("tls").join("key.pem")), 0o600);
    assert_eq!(mode_of(&data.join("tls").join("cert.pem")), 0o644);
    for d in [data.clone(), data.join("tls")] {
        for e in std::fs::read_dir(&d).unwrap() {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            assert!(!name.ends_with(".tmp"), "temp file {name} left in {d:?}");
        }
    }
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_written_generated_certificate_is_made_anew_and_an_empty_token_too() {
    // Proves a generated cert.pem emptied by a power loss (as older versions could leave it),
    // or a key that does not match it, no longer stops every later start: the node makes a
    // new pair. An empty admin-token file gets a new token.
    let dir = tempfile::tempdir().unwrap();
    let cfg = || fabric::config::Config {
        admin_token: None,
        ..config(dir.path())
    };
    let node = fabric::node::start(cfg()).await.unwrap();
    let first = node.tls_fingerprint().unwrap();
    node.shutdown().await;
    let tls = dir.path().join("tls");
    std::fs::write(tls.join("cert.pem"), b"").unwrap();
    std::fs::write(dir.path().join("admin-token"), b"").unwrap();
    let node = fabric::node::start(cfg()).await.expect("starts again");
    let second = node.tls_fingerprint().unwrap();
    assert_ne!(first, second, "a new certificate");
    assert_eq!(node.admin_token().len(), 64, "a new token");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("admin-token")).unwrap(),
        node.admin_token()
    );
    node.shutdown().await;

    // The key of another pair: refused by the check, made anew.
    let other = tempfile::tempdir().unwrap();
    fabric::tls::load_or_generate(None, None, other.path(), &[]).unwrap();
    std::fs::copy(other.path().join("tls/key.pem"), tls.join("key.pem")).unwrap();
    let node = fabric::node::start(cfg())
        .await
        .expect("starts with a mismatched key");
    assert_ne!(node.tls_fingerprint().unwrap(), second);
    node.shutdown().await;
    // And an unchanged pair is kept.
    let node = fabric::node::start(cfg()).await.unwrap();
    let kept = node.tls_fingerprint().unwrap();
    node.shutdown().await;
    let node = fabric::node::start(cfg()).await.unwrap();
    assert_eq!(node.tls_fingerprint().unwrap(), kept);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_configured_certificate_stays_fatal_with_a_clear_error() {
    // Proves --tls-cert/--tls-key that cannot be used are refused at start, naming the file
    // and what is wrong, and never replaced.
    let dir = tempfile::tempdir().unwrap();
    let gen = tempfile::tempdir().unwrap();
    fabric::tls::load_or_generate(None, None, gen.path(), &[]).unwrap();
    let other = tempfile::tempdir().unwrap();
    fabric::tls::load_or_generate(None, None, other.path(), &[]).unwrap();
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, b"").unwrap();
    let start = |cert: &Path, key: &Path| {
        fabric::node::start(fabric::config::Config {
            tls_cert: Some(cert.to_path_buf()),
            tls_key: Some(key.to_path_buf()),
            ..config(dir.path())
        })
    };
    let e = start(&empty, &gen.path().join("tls/key.pem"))
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(
        e.contains("empty.pem") && e.contains("no CERTIFICATE section"),
        "{e}"
    );
    assert_eq!(std::fs::read(&empty).unwrap(), b"", "never replaced");
    let e = start(
        &gen.path().join("tls/cert.pem"),
        &other.path().join("tls/key.pem"),
    )
    .await
    .err()
    .expect("refused")
    .to_string();
    assert!(e.contains("cert.pem") && e.contains("key"), "{e}");
}
