//! Static files from `tarballDir` (tarballs and their `.md5`), for GET and HEAD at any
//! path no other route takes.
//!
//! Nothing outside `tarballDir` can be reached: encoded slashes, backslashes and NUL are
//! refused before decoding; `.` and `..` segments, empty segments (`//abs`) and hidden
//! names are refused after; and the canonical path (symlinks resolved) must still lie
//! inside the canonical `tarballDir`. Files are streamed, with ranges, validators and
//! conditional requests; folders are never listed.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::Response;
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::{AppError, AppState};
use crate::tarfs::TarfsError;

/// Size of one chunk read from disk and sent.
const CHUNK: usize = 128 * 1024;

pub(super) async fn serve(State(st): State<AppState>, req: Request) -> Result<Response, AppError> {
    let method = req.method().clone();
    if method != Method::GET && method != Method::HEAD {
        return Err(AppError::MethodNotAllowed);
    }
    let dir = st.current.load().config.tarball_dir.clone();
    if dir.as_os_str().is_empty() {
        return Err(AppError::NotFound);
    }
    // Resolution and opening are one blocking step with the file server's rules
    // (`tarfs`): a FIFO or device in tarballDir is refused, never waited on.
    let path = req.uri().path().to_string();
    let opened = tokio::task::spawn_blocking(move || crate::tarfs::open(&dir, &path))
        .await
        .map_err(|e| AppError::Internal(e.to_string()))?;
    let (file, full, md) = match opened {
        Ok(o) => o,
        Err(TarfsError::BadPath(why)) => return Err(AppError::BadPath(why)),
        Err(TarfsError::Outside) => {
            tracing::warn!(path = %req.uri().path(), "refused: resolves outside tarballDir or to a hidden file");
            return Err(AppError::NotFound);
        }
        Err(TarfsError::NotRegular) => {
            tracing::warn!(path = %req.uri().path(), "refused: not a regular file");
            return Err(AppError::NotFound);
        }
        Err(TarfsError::NotFound) => return Err(AppError::NotFound),
        Err(TarfsError::Io(e)) => {
            tracing::warn!(path = %req.uri().path(), error = %e, "cannot open file");
            return Err(AppError::NotFound);
        }
    };
    let mut file = tokio::fs::File::from_std(file);
    let len = md.len();
    let mtime = md.modified().unwrap_or(UNIX_EPOCH);
    let etag = etag(len, mtime);
    let last_modified = httpdate::fmt_http_date(mtime);
    let headers = req.headers();

    let mut builder = Response::builder()
        .header(header::ETAG, &etag)
        .header(header::LAST_MODIFIED, &last_modified)
        .header(header::ACCEPT_RANGES, "bytes");
    if not_modified(headers, &etag, mtime) {
        return builder
            .status(StatusCode::NOT_MODIFIED)
            .body(Body::empty())
            .map_err(|e| AppError::Internal(e.to_string()));
    }

    let range = match headers.get(header::RANGE).and_then(|v| v.to_str().ok()) {
        Some(r) if if_range_holds(headers, &etag, mtime) => parse_range(r, len),
        _ => RangeReq::Full,
    };
    let (status, start, count) = match range {
        RangeReq::Full => (StatusCode::OK, 0, len),
        RangeReq::One(s, e) => {
            builder = builder.header(header::CONTENT_RANGE, format!("bytes {s}-{e}/{len}"));
            (StatusCode::PARTIAL_CONTENT, s, e - s + 1)
        }
        RangeReq::Unsatisfiable => return Err(AppError::RangeNotSatisfiable { len }),
    };
    builder = builder
        .status(status)
        .header(header::CONTENT_TYPE, content_type(&full))
        .header(header::CONTENT_LENGTH, count);
    let body = if method == Method::HEAD {
        Body::empty()
    } else {
        if start > 0 {
            file.seek(std::io::SeekFrom::Start(start))
                .await
                .map_err(|e| AppError::Internal(format!("seek {}: {e}", full.display())))?;
        }
        Body::from_stream(stream_file(file, count))
    };
    builder
        .body(body)
        .map_err(|e| AppError::Internal(e.to_string()))
}

/// Streams `count` bytes of `file` from its current position, one chunk at a time.
fn stream_file(
    file: tokio::fs::File,
    count: u64,
) -> impl futures_util::Stream<Item = std::io::Result<Bytes>> + Send {
    futures_util::stream::try_unfold((file, count), |(mut f, left)| async move {
        if left == 0 {
            return Ok(None);
        }
        let n = left.min(CHUNK as u64) as usize;
        let mut buf = BytesMut::zeroed(n);
        let got = f.read(&mut buf).await?;
        if got == 0 {
            // The file shrank while we sent it: end the response short rather than pad.
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "file shrank while being sent",
            ));
        }
        buf.truncate(got);
        Ok(Some((buf.freeze(), (f, left - got as u64))))
    })
}

fn content_type(p: &Path) -> &'static str {
    let name = p
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    if name.ends_with(".md5") || name.ends_with(".txt") {
        "text/plain; charset=utf-8"
    } else if name.ends_with(".gz") || name.ends_with(".tgz") {
        "application/gzip"
    } else {
        "application/octet-stream"
    }
}

/// A strong validator from size and modification time.
fn etag(len: u64, mtime: SystemTime) -> String {
    let nanos = mtime
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("\"{len:x}-{nanos:x}\"")
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `If-None-Match` (when present, it alone decides), else `If-Modified-Since`.
fn not_modified(h: &HeaderMap, etag: &str, mtime: SystemTime) -> bool {
    not_modified_at(h, etag, mtime, SystemTime::now())
}

/// [`not_modified`] with the server's clock reading `now`. An `If-Modified-Since` later
/// than `now` is invalid (RFC 9110, 13.1.3) and ignored: a client with a clock ahead, or
/// one guessing, must get the file rather than a 304 for a copy it may not have.
fn not_modified_at(h: &HeaderMap, etag: &str, mtime: SystemTime, now: SystemTime) -> bool {
    if let Some(inm) = h.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()) {
        let bare = etag.trim_start_matches("W/");
        return inm
            .split(',')
            .map(str::trim)
            .any(|t| t == "*" || t.trim_start_matches("W/") == bare);
    }
    if let Some(ims) = h
        .get(header::IF_MODIFIED_SINCE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| httpdate::parse_http_date(v).ok())
    {
        return secs(ims) <= secs(now) && secs(mtime) <= secs(ims);
    }
    false
}

/// `If-Range`: the range applies only when the validator still matches (strong ETag
/// comparison, or the exact `Last-Modified` date).
fn if_range_holds(h: &HeaderMap, etag: &str, mtime: SystemTime) -> bool {
    let Some(v) = h.get(header::IF_RANGE).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let v = v.trim();
    if v.starts_with('"') || v.starts_with("W/") {
        return v == etag;
    }
    httpdate::parse_http_date(v).is_ok_and(|d| secs(d) == secs(mtime))
}

#[derive(Debug, PartialEq, Eq)]
pub enum RangeReq {
    Full,
    /// First and last byte, inclusive.
    One(u64, u64),
    Unsatisfiable,
}

/// One `bytes=` range; several ranges or a malformed header get the whole file, as RFC
/// 9110 allows. Positions too large for a `u64` are still positions: a last byte past the
/// end is clamped to the last byte, a first byte past the end is unsatisfiable.
pub fn parse_range(h: &str, len: u64) -> RangeReq {
    let Some(spec) = h.trim().strip_prefix("bytes=") else {
        return RangeReq::Full;
    };
    if spec.contains(',') {
        return RangeReq::Full;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeReq::Full;
    };
    let num = |s: &str| -> Option<u64> {
        if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
            None
        } else {
            // Only digits: the one way to fail is overflow, which is past any length.
            Some(s.parse().unwrap_or(u64::MAX))
        }
    };
    match (a.is_empty(), num(a), num(b)) {
        // bytes=-N: the last N bytes.
        (true, _, Some(n)) => {
            if n == 0 || len == 0 {
                RangeReq::Unsatisfiable
            } else {
                RangeReq::One(len.saturating_sub(n), len - 1)
            }
        }
        (false, Some(s), None) if b.is_empty() => {
            if s >= len {
                RangeReq::Unsatisfiable
            } else {
                RangeReq::One(s, len - 1)
            }
        }
        (false, Some(s), Some(e)) if s <= e => {
            if s >= len {
                RangeReq::Unsatisfiable
            } else {
                RangeReq::One(s, e.min(len - 1))
            }
        }
        _ => RangeReq::Full,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        let cases = [
            ("bytes=0-9", 100, RangeReq::One(0, 9)),
            ("bytes=90-", 100, RangeReq::One(90, 99)),
            ("bytes=-10", 100, RangeReq::One(90, 99)),
            ("bytes=-1000", 100, RangeReq::One(0, 99)),
            ("bytes=50-1000", 100, RangeReq::One(50, 99)),
            ("bytes=100-", 100, RangeReq::Unsatisfiable),
            ("bytes=100-200", 100, RangeReq::Unsatisfiable),
            ("bytes=-0", 100, RangeReq::Unsatisfiable),
            ("bytes=0-", 0, RangeReq::Unsatisfiable),
            ("bytes=9-0", 100, RangeReq::Full),
            ("bytes=0-1,5-6", 100, RangeReq::Full),
            ("items=0-1", 100, RangeReq::Full),
            ("bytes=a-b", 100, RangeReq::Full),
            ("bytes=+1-2", 100, RangeReq::Full),
        ];
        for (h, len, want) in cases {
            assert_eq!(parse_range(h, len), want, "{h} of {len}");
        }
    }

    /// `Range: bytes=0-<huge>` got 200 with the whole file: a last-byte-pos too large for
    /// a u64 failed to parse and the header was ignored, where RFC 9110 clamps it to the
    /// last byte (206).
    #[test]
    fn huge_range_positions_clamp_to_the_length() {
        let huge = "9".repeat(40);
        let cases = [
            (format!("bytes=0-{huge}"), 100, RangeReq::One(0, 99)),
            (format!("bytes=10-{}", u64::MAX), 100, RangeReq::One(10, 99)),
            (format!("bytes=-{huge}"), 100, RangeReq::One(0, 99)),
            (format!("bytes={huge}-"), 100, RangeReq::Unsatisfiable),
            (format!("bytes={huge}-{huge}"), 100, RangeReq::Unsatisfiable),
            (format!("bytes={huge}-5"), 100, RangeReq::Full),
            (format!("bytes=0-{huge}"), 0, RangeReq::Unsatisfiable),
        ];
        for (h, len, want) in cases {
            assert_eq!(parse_range(&h, len), want, "{h} of {len}");
        }
    }

    /// An `If-Modified-Since` later than the server's clock got 304; RFC 9110 (13.1.3)
    /// makes such a date invalid, so the header is ignored and the file sent.
    #[test]
    fn if_modified_since_in_the_future_is_ignored() {
        let mtime = UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        let now = mtime + std::time::Duration::from_secs(3600);
        let check = |ims: SystemTime, want: bool| {
            let mut h = HeaderMap::new();
            h.insert(
                header::IF_MODIFIED_SINCE,
                httpdate::fmt_http_date(ims).parse().unwrap(),
            );
            assert_eq!(
                not_modified_at(&h, "\"x\"", mtime, now),
                want,
                "If-Modified-Since {}",
                httpdate::fmt_http_date(ims)
            );
        };
        check(mtime, true);
        check(now, true);
        check(mtime - std::time::Duration::from_secs(1), false);
        check(now + std::time::Duration::from_secs(1), false);
        check(now + std::time::Duration::from_secs(365 * 86_400), false);
        // The real clock: a date a day ahead is ignored.
        let mut h = HeaderMap::new();
        let tomorrow = SystemTime::now() + std::time::Duration::from_secs(86_400);
        h.insert(
            header::IF_MODIFIED_SINCE,
            httpdate::fmt_http_date(tomorrow).parse().unwrap(),
        );
        assert!(!not_modified(&h, "\"x\"", mtime));
    }
}
