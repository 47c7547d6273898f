//! The Rust client does not pull in the server.

use std::process::Command;

#[test]
fn the_client_feature_brings_no_axum_ractor_metrics_exporter_or_server_crates() {
    // Proves `cargo tree -p fabric --no-default-features --features client -e normal` lists
    // none of the server's crates: a user of the client gets only what the client needs.
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "tree",
            "-p",
            "fabric",
            "--no-default-features",
            "--features",
            "client",
            "-e",
            "normal",
            "--prefix",
            "none",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8(out.stdout).expect("utf-8");
    assert!(
        tree.lines().any(|l| l.starts_with("quinn ")),
        "the tree was listed: {tree}"
    );
    for server_crate in [
        "axum ",
        "ractor ",
        "metrics-exporter-prometheus ",
        "fabric-shard ",
        "fabric-sim ",
        "fabric-router ",
    ] {
        assert!(
            !tree.lines().any(|l| l.starts_with(server_crate)),
            "{server_crate}is in the client's tree"
        );
    }
}
