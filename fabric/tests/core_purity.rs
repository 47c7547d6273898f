//! The cores (proto, router, shard, edge) stay sans-IO: no async runtime, actor system, QUIC or
//! socket crate in their normal dependency closure, and no file, socket, thread, clock or
//! unseeded-randomness API in their source. This test is the build's guard for that rule.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

const CORES: [&str; 4] = [
    "fabric-proto",
    "fabric-router",
    "fabric-shard",
    "fabric-edge",
];
const FORBIDDEN_CRATES: [&str; 9] = [
    "tokio",
    "ractor",
    "quinn",
    "quinn-proto",
    "mio",
    "socket2",
    "async-std",
    "smol",
    "rand",
];
/// Source patterns that mean I/O, ambient time, threads or ambient randomness.
const FORBIDDEN_SOURCE: [&str; 12] = [
    "std::fs",
    "std::net",
    "std::thread",
    "std::process",
    "std::time::Instant",
    "Instant::now",
    "SystemTime",
    "std::io::stdin",
    "std::env",
    "thread_rng",
    "OsRng",
    "tokio",
];

fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
}

/// The host's target triple, as rustc reports it.
fn host_triple() -> String {
    let out = Command::new("rustc")
        .arg("-vV")
        .output()
        .expect("rustc -vV runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .expect("rustc -vV names the host")
        .trim()
        .to_string()
}

// Over 70 lines: one end-to-end scenario whose steps depend on each other, read top to bottom.
#[test]
fn core_crates_have_no_io_dependencies() {
    // Proves no core crate pulls a runtime, actor, QUIC or socket crate as a normal dependency.
    // Resolved for this machine's platform only: a full resolve would need the manifests of
    // every platform's crates (Windows ones too), which a fresh offline machine does not have.
    let out = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--offline"])
        .args(["--filter-platform", &host_triple()])
        .current_dir(workspace_root())
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metadata is JSON");
    let names: BTreeMap<String, String> = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["id"].as_str().unwrap().to_string(),
                p["name"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let nodes: BTreeMap<String, Vec<String>> = meta["resolve"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            let deps = n["deps"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|d| {
                    // Normal dependencies only: dev and build dependencies do not ship.
                    d["dep_kinds"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|k| k["kind"].is_null())
                })
                .map(|d| d["pkg"].as_str().unwrap().to_string())
                .collect();
            (n["id"].as_str().unwrap().to_string(), deps)
        })
        .collect();
    for core in CORES {
        let root = names
            .iter()
            .find(|(_, n)| *n == core)
            .expect("core crate in workspace")
            .0;
        let mut seen = BTreeSet::new();
        let mut stack = vec![root.clone()];
        while let Some(id) = stack.pop() {
            if seen.insert(id.clone()) {
                stack.extend(nodes.get(&id).cloned().unwrap_or_default());
            }
        }
        for id in &seen {
            let name = &names[id];
            assert!(
                !FORBIDDEN_CRATES.contains(&name.as_str()),
                "core crate {core} depends on {name}: the cores must stay sans-IO"
            );
        }
    }
}

#[test]
fn core_sources_use_no_io_clock_or_thread_api() {
    // Proves no core source file names a file, socket, thread, clock or ambient-RNG API.
    for dir in ["proto", "router", "shard", "edge"] {
        let mut stack = vec![workspace_root().join(dir).join("src")];
        while let Some(p) = stack.pop() {
            for entry in std::fs::read_dir(&p).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    stack.push(path);
                    continue;
                }
                if path.extension().is_none_or(|e| e != "rs") {
                    continue;
                }
                let text = std::fs::read_to_string(&path).unwrap();
                for (i, line) in text.lines().enumerate() {
                    let code = line.split("//").next().unwrap_or("");
                    for bad in FORBIDDEN_SOURCE {
                        assert!(
                            !code.contains(bad),
                            "{}:{}: core code uses {bad}; cores take time and randomness as arguments and do no I/O",
                            path.display(),
                            i + 1
                        );
                    }
                }
            }
        }
    }
}
