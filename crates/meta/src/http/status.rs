//! `GET /status/json/NAME`, `GET /status/text/NAME`, `GET /health`, `GET /version`.
//!
//! The status pages cover every known host, which can be a million. They are written from
//! the store's compact [`AgentStatus`] in pieces of [`PIECE`] bytes as the client reads,
//! never whole: a page that fits in one piece goes out as one plain body.
//!
//! A snapshot is as large as the fleet (about 45 bytes a host), and a client that asks
//! for a page and never reads it holds its snapshot until the write timeout drops it
//! ([`crate::wire`]). So pages being sent at the same time share snapshots: a request for
//! an agent whose snapshot is still being sent to someone gets that one when the store
//! has not changed since it was taken (its generation) or it is younger than
//! [`SHARE_WINDOW`]; only one request builds a new one at a time ([`StatusPages`]). At most `maxStatusStreams` pages are sent at once; one more gets
//! 503 with `Retry-After`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Router};
use chrono::TimeZone;
use tokio::time::Instant;

use super::{AppError, AppState};
use crate::store::{AgentStatus, StatusEntry};

/// Bytes of a status page written at a time.
pub const PIECE: usize = 64 * 1024;
/// How long a snapshot that is still being sent is given to further requests for the
/// same agent. Hosts report every few seconds or more, so a page this much older than
/// its request shows nothing a fresh one would not, give or take one round.
pub const SHARE_WINDOW: Duration = Duration::from_secs(1);
/// `Retry-After` of the 503 past `maxStatusStreams`.
pub const RETRY_AFTER_SECS: u64 = 5;

pub(super) fn router() -> Router<AppState> {
    Router::new()
        .route("/status/json/{name}", get(status_json))
        .route("/status/text/{name}", get(status_text))
        .layer(Extension(Arc::new(StatusPages::default())))
        .route("/health", get(|| async { "ok" }))
        .route("/version", get(|| async { crate::VERSION }))
}

/// What the status pages of one server share: the snapshots being sent, by agent name,
/// and the number of pages being sent.
#[derive(Debug, Default)]
pub struct StatusPages {
    snapshots: parking_lot::Mutex<HashMap<Box<str>, Arc<tokio::sync::Mutex<Shared>>>>,
    streams: Arc<AtomicU64>,
}

/// The last snapshot of one agent: alive while some page is still being sent from it.
#[derive(Debug, Default)]
struct Shared {
    snapshot: Weak<AgentStatus>,
    taken: Option<Instant>,
    /// [`crate::FleetStore::generation`] read before it was taken.
    generation: Option<u64>,
}

/// One of the `maxStatusStreams` places, held until the page is sent (or dropped).
#[derive(Debug)]
struct Stream(Arc<AtomicU64>);

impl Drop for Stream {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl StatusPages {
    /// A place to send one page, or 503 when `max` are being sent.
    fn stream(&self, max: u64) -> Result<Stream, AppError> {
        if self.streams.fetch_add(1, Ordering::AcqRel) >= max {
            self.streams.fetch_sub(1, Ordering::AcqRel);
            return Err(AppError::Busy {
                max,
                retry_after_secs: RETRY_AFTER_SECS,
            });
        }
        Ok(Stream(self.streams.clone()))
    }

    /// The snapshot of agent `name`: the one still being sent if the store has not
    /// changed since or it is recent enough, else a new one, built off the runtime while
    /// other requests for it wait.
    async fn snapshot(&self, st: &AppState, name: &str) -> Arc<AgentStatus> {
        let slot = {
            let mut m = self.snapshots.lock();
            // Forget agents nobody is sending or waiting for; what is left is bounded
            // by the pages in flight.
            m.retain(|_, s| {
                Arc::strong_count(s) > 1
                    || s.try_lock().map_or(true, |s| s.snapshot.strong_count() > 0)
            });
            m.entry(name.into()).or_default().clone()
        };
        let mut shared = slot.lock().await;
        // Read before the snapshot is taken: a change while it is built makes it stale.
        let generation = st.store.generation();
        if let (Some(s), Some(taken)) = (shared.snapshot.upgrade(), shared.taken) {
            let unchanged = generation.is_some() && generation == shared.generation;
            if unchanged || taken.elapsed() < SHARE_WINDOW {
                return s;
            }
        }
        let store = st.store.clone();
        let owned = name.to_string();
        let s = tokio::task::spawn_blocking(move || store.agent_status(&owned))
            .await
            .map(Arc::new)
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        *shared = Shared {
            snapshot: Arc::downgrade(&s),
            taken: Some(Instant::now()),
            generation,
        };
        s
    }
}

/// `{"host": {"name","version","status","timestamp"} | null, ...}`, sorted by hostname;
/// each value serialized through the proto type.
async fn status_json(
    State(st): State<AppState>,
    Extension(pages): Extension<Arc<StatusPages>>,
    Path(name): Path<String>,
) -> Result<Response, AppError> {
    status(&st, &pages, &name, Format::Json).await
}

/// One line per host: `hostname version status timestamp YYYY-MM-DD HH:MM:SS` (local
/// time), or `hostname not found`.
async fn status_text(
    State(st): State<AppState>,
    Extension(pages): Extension<Arc<StatusPages>>,
    Path(name): Path<String>,
) -> Result<Response, AppError> {
    status(&st, &pages, &name, Format::Text).await
}

async fn status(
    st: &AppState,
    pages: &StatusPages,
    name: &str,
    format: Format,
) -> Result<Response, AppError> {
    proto::validate_agent_name(name)?;
    let place = pages.stream(st.current.load().config.max_status_streams)?;
    let snapshot = pages.snapshot(st, name).await;
    let content_type = match format {
        Format::Json => "application/json",
        Format::Text => "text/plain; charset=utf-8",
    };
    Ok(page(Page::new(snapshot, format), content_type, place))
}

/// The response for a page: one body when it fits in a piece, else a stream of pieces
/// that holds `place` until it is sent or dropped.
fn page(mut p: Page, content_type: &'static str, place: Stream) -> Response {
    let first = p.next().unwrap_or_default();
    let body = if p.done {
        Body::from(first)
    } else {
        let pieces = std::iter::once(first).chain(p).map(move |piece| {
            let _held = &place;
            Ok::<_, Infallible>(piece)
        });
        Body::from_stream(futures_util::stream::iter(pieces))
    };
    (
        [(header::CONTENT_TYPE, HeaderValue::from_static(content_type))],
        body,
    )
        .into_response()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Text,
}

/// A status page being written: an iterator over its pieces.
#[derive(Debug)]
pub struct Page {
    status: Arc<AgentStatus>,
    format: Format,
    /// The next host to write.
    next: usize,
    started: bool,
    done: bool,
}

impl Page {
    pub fn new(status: Arc<AgentStatus>, format: Format) -> Page {
        Page {
            status,
            format,
            next: 0,
            started: false,
            done: false,
        }
    }
}

impl Iterator for Page {
    type Item = Vec<u8>;

    fn next(&mut self) -> Option<Vec<u8>> {
        if self.done {
            return None;
        }
        let mut out = Vec::with_capacity(PIECE + 1024);
        if !self.started {
            self.started = true;
            if self.format == Format::Json {
                out.push(b'{');
            }
        }
        while out.len() < PIECE {
            let Some(e) = self.status.get(self.next) else {
                if self.format == Format::Json {
                    out.push(b'}');
                }
                self.done = true;
                break;
            };
            match self.format {
                Format::Json => write_json(&mut out, self.next, &e),
                Format::Text => write_text(&mut out, &e),
            }
            self.next += 1;
        }
        Some(out)
    }
}

/// `"host":{...}` or `"host":null`, after a comma unless it is the first.
fn write_json(out: &mut Vec<u8>, i: usize, e: &StatusEntry<'_>) {
    if i > 0 {
        out.push(b',');
    }
    serde_json::to_writer(&mut *out, e.hostname).expect("writing to a Vec cannot fail");
    out.push(b':');
    match &e.agent {
        Some(a) => {
            serde_json::to_writer(&mut *out, &a.as_wire()).expect("writing to a Vec cannot fail")
        }
        None => out.extend_from_slice(b"null"),
    }
}

fn write_text(out: &mut Vec<u8>, e: &StatusEntry<'_>) {
    let r = match &e.agent {
        Some(a) => {
            let when = chrono::Local.timestamp_opt(a.timestamp, 0).single();
            match when {
                Some(t) => writeln!(
                    out,
                    "{} {} {} {} {}",
                    e.hostname,
                    a.version,
                    a.status,
                    a.timestamp,
                    t.format("%Y-%m-%d %H:%M:%S")
                ),
                None => writeln!(
                    out,
                    "{} {} {} {} -",
                    e.hostname, a.version, a.status, a.timestamp
                ),
            }
        }
        None => writeln!(out, "{} not found", e.hostname),
    };
    r.expect("writing to a Vec cannot fail");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{FleetStore, HostAgent, MemStore};
    use proto::legacy::{RealAgent, RealAgentRef};

    /// The pages as they were written before streaming: every host as owned values, the
    /// whole answer in one buffer.
    fn whole_json(hosts: &[HostAgent]) -> Vec<u8> {
        let mut out = vec![b'{'];
        for (i, h) in hosts.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            serde_json::to_writer(&mut out, &h.hostname).unwrap();
            out.push(b':');
            serde_json::to_writer(&mut out, &h.agent).unwrap();
        }
        out.push(b'}');
        out
    }

    fn whole_text(hosts: &[HostAgent]) -> Vec<u8> {
        let mut out = String::new();
        for h in hosts {
            match &h.agent {
                Some(a) => {
                    let when = chrono::Local
                        .timestamp_opt(a.timestamp, 0)
                        .single()
                        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                        .unwrap_or_else(|| "-".into());
                    out.push_str(&format!(
                        "{} {} {} {} {}\n",
                        h.hostname, a.version, a.status, a.timestamp, when
                    ));
                }
                None => out.push_str(&format!("{} not found\n", h.hostname)),
            }
        }
        out.into_bytes()
    }

    fn fleet(n: usize) -> MemStore {
        let s = MemStore::with_caps(1000, 50);
        for i in 0..n {
            let status = match i % 5 {
                0 => "started".to_string(),
                1 => "stoped".to_string(),
                2 => format!("error \"{}\" \\ é ✓", i % 97),
                3 => "tab\there".to_string(),
                _ => "started".to_string(),
            };
            let a = RealAgent {
                name: if i % 7 == 0 { "other" } else { "falcon-agent" }.into(),
                version: format!("1.{}", i % 11),
                status,
                // Some out of chrono's range, so the text page writes `-`.
                timestamp: if i % 1000 == 3 {
                    i64::MAX
                } else {
                    1_700_000_000 + i as i64
                },
            };
            s.record(
                &format!("web-{i:06}.dc{}", i % 3),
                &[RealAgentRef::from(&a)],
                1,
            );
        }
        s
    }

    #[test]
    fn streamed_pages_equal_the_whole_answer_for_many_hosts() {
        let s = fleet(20_000);
        let hosts = s.agent_status("falcon-agent").to_host_agents();
        assert_eq!(hosts.len(), 20_000);
        for (format, want) in [
            (Format::Json, whole_json(&hosts)),
            (Format::Text, whole_text(&hosts)),
        ] {
            let pieces: Vec<Vec<u8>> =
                Page::new(Arc::new(s.agent_status("falcon-agent")), format).collect();
            assert!(pieces.len() > 10, "{format:?}: {} pieces", pieces.len());
            assert!(pieces.iter().all(|p| p.len() < PIECE + 1024));
            let got: Vec<u8> = pieces.concat();
            assert_eq!(
                String::from_utf8(got).unwrap(),
                String::from_utf8(want).unwrap()
            );
        }
        let v: serde_json::Value = serde_json::from_slice(
            &Page::new(Arc::new(s.agent_status("falcon-agent")), Format::Json)
                .collect::<Vec<_>>()
                .concat(),
        )
        .unwrap();
        assert_eq!(v.as_object().unwrap().len(), 20_000);
    }

    #[test]
    fn small_and_empty_pages_are_one_piece() {
        let s = MemStore::new();
        let mut p = Page::new(Arc::new(s.agent_status("a")), Format::Json);
        assert_eq!(p.next().unwrap(), b"{}");
        assert!(p.done);
        assert_eq!(p.next(), None);
        let mut p = Page::new(Arc::new(s.agent_status("a")), Format::Text);
        assert_eq!(p.next().unwrap(), b"");
        assert!(p.done);
        let s = fleet(10);
        let hosts = s.agent_status("falcon-agent").to_host_agents();
        let mut p = Page::new(Arc::new(s.agent_status("falcon-agent")), Format::Json);
        assert_eq!(p.next().unwrap(), whole_json(&hosts));
        assert!(p.done);
    }
}
