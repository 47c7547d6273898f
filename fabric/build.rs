//! Sets FABRIC_GIT_COMMIT (for `fabric_build_info`) from `git rev-parse`, or "unknown" when the
//! source is not a git checkout or git is missing.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let commit = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty() && s.chars().all(|c| c.is_ascii_hexdigit()))
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=FABRIC_GIT_COMMIT={commit}");
    println!("cargo:rerun-if-changed=build.rs");
    // Rebuild when HEAD moves; only files that exist are named (a missing one would make cargo
    // rerun this script on every build).
    if let Some(git_dir) = git_dir() {
        let head = git_dir.join("HEAD");
        watch(&head);
        if let Ok(text) = std::fs::read_to_string(&head) {
            if let Some(r) = text.strip_prefix("ref: ") {
                watch(&git_dir.join(r.trim()));
            }
        }
        watch(&git_dir.join("packed-refs"));
    }
}

fn git_dir() -> Option<PathBuf> {
    let out = Command::new("git")
        .args(["rev-parse", "--git-dir"])
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    let dir = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
    Some(if dir.is_absolute() {
        dir
    } else {
        Path::new(&std::env::var("CARGO_MANIFEST_DIR").ok()?).join(dir)
    })
}

fn watch(path: &Path) {
    if path.exists() {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}
