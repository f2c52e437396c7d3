//! A static file server that is not ours — Python's `http.server` (Last-Modified, 304 on
//! If-Modified-Since, no ETag) — for tests where tarballs live on a separate web server, as
//! operators deploy them.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use crate::{command, free_port, wait_listening, KillOnDrop, TempDir};

/// `python3 -m http.server` serving a temporary folder on 127.0.0.1; killed on drop.
#[derive(Debug)]
pub struct FileServer {
    _child: KillOnDrop,
    pub dir: TempDir,
    pub addr: SocketAddr,
}

impl FileServer {
    pub fn start() -> FileServer {
        let dir = crate::tempdir().unwrap();
        let port = free_port();
        let mut cmd = command(Path::new("python3"));
        cmd.args(["-m", "http.server", "--bind", "127.0.0.1"])
            .arg(port.to_string())
            .arg("--directory")
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let child = KillOnDrop(
            cmd.spawn()
                .expect("python3 runs the separate static file server"),
        );
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        wait_listening(addr, Duration::from_secs(30));
        FileServer {
            _child: child,
            dir,
            addr,
        }
    }

    /// `http://127.0.0.1:PORT/{path}` (no trailing slash).
    pub fn url(&self, path: &str) -> String {
        format!("http://{}/{}", self.addr, path.trim_matches('/'))
    }
}
