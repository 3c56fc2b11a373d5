//! Records the source revision for `transfer_guard_build_info{revision}`: `git rev-parse` of
//! the checkout when there is one, else `TRANSFER_GUARD_REVISION` from the environment (a
//! container build without `.git`), else `unknown`.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs");
    println!("cargo:rerun-if-env-changed=TRANSFER_GUARD_REVISION");
    let revision = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("TRANSFER_GUARD_REVISION").ok())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=TRANSFER_GUARD_REVISION={revision}");
}
