//! ops-updater as a library: the host daemon that keeps each agent at its desired version.
//! The binary (`main.rs`) only parses flags and calls into these modules.

pub mod artifact;
pub mod cgroup;
pub mod control;
pub mod fsx;
pub mod process;
pub mod reaper;
pub mod workdir;

// The daemon: config, main loop, per-agent workers, heartbeat client, local endpoint.
pub mod config;
pub mod daemon;
pub mod engine;
pub mod events;
pub mod heartbeat;
pub mod http;
pub mod logcap;
pub mod metrics;
pub mod state;
pub mod tls;

// BootAgent mode (register, status reports, jobs) and the protocol choice.
pub mod boot;

// ops-updater upgrading itself: the supervisor process and the worker's part.
pub mod selfup;

/// `text` with the credentials of every URL in it replaced by `***`
/// (`http://user:pass@host/x` → `http://***@host/x`): for every URL or error message that
/// goes to a log, `/status` or a job result. A tarball URL may carry a password; the
/// download itself still uses the URL as given.
pub fn redact(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.contains('@') {
        return text.into();
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        // The authority ends at the path, query, fragment, or anything a URL cannot hold.
        let end = tail
            .find(|c: char| {
                matches!(c, '/' | '?' | '#')
                    || c.is_whitespace()
                    || c == '"'
                    || c == ')'
                    || c == '>'
            })
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        match authority.rfind('@') {
            Some(at) => {
                out.push_str("***");
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out.into()
}

/// An error with its causes, `a: b: c`, each cause once: reqwest's own Display stops at
/// "error sending request", which hides a refused connection or certificate. URL
/// credentials are redacted ([`redact`]).
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
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
    redact(&s).into_owned()
}

#[cfg(test)]
mod tests {
    #[test]
    fn url_credentials_are_redacted_wherever_they_are() {
        let check = |input: &str, want: &str| assert_eq!(super::redact(input), want, "{input}");
        check(
            "http://user:pass@10.0.0.1:2000/falcon/a-1.tar.gz",
            "http://***@10.0.0.1:2000/falcon/a-1.tar.gz",
        );
        check("https://tok@h", "https://***@h");
        check(
            "fetch http://u:p@h/x: error (http://u:p@h/x)",
            "fetch http://***@h/x: error (http://***@h/x)",
        );
        check("http://h/a@b", "http://h/a@b");
        check("mail a@b, no url", "mail a@b, no url");
        check("http://u:p@h?x=1", "http://***@h?x=1");
    }
}
