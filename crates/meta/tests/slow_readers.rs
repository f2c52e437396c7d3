//! Clients of the real `ops-meta` binary that ask for a status page and never read it,
//! against a fleet large enough that a page is megabytes: the server's memory, the write
//! timeout, and the cap on pages sent at once.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use test_support::{wait_for, wait_listening, KillOnDrop, TempDir};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};

const BIN: &str = env!("CARGO_BIN_EXE_ops-meta");
const WAIT: Duration = Duration::from_secs(60);
/// Hosts in the fleet: the JSON page is about 9 MB, more than loopback socket buffers
/// (4 MiB to send by default, 4 KiB to receive as these clients set it) can hide.
const HOSTS: usize = 80_000;
const PAGE: &[u8] = b"GET /status/json/falcon-agent HTTP/1.1\r\nHost: x\r\n\r\n";

struct Meta {
    child: KillOnDrop,
    addr: SocketAddr,
    _dir: TempDir,
}

impl Meta {
    fn start(extra: &str) -> Meta {
        let dir = test_support::tempdir().unwrap();
        let port = test_support::free_port();
        let cfg = format!(
            r#"{{"tarballDir": "", "http": {{"enabled": true, "listen": "127.0.0.1:{port}"}}, {extra}
            "agents": [{{"default": {{"name": "falcon-agent", "version": "1.0.0",
                "tarball": "http://127.0.0.1:{port}/", "md5": "", "cmd": "start"}}}}]}}"#
        );
        let path = test_support::write_file(dir.path(), "cfg.json", cfg);
        let log = std::fs::File::create(dir.path().join("meta.log")).unwrap();
        let child = test_support::command(Path::new(BIN))
            .arg("-c")
            .arg(&path)
            // The default store (`sqlite:ops-meta.db`) goes to the test's folder.
            .current_dir(dir.path())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        wait_listening(addr, WAIT);
        Meta {
            child: KillOnDrop(child),
            addr,
            _dir: dir,
        }
    }

    /// Resident memory of the server, in KiB (`VmRSS`, or `VmHWM` for the peak).
    fn memory_kib(&self, key: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {key} in /proc/.../status"))
    }

    /// Sends `HOSTS` heartbeats, pipelined on a few connections.
    fn fill(&self) {
        std::thread::scope(|s| {
            for worker in 0..4 {
                s.spawn(move || {
                    let mut c = std::net::TcpStream::connect(self.addr).unwrap();
                    c.set_read_timeout(Some(WAIT)).unwrap();
                    let mut batch = Vec::new();
                    let mut answer = vec![0u8; 1 << 20];
                    for chunk in (worker..HOSTS).step_by(4).collect::<Vec<_>>().chunks(500) {
                        batch.clear();
                        for i in chunk {
                            let body = format!(
                                r#"{{"hostname":"web-{i:06}.dc1.example.com","realAgents":[{{"name":"falcon-agent","version":"1.0.0","status":"started","timestamp":1700000000}}]}}"#
                            );
                            write!(
                                batch,
                                "POST /heartbeat HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
                                body.len()
                            )
                            .unwrap();
                        }
                        c.write_all(&batch).unwrap();
                        // Every answer ends its body with `]}`; count them.
                        let mut seen = 0;
                        let mut tail = Vec::new();
                        while seen < chunk.len() {
                            let n = c.read(&mut answer).unwrap();
                            assert!(n > 0, "server closed the connection");
                            tail.extend_from_slice(&answer[..n]);
                            seen += tail.windows(3).filter(|w| *w == b" OK").count();
                            let keep = tail.len().saturating_sub(2);
                            tail.drain(..keep);
                        }
                    }
                });
            }
        });
    }

    /// Status code and headers of one request whose answer is read to the end.
    fn get(&self, path: &str) -> (u16, String, Vec<u8>) {
        let mut c = std::net::TcpStream::connect(self.addr).unwrap();
        c.set_read_timeout(Some(WAIT)).unwrap();
        write!(
            c,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut all = Vec::new();
        c.read_to_end(&mut all).unwrap();
        let end = all
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("a head");
        let head = String::from_utf8_lossy(&all[..end]).into_owned();
        let code = head[9..12].parse().unwrap();
        (code, head, all[end + 4..].to_vec())
    }
}

/// A client that asks for the page and then reads nothing: 4 KiB of receive buffer, so
/// the server soon has to wait for it.
async fn non_reader(addr: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.set_recv_buffer_size(4096).unwrap();
    let mut c = s.connect(addr).await.unwrap();
    c.write_all(PAGE).await.unwrap();
    c
}

/// True once the server has started answering `c` (bytes wait in its receive buffer).
async fn answered(c: &TcpStream) -> bool {
    let mut b = [0u8; 1];
    matches!(
        tokio::time::timeout(Duration::from_millis(1), c.peek(&mut b)).await,
        Ok(Ok(1))
    )
}

/// 300 clients that asked for `/status/json/NAME` and never read took ops-meta from
/// 147 MB to 1.89 GB at 102,000 hosts: each pinned a whole-fleet snapshot of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_reading_status_clients_pinned_a_fleet_snapshot_each() {
    // Each costs the server some 3 MB of page written into the kernel's send buffer of
    // its socket on loopback (serialized by a debug build): 200 is enough to tell one
    // snapshot each (about 5 MB apiece here) from a shared one.
    const CLIENTS: usize = 200;
    let m = Meta::start(&format!(
        r#""maxStatusStreams": {CLIENTS}, "writeTimeoutSecs": 600, "requestTimeoutSecs": 600,"#
    ));
    m.fill();
    // Idle: the fleet loaded, one page sent in full (the buffers a page needs exist).
    let (code, _, body) = m.get("/status/json/falcon-agent");
    assert_eq!(code, 200);
    assert!(body.len() > 8_000_000, "{} bytes", body.len());
    let idle = m.memory_kib("VmRSS");

    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(non_reader(m.addr).await);
    }
    // Each page is serialized by a debug build: on two busy cores 200 of them can take
    // longer than a minute.
    let deadline = Instant::now() + 3 * WAIT;
    for c in &clients {
        while !answered(c).await {
            assert!(Instant::now() < deadline, "not every client was answered");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    for c in &clients {
        let mut b = [0u8; 12];
        let n = c.peek(&mut b).await.unwrap();
        assert_eq!(&b[..n], b"HTTP/1.1 200");
    }
    // Every place is taken: the server is holding all of them.
    let (code, _, _) = m.get("/status/json/falcon-agent");
    assert_eq!(code, 503);
    let loaded = m.memory_kib("VmRSS");
    let peak = m.memory_kib("VmHWM");
    eprintln!(
        "{HOSTS} hosts: idle {idle} KiB, {CLIENTS} non-reading clients {loaded} KiB, peak {peak} KiB"
    );
    assert!(
        loaded < 3 * idle,
        "{CLIENTS} non-reading clients: {loaded} KiB resident, idle {idle} KiB"
    );
    assert!(peak < 3 * idle, "peak {peak} KiB, idle {idle} KiB");
    drop(clients);
}

/// A status client that never read was never dropped: the page (and its snapshot) was
/// held for as long as the client kept the connection open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_client_that_never_read_was_never_dropped() {
    let m = Meta::start(r#""maxStatusStreams": 1, "writeTimeoutSecs": 1,"#);
    m.fill();
    let (code, _, full) = m.get("/status/json/falcon-agent");
    assert_eq!(code, 200);
    let mut c = non_reader(m.addr).await;
    let asked = Instant::now();
    let deadline = asked + WAIT;
    while !answered(&c).await {
        assert!(Instant::now() < deadline, "the client was never answered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // While it holds the one place, others get 503; once the server drops it, 200.
    let mut busy = 0;
    wait_for("the non-reading client to be dropped", WAIT, || {
        let (code, _, _) = m.get("/status/json/falcon-agent");
        busy += usize::from(code == 503);
        code == 200
    });
    let dropped_after = asked.elapsed();
    assert!(busy > 0, "the non-reading client never held its place");
    assert!(
        dropped_after >= Duration::from_secs(1),
        "dropped after {dropped_after:?}, before writeTimeoutSecs"
    );
    // What it reads now ends before the page does: the connection was closed.
    let mut got = Vec::new();
    let _ = tokio::time::timeout(WAIT, tokio::io::AsyncReadExt::read_to_end(&mut c, &mut got))
        .await
        .expect("the connection is closed");
    assert!(
        got.len() < full.len(),
        "read {} bytes of a {}-byte page",
        got.len(),
        full.len()
    );
}

/// Nothing capped the status pages sent at once; past `maxStatusStreams` the answer is
/// now 503 with `Retry-After` and a text body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_pages_past_the_cap_were_not_refused() {
    let m = Meta::start(r#""maxStatusStreams": 2, "writeTimeoutSecs": 600,"#);
    m.fill();
    let a = non_reader(m.addr).await;
    let b = non_reader(m.addr).await;
    let deadline = Instant::now() + WAIT;
    for c in [&a, &b] {
        while !answered(c).await {
            assert!(Instant::now() < deadline, "a client was never answered");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    for path in ["/status/json/falcon-agent", "/status/text/other"] {
        let (code, head, body) = m.get(path);
        assert_eq!(code, 503, "{head}");
        let head = head.to_ascii_lowercase();
        assert!(head.contains("\r\nretry-after: 5"), "{head}");
        assert!(head.contains("content-type: text/plain"), "{head}");
        assert_eq!(
            String::from_utf8(body).unwrap(),
            "2 status pages are being sent, the limit (maxStatusStreams); retry later\n"
        );
    }
    // Other endpoints are not counted.
    assert_eq!(m.get("/health").0, 200);
    drop((a, b));
    wait_for("the places to be given back", WAIT, || {
        m.get("/status/text/falcon-agent").0 == 200
    });
}
