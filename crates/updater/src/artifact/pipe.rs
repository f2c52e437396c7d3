//! A bounded byte pipe from a download in progress (async) to the unpacker (a blocking
//! thread), so that a tarball is inflated and unpacked while it is still arriving.
//!
//! The bound is in bytes, not chunks: the network hands over chunks of any size, and a slow
//! disk on the unpacking side must hold the download back (and, through TCP flow control,
//! the server) rather than let memory grow.

use std::io::{self, BufRead, Read};
use std::sync::Arc;

use bytes::{Buf, Bytes};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

/// Most bytes in flight between the download and the unpacker, in [`pipe`]'s default use.
pub(crate) const PIPE_BUDGET_BYTES: usize = 4 << 20;

enum Msg {
    /// A chunk and the share of the budget it holds until the reader is done with it.
    Data(Bytes, OwnedSemaphorePermit),
    /// The download finished: the reader sees the end of the stream.
    End,
}

/// The sending half, used by the download.
pub(crate) struct Feed {
    tx: mpsc::UnboundedSender<Msg>,
    budget: Arc<Semaphore>,
    budget_bytes: usize,
    stopped: bool,
}

/// The receiving half, read by the unpacker on a blocking thread.
pub(crate) struct Pipe {
    rx: mpsc::UnboundedReceiver<Msg>,
    cur: Bytes,
    /// Released when `cur` is used up, letting the download send more.
    held: Option<OwnedSemaphorePermit>,
    ended: bool,
    budget: Arc<Semaphore>,
}

/// A pipe holding at most `budget_bytes` (plus one chunk larger than that, if the network
/// hands one over).
pub(crate) fn pipe(budget_bytes: usize) -> (Feed, Pipe) {
    let budget_bytes = budget_bytes.clamp(1, u32::MAX as usize);
    let budget = Arc::new(Semaphore::new(budget_bytes));
    let (tx, rx) = mpsc::unbounded_channel();
    (
        Feed {
            tx,
            budget: budget.clone(),
            budget_bytes,
            stopped: false,
        },
        Pipe {
            rx,
            cur: Bytes::new(),
            held: None,
            ended: false,
            budget,
        },
    )
}

impl Feed {
    /// Hands `chunk` to the reader, waiting while the pipe is full. Returns false when the
    /// reader has gone (the unpacker failed): the download should stop.
    pub(crate) async fn send(&mut self, chunk: Bytes) -> bool {
        if self.stopped {
            return false;
        }
        if chunk.is_empty() {
            return true;
        }
        // A chunk larger than the whole budget takes all of it rather than waiting forever.
        let n = chunk.len().min(self.budget_bytes) as u32;
        let sent = match self.budget.clone().acquire_many_owned(n).await {
            Ok(permit) => self.tx.send(Msg::Data(chunk, permit)).is_ok(),
            Err(_) => false,
        };
        self.stopped = !sent;
        sent
    }

    /// Resolves once the reader has gone (the unpacker stopped), and counts that as a
    /// stop, as [`Feed::send`] would have found it.
    pub(crate) async fn closed(&mut self) {
        self.tx.closed().await;
        self.stopped = true;
    }

    /// True when a [`Feed::send`] found the reader gone.
    pub(crate) fn stopped(&self) -> bool {
        self.stopped
    }

    /// Marks the end of the stream. Dropping a feed without calling this makes the reader
    /// fail instead: a download cut short is never mistaken for a whole tarball.
    pub(crate) fn end(self) {
        let _ = self.tx.send(Msg::End);
    }
}

impl Pipe {
    /// Reads and drops whatever is left up to the end of the stream. The unpacker stops at
    /// the tar end-of-archive blocks; the rest (padding, the gzip trailer) must still be
    /// taken so that the download is not told to stop.
    pub(crate) fn drain(&mut self) -> io::Result<()> {
        loop {
            let n = self.fill_buf()?.len();
            if n == 0 {
                return Ok(());
            }
            self.consume(n);
        }
    }
}

impl BufRead for Pipe {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        while self.cur.is_empty() && !self.ended {
            self.held = None;
            // Blocking: the unpacker runs on a thread of its own, outside the runtime.
            match self.rx.blocking_recv() {
                Some(Msg::Data(chunk, permit)) => {
                    self.cur = chunk;
                    self.held = Some(permit);
                }
                Some(Msg::End) => self.ended = true,
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the download stopped before the end of the tarball",
                    ))
                }
            }
        }
        Ok(&self.cur)
    }

    fn consume(&mut self, amt: usize) {
        self.cur.advance(amt.min(self.cur.len()));
        if self.cur.is_empty() {
            self.held = None;
        }
    }
}

impl Read for Pipe {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let avail = self.fill_buf()?;
        let n = avail.len().min(buf.len());
        buf[..n].copy_from_slice(&avail[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        // Wakes a download waiting for room, so that it notices at once that nobody reads.
        self.budget.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bytes_arrive_in_order_and_end_is_eof() {
        let (mut feed, mut pipe) = pipe(16);
        let reader = tokio::task::spawn_blocking(move || {
            let mut got = Vec::new();
            pipe.read_to_end(&mut got).map(|_| got)
        });
        let mut want = Vec::new();
        for i in 0..100u8 {
            // Chunks smaller and larger than the budget.
            let chunk = vec![i; (i as usize % 40) + 1];
            want.extend_from_slice(&chunk);
            assert!(feed.send(Bytes::from(chunk)).await);
        }
        feed.end();
        assert_eq!(reader.await.unwrap().unwrap(), want);
    }

    #[tokio::test]
    async fn a_feed_dropped_without_end_is_an_error_for_the_reader() {
        let (mut feed, mut pipe) = pipe(1024);
        assert!(feed.send(Bytes::from_static(b"half a tarball")).await);
        drop(feed);
        let e = tokio::task::spawn_blocking(move || {
            let mut got = Vec::new();
            pipe.read_to_end(&mut got)
        })
        .await
        .unwrap()
        .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn a_full_pipe_holds_the_sender_back_and_a_gone_reader_stops_it() {
        let (mut feed, pipe) = pipe(8);
        assert!(feed.send(Bytes::from_static(b"12345678")).await);
        // Full: the next send waits until the reader takes something or goes away.
        let blocked = tokio::spawn(async move {
            let sent = feed.send(Bytes::from_static(b"9")).await;
            (sent, feed.stopped())
        });
        tokio::task::yield_now().await;
        assert!(!blocked.is_finished());
        drop(pipe);
        assert_eq!(blocked.await.unwrap(), (false, true));
    }
}
