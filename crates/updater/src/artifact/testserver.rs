//! A tiny HTTP/1.1 file server on 127.0.0.1:0 for the artifact tests, written on raw TCP so
//! that it can misbehave on purpose: cut a body half-way, stall, hold it until told to go
//! on, ignore `Range`, omit `Content-Length`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How the server answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Honour `Range` (206, or 416 past the end).
    Normal,
    /// Always answer 200 with the whole file.
    IgnoreRange,
    /// The first request announces the whole length, sends this many bytes and hangs up;
    /// later requests are served normally.
    CutFirstAfter(usize),
    /// Announce the whole length, send this many bytes, then go silent.
    Stall(usize),
    /// Send the whole file without `Content-Length`, ending it by closing the connection.
    NoLength,
    /// Announce the whole length, send this many bytes, then wait for [`Server::release`]
    /// before sending the rest.
    HoldAfter(usize),
}

pub(crate) struct Server {
    pub addr: SocketAddr,
    /// Request heads (lowercased) in the order they arrived.
    pub requests: Arc<Mutex<Vec<String>>>,
    release: tokio::sync::watch::Sender<bool>,
}

impl Server {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}/{}", self.addr, path.trim_start_matches('/'))
    }
    pub fn heads(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
    /// Lets bodies held by [`Mode::HoldAfter`] go on.
    pub fn release(&self) {
        self.release.send_replace(true);
    }
}

pub(crate) async fn serve(files: HashMap<String, Vec<u8>>, mode: Mode) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests: Arc<Mutex<Vec<String>>> = Arc::default();
    let files = Arc::new(files);
    let reqs = requests.clone();
    let (release, released) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                return;
            };
            let (files, reqs, released) = (files.clone(), reqs.clone(), released.clone());
            tokio::spawn(async move {
                let _ = answer(sock, &files, &reqs, mode, released).await;
            });
        }
    });
    Server {
        addr,
        requests,
        release,
    }
}

async fn answer(
    mut sock: TcpStream,
    files: &HashMap<String, Vec<u8>>,
    reqs: &Mutex<Vec<String>>,
    mode: Mode,
    mut released: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = sock.read(&mut buf).await?;
        if n == 0 || head.len() > 16 * 1024 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let index = {
        let mut r = reqs.lock().unwrap();
        r.push(head.clone());
        r.len() - 1
    };
    let path = head
        .split_whitespace()
        .nth(1)
        .unwrap_or("/")
        .trim_start_matches('/')
        .to_string();
    let range: Option<u64> = head
        .lines()
        .find_map(|l| l.strip_prefix("range: bytes="))
        .and_then(|r| r.trim().trim_end_matches('-').parse().ok());
    let Some(body) = files.get(&path) else {
        sock.write_all(
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 9\r\nconnection: close\r\n\r\nnot found",
        )
        .await?;
        return Ok(());
    };
    let len = body.len();
    let full = format!("HTTP/1.1 200 OK\r\ncontent-length: {len}\r\nconnection: close\r\n\r\n");
    match mode {
        Mode::CutFirstAfter(n) if index == 0 => {
            sock.write_all(full.as_bytes()).await?;
            sock.write_all(&body[..n]).await?;
            sock.flush().await?;
            return Ok(());
        }
        Mode::Stall(n) => {
            sock.write_all(full.as_bytes()).await?;
            sock.write_all(&body[..n]).await?;
            sock.flush().await?;
            tokio::time::sleep(Duration::from_secs(3600)).await;
            return Ok(());
        }
        Mode::HoldAfter(n) => {
            sock.write_all(full.as_bytes()).await?;
            sock.write_all(&body[..n]).await?;
            sock.flush().await?;
            let _ = released.wait_for(|go| *go).await;
            sock.write_all(&body[n..]).await?;
            return sock.flush().await;
        }
        Mode::NoLength => {
            sock.write_all(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n")
                .await?;
            sock.write_all(body).await?;
            return Ok(());
        }
        _ => {}
    }
    match range {
        Some(start) if mode != Mode::IgnoreRange => {
            let start = start as usize;
            if start >= len {
                let h = format!("HTTP/1.1 416 Range Not Satisfiable\r\ncontent-range: bytes */{len}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                sock.write_all(h.as_bytes()).await?;
            } else {
                let h = format!(
                    "HTTP/1.1 206 Partial Content\r\ncontent-range: bytes {start}-{}/{len}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    len - 1,
                    len - start
                );
                sock.write_all(h.as_bytes()).await?;
                sock.write_all(&body[start..]).await?;
            }
        }
        _ => {
            sock.write_all(full.as_bytes()).await?;
            sock.write_all(body).await?;
        }
    }
    sock.flush().await
}
