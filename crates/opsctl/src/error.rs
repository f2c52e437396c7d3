//! What can go wrong, and the exit code a script sees for it.

use std::fmt;

/// The exit codes of `opsctl`, as `opsctl --help` and docs/opsctl.md list them.
pub mod exit {
    /// Done.
    pub const OK: u8 = 0;
    /// Anything not listed below.
    pub const ERROR: u8 = 1;
    /// Bad flags or arguments, or the server refused the request as invalid (400).
    pub const USAGE: u8 = 2;
    /// The server knows no such thing (404): host, batch, rollout, or no host matched.
    pub const NOT_FOUND: u8 = 3;
    /// No token, or one that may not do this (401, 403).
    pub const NOT_ALLOWED: u8 = 4;
    /// The thing is in the wrong state for it (409), or `publish` would replace a
    /// different release.
    pub const CONFLICT: u8 = 5;
    /// The server cannot be reached, timed out, or answered 5xx.
    pub const UNAVAILABLE: u8 = 6;
    /// `rollout watch --until-paused`, `rollout status --exit-status`: paused.
    pub const PAUSED: u8 = 10;
    /// `rollout watch`, `rollout status --exit-status`: aborted, rolled back or
    /// superseded: it ended without completing.
    pub const ENDED: u8 = 11;
    /// `rollout status --exit-status`: planned or running.
    pub const RUNNING: u8 = 12;
}

/// An error with the exit code it ends `opsctl` with.
#[derive(Debug)]
pub enum Error {
    /// The user asked for something that cannot be (checked before any request).
    Usage(String),
    /// The server answered an error status; `text` is its plain-text body.
    Api {
        what: String,
        status: u16,
        text: String,
    },
    /// No answer: connection refused, timeout, TLS.
    Unreachable {
        url: String,
        cause: String,
    },
    /// `publish` would replace a different release.
    Conflict(String),
    Other(String),
}

impl Error {
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Usage(_) => exit::USAGE,
            Error::Api { status, .. } => match status {
                400 => exit::USAGE,
                401 | 403 => exit::NOT_ALLOWED,
                404 => exit::NOT_FOUND,
                409 => exit::CONFLICT,
                500..=599 => exit::UNAVAILABLE,
                _ => exit::ERROR,
            },
            Error::Unreachable { .. } => exit::UNAVAILABLE,
            Error::Conflict(_) => exit::CONFLICT,
            Error::Other(_) => exit::ERROR,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Usage(m) | Error::Conflict(m) | Error::Other(m) => f.write_str(m),
            Error::Api { what, status, text } => {
                let text = proto::clean_text(text.trim(), 4096);
                let hint = match status {
                    401 => " (give a token: --token, OPSCTL_TOKEN or the config file)",
                    _ => "",
                };
                if text.is_empty() {
                    write!(f, "{what}: {status}{hint}")
                } else {
                    write!(f, "{what}: {status}: {text}{hint}")
                }
            }
            Error::Unreachable { url, cause } => write!(f, "cannot reach {url}: {cause}"),
        }
    }
}

impl std::error::Error for Error {}

/// `e` and every cause under it, `: `-joined, so a message says "connection refused" and
/// not just "error sending request".
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_exit_codes() {
        let api = |status| Error::Api {
            what: "GET /api/x".into(),
            status,
            text: String::new(),
        };
        for (status, code) in [
            (400, 2),
            (401, 4),
            (403, 4),
            (404, 3),
            (409, 5),
            (415, 1),
            (500, 6),
            (503, 6),
        ] {
            assert_eq!(api(status).exit_code(), code, "status {status}");
        }
    }

    #[test]
    fn server_text_is_cleaned_of_control_characters() {
        let e = Error::Api {
            what: "POST /api/jobs".into(),
            status: 400,
            text: "bad\x1b[2Jthing\n".into(),
        };
        assert_eq!(e.to_string(), "POST /api/jobs: 400: bad [2Jthing");
    }
}
