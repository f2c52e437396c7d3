//! Host credentials and enrollment secrets with the real binaries: `ops-updater` in
//! `bootagent` and `auto` modes against `ops-meta` with `enrollmentSecrets` and its SQLite
//! store, across restarts of either, and a host that tries to take another's hostname.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use common::{get_json, http_post, Meta, Updater, CONVERGE};
use serde_json::{json, Value};
use test_support::{free_port, wait_for};

const SECRET_OLD: &str = "rotating-out-0123456789abcdef";
const SECRET_NEW: &str = "rotating-in-fedcba9876543210";

/// ops-meta with both secrets of a rotation configured.
fn start_meta() -> Meta {
    let mut m = Meta::prepare(free_port(), json!([]));
    let cfg = json!({
        "tarballDir": m.tarball_dir(),
        "http": {"enabled": true, "listen": m.addr.to_string()},
        "agents": [],
        "enrollmentSecrets": [SECRET_OLD, SECRET_NEW],
    });
    test_support::write_file(m.dir.path(), "cfg.json", serde_json::to_vec(&cfg).unwrap());
    m.spawn();
    m
}

fn updater(meta: &Meta, host: &str, protocol: Option<&str>, secret: &str) -> Updater {
    let (protocol, secret) = (protocol.map(str::to_string), secret.to_string());
    Updater::start(&meta.addr.to_string(), host, move |c| {
        match protocol {
            Some(p) => c["protocol"] = json!(p),
            None => {
                c.as_object_mut().unwrap().remove("protocol");
            }
        }
        if !secret.is_empty() {
            c["enrollmentSecret"] = json!(secret);
        }
    })
}

fn metafile(u: &Updater) -> PathBuf {
    u.work().join(".ops-updater/meta.json")
}

fn read_meta(u: &Updater) -> Option<Value> {
    serde_json::from_str(&std::fs::read_to_string(metafile(u)).ok()?).ok()
}

fn wait_confirmed(u: &Updater) -> Value {
    wait_for("a confirmed serial in the metafile", CONVERGE, || {
        read_meta(u).is_some_and(|m| m["confirmed"] == true)
    });
    read_meta(u).unwrap()
}

fn host_view(meta: &Meta, host: &str) -> Option<Value> {
    get_json(meta.addr, &format!("/api/hosts/{host}"))
}

fn last_seen(meta: &Meta, host: &str) -> i64 {
    host_view(meta, host).map_or(0, |v| v["last_seen"].as_i64().unwrap_or(0))
}

/// Registers with the new secret of a rotation, then keeps its credential (mode 0600 in
/// its metafile) across a restart of ops-updater and one of ops-meta.
fn keeps_its_credential_across_restarts(protocol: Option<&str>) {
    let mut meta = start_meta();
    let mut u = updater(&meta, "web-01", protocol, SECRET_NEW);
    let m = wait_confirmed(&u);
    let credential = m["credential"].as_str().unwrap_or_default().to_string();
    assert!(
        proto::bootagent::check_credential(&credential).is_ok(),
        "no credential in the metafile: {m}"
    );
    let mode = std::fs::metadata(metafile(&u))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "metafile mode {mode:o}");
    u.wait_heartbeats(2);
    assert_eq!(u.daemon_status()["protocol"], "bootagent");

    // ops-updater restarts: the same credential, reports taken.
    u.kill9();
    u.spawn();
    u.wait_heartbeats(2);
    // ops-meta restarts on its SQLite store: it knows the credential's hash.
    meta.child = None;
    meta.spawn();
    let seen = last_seen(&meta, "web-01");
    wait_for("a report taken by the restarted ops-meta", CONVERGE, || {
        last_seen(&meta, "web-01") > seen
    });
    let after = read_meta(&u).unwrap();
    assert_eq!(after["credential"], credential.as_str());
    assert_eq!(after["agentsn"], m["agentsn"]);
    let log = u.log_text();
    assert!(!log.contains("refuses this host"), "{log}");
    assert!(!log.contains("using the legacy heartbeat"), "{log}");
    assert!(!log.contains(&credential), "the credential was logged");
    assert!(
        !log.contains(SECRET_NEW),
        "the enrollment secret was logged"
    );
}

#[test]
fn bootagent_mode_registers_with_the_enrollment_secret_and_keeps_its_credential() {
    keeps_its_credential_across_restarts(Some("bootagent"));
}

#[test]
fn auto_mode_registers_with_the_enrollment_secret_and_keeps_its_credential() {
    keeps_its_credential_across_restarts(None);
}

#[test]
fn a_host_without_an_accepted_enrollment_secret_is_refused_and_says_why() {
    let meta = start_meta();
    let wrong = updater(
        &meta,
        "web-01",
        Some("bootagent"),
        "not-a-secret-of-this-server",
    );
    let none = updater(&meta, "web-02", None, "");
    for (u, why) in [
        (&wrong, "not one this server accepts"),
        (&none, "requires an enrollment secret"),
    ] {
        wait_for("the refusal in the log", CONVERGE, || {
            u.log_text().contains(why)
        });
        let log = u.log_text();
        assert!(log.contains("the server refuses this host"), "{log}");
        assert!(!log.contains("using the legacy heartbeat"), "{log}");
        assert_ne!(read_meta(u).unwrap()["confirmed"], true);
    }
    assert!(host_view(&meta, "web-01").is_none());
    assert!(host_view(&meta, "web-02").is_none());
}

#[test]
fn a_host_cannot_register_as_an_enrolled_host_until_an_operator_readmits_it() {
    let meta = start_meta();
    let mut a = updater(&meta, "web-01", Some("bootagent"), SECRET_OLD);
    let sn_a = wait_confirmed(&a)["agentsn"].as_str().unwrap().to_string();
    a.wait_heartbeats(2);
    a.kill9();
    // Another machine (or this one without its metafile) claims the name, with the secret.
    let b = updater(&meta, "web-01", None, SECRET_NEW);
    wait_for("the refusal in the log", CONVERGE, || {
        b.log_text().contains("is enrolled")
    });
    assert!(
        b.log_text().contains("the server refuses this host"),
        "{}",
        b.log_text()
    );
    assert_eq!(
        host_view(&meta, "web-01").unwrap()["agentsn"],
        sn_a.as_str()
    );
    assert_ne!(read_meta(&b).unwrap()["confirmed"], true);
    // The operator re-admits the host: b's next registration is taken.
    let (code, text) = http_post(meta.addr, "/api/hosts/web-01/readmit", &json!({}));
    assert_eq!(code, 200, "{text}");
    let mb = wait_confirmed(&b);
    assert_ne!(mb["agentsn"], sn_a.as_str());
    assert_eq!(
        host_view(&meta, "web-01").unwrap()["agentsn"],
        mb["agentsn"]
    );
    // The old holder of the name is the outsider now.
    a.spawn();
    wait_for("the old host refused", CONVERGE, || {
        a.log_text().contains("is enrolled")
    });
    assert_eq!(
        host_view(&meta, "web-01").unwrap()["agentsn"],
        mb["agentsn"]
    );
}
