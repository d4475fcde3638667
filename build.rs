//! Records the git revision walrelay is built from, for `walrelay_build_info`.
//!
//! `WALRELAY_GIT_REVISION` in the build's environment wins (a container build
//! has no `.git`: pass it as a build argument); otherwise `git rev-parse`,
//! when git and a repository are there; otherwise `unknown`. Never fails the
//! build.
use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=WALRELAY_GIT_REVISION");
    let revision = std::env::var("WALRELAY_GIT_REVISION")
        .ok()
        .filter(|r| !r.trim().is_empty())
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=WALRELAY_GIT_REVISION={}", revision.trim());
    // Build again when HEAD moves: HEAD itself (another branch checked out),
    // the branch it names (a commit), and packed-refs. Only files that exist
    // are named: cargo reruns a script on every build for a missing one.
    let mut watched = vec!["HEAD".to_owned(), "packed-refs".to_owned()];
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watched.push(branch);
    }
    for name in watched {
        if let Some(path) = git(&["rev-parse", "--git-path", &name]) {
            if Path::new(&path).exists() {
                println!("cargo:rerun-if-changed={path}");
            }
        }
    }
}

/// `git ARGS` in the crate's directory: its output's first line, if it succeeded.
fn git(args: &[&str]) -> Option<String> {
    let dir = std::env::var_os("CARGO_MANIFEST_DIR")?;
    let output = Command::new("git")
        .args(args)
        .current_dir(dir)
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    let text = String::from_utf8(output.stdout).ok()?;
    let line = text.lines().next()?.trim().to_owned();
    (!line.is_empty()).then_some(line)
}
