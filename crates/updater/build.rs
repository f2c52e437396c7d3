//! The version `ops-updater -v` prints is set at build time: `OPS_VERSION=2.1.0 cargo build`
//! (a packager's release, a test's second build); without it, the crate's version.
fn main() {
    println!("cargo:rerun-if-env-changed=OPS_VERSION");
}
