//! The rules of the BootAgent wire that both sides check, written once: the `envs` and
//! `limits` maps of a job, the report step a `config` job may set, the length of a job
//! result message, and the syntax of a server list (`svrlist`, the updater's `-S`, the
//! lists of its metafile).
//!
//! ops-meta checks what it is about to send (config load, operator API), ops-updater
//! checks what it received before acting on it; both call these functions, so a job one
//! side sends is a job the other side takes.

use std::collections::BTreeMap;

use crate::validate::{clean_text, validate_hostname};

/// Most entries in one `envs` or `limits` object.
pub const MAX_MAP_ENTRIES: usize = 64;
/// Longest `envs`/`limits` key, in bytes.
pub const MAX_MAP_KEY_LEN: usize = 128;
/// Longest `envs`/`limits` value, in bytes.
pub const MAX_MAP_VALUE_LEN: usize = 1024;

/// Shortest report step a `config` job may set, in seconds. ops-meta has always refused
/// shorter ones, so no host was ever sent one.
pub const MIN_STEP_SECS: u64 = 10;
/// Longest report step a `config` job may set, in seconds (a day).
pub const MAX_STEP_SECS: u64 = 86_400;

/// Longest job result message kept, sent or shown, in bytes (cut at a character boundary
/// by [`clean_message`]).
pub const MAX_MESSAGE_LEN: usize = 1024;

/// Most servers in one server list.
pub const MAX_SERVERS: usize = 16;
/// Longest entry of a server list, in bytes.
pub const MAX_SERVER_LEN: usize = 256;

/// How much of a refused value an error message echoes, in characters.
const SHOWN: usize = 64;

fn shown(s: &str) -> String {
    s.chars().take(SHOWN).collect()
}

fn check_entry_count(m: &BTreeMap<String, String>) -> Result<(), String> {
    if m.len() > MAX_MAP_ENTRIES {
        return Err(format!(
            "{} entries, the limit is {MAX_MAP_ENTRIES}",
            m.len()
        ));
    }
    Ok(())
}

fn check_value(key: &str, value: &str) -> Result<(), String> {
    if value.len() > MAX_MAP_VALUE_LEN {
        return Err(format!(
            "value of {} is longer than {MAX_MAP_VALUE_LEN} bytes",
            shown(key)
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(format!("value of {} holds a control character", shown(key)));
    }
    Ok(())
}

/// True when `key` is an environment variable name: ASCII letters, digits and `_`, not
/// starting with a digit (so never `=` nor NUL), 1–[`MAX_MAP_KEY_LEN`] bytes.
pub fn is_env_name(key: &str) -> bool {
    key.len() <= MAX_MAP_KEY_LEN
        && key
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Checks one `envs` entry: an environment variable name ([`is_env_name`]) and a value of
/// at most [`MAX_MAP_VALUE_LEN`] bytes without control characters (NUL included).
pub fn check_env_entry(key: &str, value: &str) -> Result<(), String> {
    if !is_env_name(key) {
        return Err(format!(
            "key {:?} is not a name of letters, digits and '_' not starting with a digit (at most {MAX_MAP_KEY_LEN} bytes)",
            shown(key)
        ));
    }
    check_value(key, value)
}

/// Checks one `limits` entry, its shape only: a key of 1–[`MAX_MAP_KEY_LEN`] bytes and a
/// value of at most [`MAX_MAP_VALUE_LEN`] bytes, neither holding a control character.
/// What a limit's value means (`CPU`, `memory`) is not checked here.
pub fn check_limit_entry(key: &str, value: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > MAX_MAP_KEY_LEN || key.chars().any(char::is_control) {
        return Err(format!(
            "key {:?} is empty, longer than {MAX_MAP_KEY_LEN} bytes or holds a control character",
            shown(key)
        ));
    }
    check_value(key, value)
}

/// Checks a job's `envs`: at most [`MAX_MAP_ENTRIES`] entries, each by
/// [`check_env_entry`]. The first problem is returned.
pub fn check_envs(m: &BTreeMap<String, String>) -> Result<(), String> {
    check_entry_count(m)?;
    m.iter().try_for_each(|(k, v)| check_env_entry(k, v))
}

/// Checks a job's `limits`, their shape only: at most [`MAX_MAP_ENTRIES`] entries, each by
/// [`check_limit_entry`]. The first problem is returned.
pub fn check_limits_map(m: &BTreeMap<String, String>) -> Result<(), String> {
    check_entry_count(m)?;
    m.iter().try_for_each(|(k, v)| check_limit_entry(k, v))
}

/// Checks a report step a `config` job sets: from [`MIN_STEP_SECS`] to
/// [`MAX_STEP_SECS`] seconds.
pub fn check_step(secs: u64) -> Result<(), String> {
    if (MIN_STEP_SECS..=MAX_STEP_SECS).contains(&secs) {
        Ok(())
    } else {
        Err(format!(
            "{secs} is not from {MIN_STEP_SECS} to {MAX_STEP_SECS} seconds"
        ))
    }
}

/// A job result message as it is kept, sent and shown: cut to [`MAX_MESSAGE_LEN`] bytes,
/// control characters replaced by spaces ([`clean_text`]).
pub fn clean_message(s: &str) -> String {
    clean_text(s, MAX_MESSAGE_LEN)
}

/// True when `host` is a hostname ([`validate_hostname`]; an IPv4 address is one) or an
/// IPv6 address in brackets.
fn is_server_host(host: &str) -> bool {
    match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
        None => validate_hostname(host).is_ok(),
    }
}

/// True when `port` is a decimal port from 1 to 65535 (digits only: no sign, no blank).
fn is_port(port: &str) -> bool {
    !port.is_empty()
        && port.bytes().all(|b| b.is_ascii_digit())
        && port.parse::<u16>().is_ok_and(|p| p > 0)
}

/// Checks one server entry (already trimmed): `HOST:PORT`, where `HOST` is a hostname, an
/// IPv4 address or `[IPv6]` and `PORT` is from 1 to 65535, at most [`MAX_SERVER_LEN`]
/// bytes. Extension: the entry may start with `http://` or `https://` (what ops-updater
/// took before this rule was shared: a server behind TLS); without one, plain HTTP is
/// meant. Nothing may follow the port.
pub fn check_server(entry: &str) -> Result<(), String> {
    let bad = || {
        Err(format!(
            "{:?} is not HOST:PORT (a hostname, an IPv4 address or [IPv6], and a port from 1 to 65535, optionally after http:// or https://)",
            shown(entry)
        ))
    };
    if entry.len() > MAX_SERVER_LEN {
        return Err(format!(
            "{:?} is longer than {MAX_SERVER_LEN} bytes",
            shown(entry)
        ));
    }
    let authority = entry
        .strip_prefix("http://")
        .or_else(|| entry.strip_prefix("https://"))
        .unwrap_or(entry);
    match authority.rsplit_once(':') {
        Some((host, port)) if is_server_host(host) && is_port(port) => Ok(()),
        _ => bad(),
    }
}

/// Parses a server list: comma-separated entries, each trimmed, blank ones skipped, each
/// checked by [`check_server`]; duplicates are dropped (the first kept, in order). Refused
/// when no server is left or more than [`MAX_SERVERS`] distinct ones are given.
pub fn parse_svrlist(s: &str) -> Result<Vec<String>, String> {
    let mut out: Vec<String> = Vec::new();
    for entry in s.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        check_server(entry)?;
        if out.iter().any(|o| o == entry) {
            continue;
        }
        if out.len() == MAX_SERVERS {
            // Counted as distinct entries arrive, so a huge list costs no more than
            // MAX_SERVERS comparisons per entry before it is refused.
            return Err(format!(
                "holds {} distinct servers or more, the limit is {MAX_SERVERS}",
                MAX_SERVERS + 1
            ));
        }
        out.push(entry.to_string());
    }
    if out.is_empty() {
        return Err("holds no server".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(entries: &[(&str, &str)]) -> BTreeMap<String, String> {
        entries
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn envs() {
        let long_key = "K".repeat(MAX_MAP_KEY_LEN + 1);
        let long_value = "v".repeat(MAX_MAP_VALUE_LEN + 1);
        let max_key = "K".repeat(MAX_MAP_KEY_LEN);
        let max_value = "v".repeat(MAX_MAP_VALUE_LEN);
        // (key, value, accepted, part of the message)
        let cases: &[(&str, &str, bool, &str)] = &[
            ("PATH", "/usr/bin:/usr/local/bin", true, ""),
            ("_X1", "", true, ""),
            ("CPU", "10%", true, ""),
            ("A", "x=y", true, ""),
            (&max_key, &max_value, true, ""),
            ("1X", "a", false, "key \"1X\" is not a name"),
            ("A-B", "a", false, "is not a name"),
            ("A=B", "a", false, "is not a name"),
            ("A\0", "a", false, "is not a name"),
            ("", "a", false, "is not a name"),
            ("Ä", "a", false, "is not a name"),
            (&long_key, "a", false, "at most 128 bytes"),
            ("A", "a\nb", false, "value of A holds a control character"),
            ("A", "a\0b", false, "control character"),
            (
                "A",
                &long_value,
                false,
                "value of A is longer than 1024 bytes",
            ),
        ];
        for &(k, v, ok, msg) in cases {
            let got = check_envs(&map(&[(k, v)]));
            assert_eq!(got.is_ok(), ok, "{k:?}={v:?}: {got:?}");
            if let Err(e) = got {
                assert!(e.contains(msg), "{k:?}={v:?}: want {msg:?} in {e:?}");
            }
        }
    }

    #[test]
    fn limits_maps_are_checked_for_shape_only() {
        let long_key = "k".repeat(MAX_MAP_KEY_LEN + 1);
        let long_value = "v".repeat(MAX_MAP_VALUE_LEN + 1);
        let cases: &[(&str, &str, bool)] = &[
            ("CPU", "10%", true),
            ("memory", "512m", true),
            ("anything-goes.here", "even nonsense", true),
            ("", "1", false),
            ("a\nb", "1", false),
            (&long_key, "1", false),
            ("CPU", "1\0", false),
            ("CPU", &long_value, false),
        ];
        for &(k, v, ok) in cases {
            let got = check_limits_map(&map(&[(k, v)]));
            assert_eq!(got.is_ok(), ok, "{k:?}={v:?}: {got:?}");
        }
    }

    #[test]
    fn maps_are_capped_in_entries() {
        for (check, name) in [
            (
                check_envs as fn(&BTreeMap<String, String>) -> Result<(), String>,
                "envs",
            ),
            (check_limits_map, "limits"),
        ] {
            let full: BTreeMap<String, String> = (0..MAX_MAP_ENTRIES)
                .map(|i| (format!("K{i}"), "v".to_string()))
                .collect();
            assert_eq!(check(&full), Ok(()), "{name}");
            let mut over = full.clone();
            over.insert("ONE_MORE".into(), "v".into());
            assert_eq!(
                check(&over).unwrap_err(),
                "65 entries, the limit is 64",
                "{name}"
            );
            assert_eq!(check(&BTreeMap::new()), Ok(()), "{name}");
        }
    }

    #[test]
    fn steps() {
        for (secs, ok) in [
            (0, false),
            (1, false),
            (MIN_STEP_SECS - 1, false),
            (MIN_STEP_SECS, true),
            (600, true),
            (MAX_STEP_SECS, true),
            (MAX_STEP_SECS + 1, false),
            (7 * 86_400, false),
            (u64::MAX, false),
        ] {
            assert_eq!(check_step(secs).is_ok(), ok, "{secs}");
        }
        assert_eq!(
            check_step(0).unwrap_err(),
            "0 is not from 10 to 86400 seconds"
        );
    }

    #[test]
    fn messages_are_cut_and_cleaned() {
        for (input, want) in [
            ("success", "success".to_string()),
            ("a\nb\tc", "a b c".to_string()),
            ("", String::new()),
        ] {
            assert_eq!(clean_message(input), want, "{input:?}");
        }
        assert_eq!(clean_message(&"x".repeat(5000)).len(), MAX_MESSAGE_LEN);
        // A multi-byte character across the limit is dropped whole.
        let s = format!("{}é", "x".repeat(MAX_MESSAGE_LEN - 1));
        assert_eq!(clean_message(&s), "x".repeat(MAX_MESSAGE_LEN - 1));
    }

    #[test]
    fn server_lists() {
        // (input, Ok(entries) or part of the error)
        let cases: &[(&str, Result<&[&str], &str>)] = &[
            ("192.168.9.1:1234", Ok(&["192.168.9.1:1234"])),
            ("192.168.9.1:1234,", Ok(&["192.168.9.1:1234"])),
            (" a:1, ,b:2,a:1,", Ok(&["a:1", "b:2"])),
            (
                "a.example:80,[::1]:9,b:1",
                Ok(&["a.example:80", "[::1]:9", "b:1"]),
            ),
            ("m:65535", Ok(&["m:65535"])),
            ("https://m.example:443", Ok(&["https://m.example:443"])),
            ("http://[2001:db8::1]:80", Ok(&["http://[2001:db8::1]:80"])),
            ("", Err("holds no server")),
            (",", Err("holds no server")),
            (" , ,", Err("holds no server")),
            ("host", Err("\"host\" is not HOST:PORT")),
            ("host:", Err("is not HOST:PORT")),
            (":80", Err("is not HOST:PORT")),
            ("host:0", Err("is not HOST:PORT")),
            ("host:65536", Err("is not HOST:PORT")),
            ("host:99999", Err("is not HOST:PORT")),
            ("host:+80", Err("is not HOST:PORT")),
            ("ho st:1", Err("is not HOST:PORT")),
            ("a:1,bad", Err("\"bad\" is not HOST:PORT")),
            ("::1:9", Err("is not HOST:PORT")),
            ("[::1:9", Err("is not HOST:PORT")),
            ("[nope]:9", Err("is not HOST:PORT")),
            ("../x:1", Err("is not HOST:PORT")),
            ("a\n:1", Err("is not HOST:PORT")),
            ("user@h:1", Err("is not HOST:PORT")),
            ("http://m:1/heartbeat", Err("is not HOST:PORT")),
            ("http://m", Err("is not HOST:PORT")),
            ("ftp://m:1", Err("is not HOST:PORT")),
        ];
        for (input, want) in cases {
            let got = parse_svrlist(input);
            match (want, &got) {
                (Ok(w), Ok(g)) => assert_eq!(g, w, "{input:?}"),
                (Err(w), Err(g)) => assert!(g.contains(w), "{input:?}: want {w:?} in {g:?}"),
                _ => panic!("{input:?}: want {want:?}, got {got:?}"),
            }
        }
    }

    #[test]
    fn server_lists_are_bounded() {
        let list = |n: usize| {
            (1..=n)
                .map(|i| format!("10.0.0.{i}:2000"))
                .collect::<Vec<_>>()
                .join(",")
        };
        assert_eq!(
            parse_svrlist(&list(MAX_SERVERS)).unwrap().len(),
            MAX_SERVERS
        );
        assert!(parse_svrlist(&list(MAX_SERVERS + 1))
            .unwrap_err()
            .contains("the limit is 16"));
        // Duplicates do not count against the limit.
        assert_eq!(parse_svrlist(&vec!["a:1"; 100].join(",")).unwrap(), ["a:1"]);
        let long = format!("{}:1", "h".repeat(MAX_SERVER_LEN));
        assert!(parse_svrlist(&long)
            .unwrap_err()
            .contains("is longer than 256 bytes"));
        // The longest entry that fits.
        let host = "h".repeat(MAX_SERVER_LEN - 6);
        assert!(check_server(&format!("{host}:65535")).is_ok());
    }
}
