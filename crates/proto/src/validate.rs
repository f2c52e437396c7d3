//! Validation of the names that travel on the wire.
//!
//! Agent names and versions become path parts on every host (`<workdir>/<agent>/<version>`),
//! and hostnames become keys and lines of output on the server. This is a security
//! boundary: both sides check every name with these functions before using it.
//!
//! These functions are the one definition of each rule; the types of [`crate::names`]
//! (`AgentName`, `Version`, `Hostname`, `Serial`) are made only through them.

use std::fmt;

/// Longest hostname accepted, in bytes.
pub const MAX_HOSTNAME_LEN: usize = 255;
/// Longest agent name or version accepted, in bytes.
pub const MAX_NAME_LEN: usize = 128;

/// Why a name was refused. The `Display` text names the field and quotes the value
/// (escaped, so hostile bytes cannot forge log lines).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameError {
    pub field: &'static str,
    pub value: String,
    pub reason: &'static str,
}

impl fmt::Display for NameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Cap what is echoed so a megabyte of junk does not become a megabyte of log.
        let shown: String = self.value.chars().take(64).collect();
        write!(f, "invalid {} {:?}: {}", self.field, shown, self.reason)
    }
}

impl std::error::Error for NameError {}

fn check(field: &'static str, value: &str, max: usize, extra: &[u8]) -> Result<(), NameError> {
    let err = |reason| {
        Err(NameError {
            field,
            value: value.to_string(),
            reason,
        })
    };
    if value.is_empty() {
        return err("is empty");
    }
    if value.len() > max {
        return err(if max == MAX_HOSTNAME_LEN {
            "is longer than 255 bytes"
        } else {
            "is longer than 128 bytes"
        });
    }
    if value.starts_with('.') {
        return err("starts with '.'");
    }
    let ok = value.bytes().all(|b| {
        b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-' || extra.contains(&b)
    });
    if !ok {
        return err(if extra.is_empty() {
            "may only hold ASCII letters, digits, '.', '_' and '-'"
        } else {
            "may only hold ASCII letters, digits, '.', '_', '-' and '+'"
        });
    }
    Ok(())
}

/// A hostname: 1–255 bytes of `[A-Za-z0-9._-]`, not starting with `.`.
pub fn validate_hostname(s: &str) -> Result<(), NameError> {
    check("hostname", s, MAX_HOSTNAME_LEN, &[])
}

/// An agent name: 1–128 bytes of `[A-Za-z0-9._-]`, not starting with `.`.
pub fn validate_agent_name(s: &str) -> Result<(), NameError> {
    check("agent name", s, MAX_NAME_LEN, &[])
}

/// A version: 1–128 bytes of `[A-Za-z0-9._+-]`, not starting with `.`.
pub fn validate_version(s: &str) -> Result<(), NameError> {
    check("version", s, MAX_NAME_LEN, b"+")
}

/// `s` cut to at most `max` bytes (at a character boundary), control characters replaced
/// by spaces: how a text that came from the other side (a job message, a status, a reason)
/// is kept, shown or logged, so it can neither grow without bound nor forge log lines.
pub fn clean_text(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end]
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_all(f: fn(&str) -> Result<(), NameError>, cases: &[(&str, bool)]) {
        for (input, want_ok) in cases {
            let got = f(input);
            assert_eq!(got.is_ok(), *want_ok, "input {input:?}: got {got:?}");
        }
    }

    #[test]
    fn agent_names() {
        check_all(
            validate_agent_name,
            &[
                ("falcon-agent", true),
                ("a", true),
                ("A_b.c-9", true),
                ("x..y", true),
                ("", false),
                (".", false),
                ("..", false),
                ("../etc", false),
                (".hidden", false),
                ("a/b", false),
                ("/abs", false),
                ("a\\b", false),
                ("a b", false),
                ("a\0b", false),
                ("a\nb", false),
                ("a+b", false),
                ("ägent", false),
                ("%2e%2e", false),
                (&"a".repeat(128), true),
                (&"a".repeat(129), false),
            ],
        );
    }

    #[test]
    fn versions() {
        check_all(
            validate_version,
            &[
                ("1.0.0", true),
                ("1.0.0+build.5", true),
                ("2.0-rc_1", true),
                ("", false),
                ("..", false),
                (".1", false),
                ("1/../../x", false),
                ("1.0 ", false),
                (&"1".repeat(128), true),
                (&"1".repeat(129), false),
            ],
        );
    }

    #[test]
    fn hostnames() {
        check_all(
            validate_hostname,
            &[
                ("host-01", true),
                ("web01.dc1.example", true),
                ("", false),
                ("..", false),
                ("h/1", false),
                ("h 1", false),
                ("h+1", false),
                ("h\r\nforged 1.0 started", false),
                (&"h".repeat(255), true),
                (&"h".repeat(256), false),
            ],
        );
    }

    #[test]
    fn error_names_the_field_and_caps_the_value() {
        let e = validate_agent_name(&"/".repeat(1000)).unwrap_err();
        let s = e.to_string();
        assert!(s.starts_with("invalid agent name"), "{s}");
        assert!(s.len() < 200, "{s}");
        let e = validate_hostname("").unwrap_err();
        assert_eq!(e.to_string(), "invalid hostname \"\": is empty");
    }
}
