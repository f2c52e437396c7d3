//! Minisign key pairs and signatures made with the real `minisign` tool at test time, as
//! an operator makes them (`minisign -G`, `minisign -S`).
//!
//! [`available`] fails the test when `CI` is set and the tool is missing (`.ci/run`
//! installs it); elsewhere it prints why and lets the test skip.

use std::path::{Path, PathBuf};

use crate::command;

/// Whether the `minisign` tool can be run. With `CI` set, a missing tool panics instead.
pub fn available() -> bool {
    let ok = command(Path::new("minisign"))
        .arg("-v")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        let why = "the minisign tool is not installed (apt-get install minisign)";
        if std::env::var_os("CI").is_some() {
            panic!("{why}: CI runs the signature tests");
        }
        eprintln!("skipping: {why}");
    }
    ok
}

/// A passwordless key pair in a folder of its own.
#[derive(Debug)]
pub struct KeyPair {
    pub public: PathBuf,
    pub secret: PathBuf,
}

impl KeyPair {
    /// `minisign -G -W` into `dir/<name>.pub` and `dir/<name>.key`.
    pub fn generate(dir: &Path, name: &str) -> KeyPair {
        std::fs::create_dir_all(dir).unwrap();
        let k = KeyPair {
            public: dir.join(format!("{name}.pub")),
            secret: dir.join(format!("{name}.key")),
        };
        run(command(Path::new("minisign"))
            .args(["-G", "-W", "-p"])
            .arg(&k.public)
            .arg("-s")
            .arg(&k.secret));
        k
    }

    /// The whole `.pub` file: its `untrusted comment:` line and the key line.
    pub fn pub_text(&self) -> String {
        std::fs::read_to_string(&self.public).unwrap()
    }

    /// The key line of the `.pub` file alone.
    pub fn key_line(&self) -> String {
        self.pub_text().lines().nth(1).unwrap().to_string()
    }

    /// `minisign -S -s KEY -m FILE`: writes `FILE.minisig` beside it.
    pub fn sign(&self, file: &Path) {
        run(command(Path::new("minisign"))
            .arg("-S")
            .arg("-s")
            .arg(&self.secret)
            .arg("-m")
            .arg(file));
    }
}

fn run(cmd: &mut std::process::Command) {
    let out = cmd.output().expect("minisign runs");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
