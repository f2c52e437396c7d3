//! The socket under every hyper connection: what hyper writes is held in a small buffer
//! that the connection's own task sends, so that a client that stops reading is dropped
//! after `writeTimeoutSecs` without progress, and the answers hyper makes by itself for
//! requests it cannot parse get a plain-text body like every other error.
//!
//! Why a buffer of our own: hyper 1.x answers a request head it cannot parse (400), whose
//! URI is too long (414) or whose header fields are too large (431) from inside its
//! connection (`proto::h1::role::Server::on_error`), as a bare head with
//! `content-length: 0`, and then closes. No builder option, callback or service sees that
//! answer. It is, however, always the last thing hyper writes, immediately before the
//! connection future returns the parse error; bytes are sent only after each poll of that
//! future, so when the error comes the head is still here, unsent, at the end of the
//! buffer, and [`Wire`] replaces it with the same status carrying a text body.
//!
//! The socket is a type parameter: a `TcpStream` for the plain listener, a rustls stream
//! over one for the `tls` listener. A TLS stream keeps records it could not send yet in
//! its own buffer, so sending also flushes it (a no-op on a `TcpStream`).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::http::AppError;

/// Unsent bytes past which hyper has to wait for the client to read some. What hyper
/// hands over at once is taken whole (its own buffer then empties), so the buffer can
/// hold up to this plus [`MAX_HEAD_BYTES`] plus a piece of the body being written.
pub const BUFFER: usize = 16 * 1024;
/// Header fields hyper reads in one request: hyper's default, left alone because any
/// other value makes hyper allocate its header table on the heap for every request.
pub const MAX_HEADER_FIELDS: usize = 100;
/// Largest request head (hyper's `max_header_size`), and what hyper buffers of an answer
/// before it waits (its `max_buf_size`, by default 408 KiB). A client that does not read
/// costs this, plus [`BUFFER`], plus a piece of the body being written.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Longest request URI hyper takes (fixed inside hyper).
pub const MAX_URI_BYTES: usize = u16::MAX as usize - 1;

/// The sending half: owned by the connection task, which polls the hyper connection
/// through [`Wire::poll_drive`].
pub struct Wire<S> {
    inner: Arc<Mutex<Inner<S>>>,
    write_timeout: Duration,
    /// Runs while bytes wait for a client that does not read; reset on progress.
    stall: Option<Pin<Box<Sleep>>>,
    /// What the hyper connection ended with, once it has.
    ended: Option<Result<(), hyper::Error>>,
}

/// The half hyper reads from and writes into.
pub struct Io<S> {
    inner: Arc<Mutex<Inner<S>>>,
}

struct Inner<S> {
    stream: S,
    out: Vec<u8>,
    /// Bytes of `out` already sent.
    sent: usize,
    /// hyper was refused a write because the buffer was full: poll it again once there
    /// is room (nothing else wakes it).
    blocked: bool,
}

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
pub enum End {
    #[error(transparent)]
    Http(#[from] hyper::Error),
    #[error("sending: {0}")]
    Io(#[from] io::Error),
    #[error("client read nothing for {0:?} (writeTimeoutSecs)")]
    WriteTimeout(Duration),
}

impl<S: AsyncRead + AsyncWrite + Unpin> Wire<S> {
    /// Splits `stream` into the half for hyper and the half the task sends with.
    pub fn new(stream: S, write_timeout: Duration) -> (Wire<S>, Io<S>) {
        let inner = Arc::new(Mutex::new(Inner {
            stream,
            out: Vec::new(),
            sent: 0,
            blocked: false,
        }));
        let wire = Wire {
            inner: inner.clone(),
            write_timeout,
            stall: None,
            ended: None,
        };
        (wire, Io { inner })
    }

    /// Polls `conn` (a hyper connection over this wire's [`Io`]) and sends what it wrote;
    /// ready when the connection has ended and everything it wrote was sent, or when the
    /// client has read nothing for the write timeout.
    pub fn poll_drive<C>(
        &mut self,
        cx: &mut Context<'_>,
        mut conn: Pin<&mut C>,
    ) -> Poll<Result<(), End>>
    where
        C: Future<Output = Result<(), hyper::Error>>,
    {
        // Bounded, so that a connection that always has more to send still yields.
        for _ in 0..16 {
            if self.ended.is_none() {
                if let Poll::Ready(r) = conn.as_mut().poll(cx) {
                    if let Err(e) = &r {
                        if e.is_parse() {
                            let mut inner = self.inner.lock();
                            let from = inner.sent;
                            give_text_body(&mut inner.out, from);
                        }
                    }
                    self.ended = Some(r);
                }
            }
            let mut inner = self.inner.lock();
            let blocked = std::mem::take(&mut inner.blocked);
            let before = inner.sent;
            let flushed = inner.send(cx)?;
            let progressed = inner.sent > before;
            drop(inner);
            if progressed {
                self.stall = None;
            }
            if flushed {
                self.stall = None;
                if let Some(r) = self.ended.take() {
                    let mut inner = self.inner.lock();
                    // Best effort: the client may already be gone.
                    let _ = Pin::new(&mut inner.stream).poll_shutdown(cx);
                    return Poll::Ready(r.map_err(End::from));
                }
                if blocked {
                    continue;
                }
                return Poll::Pending;
            }
            // Bytes wait for the client (the socket registered our waker).
            if blocked && progressed && self.ended.is_none() {
                continue;
            }
            let deadline = Instant::now() + self.write_timeout;
            let stall = self
                .stall
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
            if stall.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(End::WriteTimeout(self.write_timeout)));
            }
            return Poll::Pending;
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Inner<S> {
    fn pending(&self) -> usize {
        self.out.len() - self.sent
    }

    /// Sends what it can; true when nothing is left.
    fn send(&mut self, cx: &mut Context<'_>) -> io::Result<bool> {
        while self.sent < self.out.len() {
            match Pin::new(&mut self.stream).poll_write(cx, &self.out[self.sent..]) {
                Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                Poll::Ready(Ok(n)) => self.sent += n,
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => return Ok(false),
            }
        }
        // What a TLS stream still holds counts as unsent.
        match Pin::new(&mut self.stream).poll_flush(cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => return Err(e),
            Poll::Pending => return Ok(false),
        }
        self.out.clear();
        self.sent = 0;
        // A long page grew the buffer past its usual size: give the memory back.
        if self.out.capacity() > 4 * BUFFER {
            self.out = Vec::new();
        }
        Ok(true)
    }

    /// Takes `bufs` whole when there is room, else refuses them all (hyper retries).
    fn take(&mut self, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        if self.pending() >= BUFFER {
            self.blocked = true;
            return Poll::Pending;
        }
        if self.sent > 0 {
            // Keep only what is unsent, so a client that reads slowly never makes the
            // buffer grow with what it has already read.
            self.out.drain(..self.sent);
            self.sent = 0;
        }
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        self.out.reserve_exact(total);
        let mut n = 0;
        for b in bufs {
            self.out.extend_from_slice(b);
            n += b.len();
        }
        Poll::Ready(Ok(n))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Io<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner.lock().stream).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Io<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.inner.lock().take(&[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.inner.lock().take(bufs)
    }

    fn is_write_vectored(&self) -> bool {
        // hyper then hands over heads and body pieces as they are, without first copying
        // them into a buffer of its own.
        true
    }

    /// The task sends after every poll of the connection.
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// The task shuts the socket down once everything is sent.
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// If the unsent bytes (`out[from..]`) end with hyper's own answer to a request it could
/// not parse — a head of status 400, 414 or 431 with `content-length: 0` and nothing but
/// `connection: close` and `date` besides, nothing after — replaces it with the same status carrying [`AppError`]'s text.
/// Returns whether it did.
fn give_text_body(out: &mut Vec<u8>, from: usize) -> bool {
    let unsent = &out[from..];
    let Some(start) = unsent.windows(7).rposition(|w| w == b"HTTP/1.") else {
        return false;
    };
    let Ok(head) = std::str::from_utf8(&unsent[start..]) else {
        return false;
    };
    let Some(lines) = head.strip_suffix("\r\n\r\n") else {
        return false;
    };
    let mut lines = lines.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let (version, code) = (status_line.get(..8), status_line.get(9..12));
    let err = match code {
        Some("400") => AppError::MalformedRequest,
        Some("414") => AppError::UriTooLong { max: MAX_URI_BYTES },
        Some("431") => AppError::HeadersTooLarge {
            fields: MAX_HEADER_FIELDS,
            bytes: MAX_HEAD_BYTES,
        },
        _ => return false,
    };
    let (mut empty, mut date) = (false, None);
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return false;
        };
        match (name.to_ascii_lowercase().as_str(), value.trim()) {
            ("content-length", "0") => empty = true,
            ("connection", "close") => {}
            ("date", d) => date = Some(d),
            _ => return false,
        }
    }
    if !empty {
        return false;
    }
    let body = format!("{err}\n");
    let status = err.status();
    let mut answer = format!(
        "{} {} {}\r\ncontent-type: text/plain; charset=utf-8\r\nx-content-type-options: nosniff\r\nconnection: close\r\ncontent-length: {}\r\n",
        version.unwrap_or("HTTP/1.1"),
        status.as_str(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    );
    if let Some(d) = date {
        answer.push_str(&format!("date: {d}\r\n"));
    }
    answer.push_str("\r\n");
    answer.push_str(&body);
    out.truncate(from + start);
    out.extend_from_slice(answer.as_bytes());
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(before: &str, hyper_wrote: &str, want: Option<&str>) {
        let mut out = format!("{before}{hyper_wrote}").into_bytes();
        let changed = give_text_body(&mut out, before.len());
        let got = String::from_utf8(out).unwrap();
        match want {
            Some(w) => {
                assert!(changed, "{hyper_wrote:?} was left alone");
                assert_eq!(got, format!("{before}{w}"));
            }
            None => {
                assert!(!changed, "{hyper_wrote:?} was changed into {got:?}");
                assert_eq!(got, format!("{before}{hyper_wrote}"));
            }
        }
    }

    #[test]
    fn hypers_bare_error_heads_get_a_text_body() {
        let date = "date: Tue, 15 Nov 1994 08:12:31 GMT\r\n";
        let body = "request header fields are too large: at most 100 fields and 65536 bytes\n";
        check(
            "",
            &format!("HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\ncontent-length: 0\r\n{date}\r\n"),
            Some(&format!(
                "HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain; charset=utf-8\r\nx-content-type-options: nosniff\r\nconnection: close\r\ncontent-length: {}\r\n{date}\r\n{body}",
                body.len()
            )),
        );
        // After an earlier answer on the same connection, still unsent.
        let earlier = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        let got = {
            let mut out = format!("{earlier}HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
                .into_bytes();
            assert!(give_text_body(&mut out, 0));
            String::from_utf8(out).unwrap()
        };
        assert!(got.starts_with(earlier), "{got}");
        assert!(got.ends_with("\r\n\r\nmalformed HTTP request\n"), "{got}");
        let mut out = b"HTTP/1.1 414 URI Too Long\r\ncontent-length: 0\r\n\r\n".to_vec();
        assert!(give_text_body(&mut out, 0));
        assert!(String::from_utf8(out)
            .unwrap()
            .ends_with("request URI is longer than 65534 bytes\n"));
    }

    #[test]
    fn other_bytes_are_left_alone() {
        for tail in [
            "",
            "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
            "HTTP/1.1 400 Bad Request\r\ncontent-length: 5\r\n\r\nhello",
            "HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nx-other: 1\r\n\r\n",
            "HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n",
            "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n",
            "some body bytes HTTP/1.",
        ] {
            check("xyz", tail, None);
        }
    }
}
