//! The local endpoint of the real `ops-updater` under hostile clients: idle sockets that
//! used to make it unreachable, and `Host` names of a DNS-rebinding page.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;

/// An updater against a server that wants nothing.
fn quiet_updater() -> (Scripted, Updater) {
    let server = Scripted::start(|_| {
        Reply::Full(
            200,
            "application/json",
            br#"{"errorMessage":"","desiredAgents":[]}"#.to_vec(),
        )
    });
    let u = Updater::start(&server.addr.to_string(), "host-01", |_| {});
    (server, u)
}

/// About 160 idle sockets made the endpoint unreachable for about 50 s: sockets queued
/// behind the 32 served ones were under no timeout and were served (and timed out) in turn.
#[test]
fn idle_sockets_no_longer_make_the_local_endpoint_unreachable() {
    let (_server, u) = quiet_updater();
    let idle: Vec<TcpStream> = (0..200)
        .map(|_| TcpStream::connect(u.http).unwrap())
        .collect();
    let t = Instant::now();
    let got = http_get(u.http, "/health");
    assert_eq!(got, Some((200, "ok".to_string())));
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "answered after {:?}",
        t.elapsed()
    );
    drop(idle);
}

fn raw_get(u: &Updater, host: &str) -> (u16, String) {
    let mut s = TcpStream::connect(u.http).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET /status HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let code = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, body.to_string())
}

/// The endpoint answered any `Host`, so a web page that rebinds its own name to
/// 127.0.0.1 could read `/status` from the operator's browser.
#[test]
fn a_request_for_another_host_name_is_refused_with_421() {
    let (_server, u) = quiet_updater();
    let port = u.http.port();
    let (code, body) = raw_get(&u, &format!("rebind.evil.example:{port}"));
    assert_eq!(code, 421, "{body}");
    assert!(body.contains("misdirected request"), "{body}");
    assert!(!body.contains("host-01"), "{body}");
    for ok in [
        format!("localhost:{port}"),
        u.http.to_string(),
        "host-01".into(),
    ] {
        let (code, body) = raw_get(&u, &ok);
        assert_eq!(code, 200, "{ok}: {body}");
    }
}
