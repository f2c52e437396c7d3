//! Helpers for tests only: waiting on conditions, tarball builders (good and hostile),
//! fake agents with real `control` scripts, and free ports on 127.0.0.1.

pub mod agent;
pub mod certs;
pub mod cgroups;
pub mod fileserver;
pub mod minisign;
pub mod postgres;
pub mod tarball;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use tempfile::{tempdir, TempDir};

/// Polls `cond` every 20 ms until it holds or `timeout` passes; panics with `what` then.
/// Tests wait on conditions, never on fixed sleeps.
pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Like [`wait_for`] but the condition yields a value.
pub fn wait_for_some<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A port on 127.0.0.1 that was free a moment ago. Prefer binding `127.0.0.1:0` in-process;
/// this is for handing an address to a child binary's config file.
///
/// Ports come from outside the kernel's ephemeral range (`ip_local_port_range`), walked in
/// order from a start that depends on the process id, and one is never handed out twice in
/// a process. Taken from the ephemeral range, a port handed to a child that has not bound
/// it yet could meanwhile be picked by any `bind(127.0.0.1:0)` or outgoing connection of a
/// test running beside it: the child then fails to bind, or the test's wait for the
/// child's listener connects to that other socket and its first request is refused (CI saw
/// both).
pub fn free_port() -> u16 {
    static NEXT: std::sync::Mutex<Option<u32>> = std::sync::Mutex::new(None);
    let Some((low, high)) = outside_ephemeral() else {
        return ephemeral_port();
    };
    let span = u32::from(high - low) + 1;
    let mut next = NEXT.lock().unwrap_or_else(|e| e.into_inner());
    let start = *next.get_or_insert_with(|| std::process::id().wrapping_mul(7919) % span);
    for step in 0..span {
        let i = (start + step) % span;
        let port = low + i as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            *next = Some((i + 1) % span);
            return port;
        }
    }
    panic!("no free port on 127.0.0.1 in {low}-{high}");
}

/// The ports tests hand out: below the ephemeral range when it leaves room (Linux's
/// default starts at 32768), else above it; `None` when it covers nearly everything.
fn outside_ephemeral() -> Option<(u16, u16)> {
    const LOWEST: u16 = 20_000;
    const ROOM: u16 = 2_000;
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut it = text.split_whitespace().map(|w| w.parse::<u16>().ok());
    let (low, high) = (it.next()??, it.next()??);
    if low >= LOWEST + ROOM {
        Some((LOWEST, low - 1))
    } else if high <= u16::MAX - ROOM {
        Some((high + 1, u16::MAX))
    } else {
        None
    }
}

/// A port the kernel picks, never the same twice in one process: the fallback when the
/// ephemeral range leaves no room outside it.
fn ephemeral_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .expect("bind 127.0.0.1:0")
            .local_addr()
            .unwrap()
            .port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// Waits until something accepts TCP connections on `addr`.
pub fn wait_listening(addr: SocketAddr, timeout: Duration) {
    wait_for(&format!("{addr} to accept connections"), timeout, || {
        TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
    });
}

/// Writes `contents` to `dir/name` and returns the path.
pub fn write_file(dir: &Path, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
    let p = dir.join(name);
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(&p, contents).unwrap();
    p
}

/// Lists every path below `root` (relative, sorted), with `/` after folders: a snapshot to
/// assert that an operation left a tree exactly as it was.
pub fn tree(root: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                out.push(format!("{rel}/"));
                walk(root, &p, out);
            } else {
                out.push(rel);
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

/// `len` bytes that gzip cannot shrink (an xorshift stream from `seed`), so that a
/// tarball is about as large as its content: for full disks, cut downloads and pipes.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15).max(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Lowercase hex MD5 and SHA-256 of `data`.
pub fn digests(data: &[u8]) -> (String, String) {
    use md5::Digest as _;
    let md5 = hex::encode(md5::Md5::digest(data));
    let sha = hex::encode(sha2::Sha256::digest(data));
    (md5, sha)
}

/// Path of a workspace binary (`ops-meta`, `ops-updater`, ...), built on first use when
/// the current test run did not build it (e.g. `cargo test -p updater` needs `ops-meta`),
/// or rebuilt when a source file of the workspace is newer than it (a binary left by an
/// earlier `cargo test -p` of another crate would otherwise be tested stale).
pub fn cargo_bin(name: &str) -> PathBuf {
    // Test executables live in target/<profile>/deps; binaries one level up.
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(|d| {
            if d.ends_with("deps") {
                d.parent()
            } else {
                Some(d)
            }
        })
        .expect("target dir")
        .to_path_buf();
    let path = profile_dir.join(name);
    // Names checked (and built if needed) by this test process: cargo leaves an up-to-date
    // binary's mtime alone, so "older than a source" stays true after a no-op build.
    static CHECKED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let mut checked = CHECKED.lock().unwrap_or_else(|e| e.into_inner());
    if checked.iter().any(|n| n == name) {
        return path;
    }
    let stale = match std::fs::metadata(&path).and_then(|m| m.modified()) {
        Ok(built) => newest_source().is_some_and(|src| src > built),
        Err(_) => true,
    };
    checked.push(name.to_string());
    if stale {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = command(Path::new(&cargo));
        // From the workspace root: a virtual manifest finds the binary in any member.
        cmd.current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."))
            .args(["build", "--bin", name]);
        if profile_dir.ends_with("release") {
            cmd.arg("--release");
        }
        let st = cmd.status().expect("run cargo build");
        assert!(st.success(), "cargo build --bin {name} failed");
    }
    path
}

/// Modification time of the newest `.rs` or `Cargo.toml` under `crates/`, or of `Cargo.lock`.
fn newest_source() -> Option<std::time::SystemTime> {
    fn walk(dir: &Path, newest: &mut Option<std::time::SystemTime>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                walk(&p, newest);
            } else if p.extension().is_some_and(|x| x == "rs")
                || p.file_name().is_some_and(|n| n == "Cargo.toml")
            {
                if let Ok(t) = e.metadata().and_then(|m| m.modified()) {
                    *newest = (*newest).max(Some(t));
                }
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut newest = std::fs::metadata(root.join("Cargo.lock"))
        .and_then(|m| m.modified())
        .ok();
    walk(&root.join("crates"), &mut newest);
    newest
}

/// A `std::process::Command` for tests, with stdin closed. The daemons build their own
/// children through `updater::process`; this is the test-side counterpart.
#[allow(clippy::disallowed_methods)] // The one place tests create a Command.
pub fn command(program: &Path) -> std::process::Command {
    let mut c = std::process::Command::new(program);
    c.stdin(std::process::Stdio::null());
    c
}

/// A child process that is killed (SIGKILL) when dropped, so a failing test never leaks a
/// daemon.
#[derive(Debug)]
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl std::ops::Deref for KillOnDrop {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}
