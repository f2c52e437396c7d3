//! `opsctl` end to end: the real binary against the real `ops-meta` on 127.0.0.1, with
//! BootAgent hosts registered and reporting over HTTP: hosts, host, jobs, retry, audit,
//! tokens from the environment and the config file, exit codes, completions.

mod support;

use std::os::unix::fs::PermissionsExt;

use proto::bootagent::JobResult;
use proto::ops::{BatchStatus, HostsResponse, JobsResponse};
use serde_json::{json, Value};
use support::{expect, opsctl, token, Meta};

#[test]
fn hosts_host_and_jobs_show_what_registered_hosts_report() {
    // basic 1.0 is desired everywhere; its tarball is not in tarballDir, so a host that
    // runs another version waits for a checksum.
    let m = Meta::start_with(
        Value::Null,
        |url| json!([{"default": {"name": "basic", "version": "1.0", "tarball": url, "cmd": "start"}}]),
    );
    let home = test_support::tempdir().unwrap();
    let h = home.path();
    let web1 = m.host("web-01", &[("basic", "1.0", "running")]);
    let web2 = m.host(
        "web-02",
        &[("basic", "1.1", "running"), ("falcon", "2.0", "fatal")],
    );
    let _db = m.host("db-01", &[]);

    let all = expect(&m, h, &["hosts"], &[], 0).stdout;
    let lines: Vec<&str> = all.lines().collect();
    assert_eq!(lines.len(), 5, "{all}");
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        ["HOST", "PROTOCOL", "AGENT", "VERSION", "STATE", "LAST", "SEEN"]
    );
    assert!(lines[1].starts_with("db-01   bootagent  -"), "{all}");
    assert!(
        all.contains("web-02  bootagent  falcon  2.0      fatal"),
        "{all}"
    );

    let falcon = expect(&m, h, &["hosts", "--agent", "falcon"], &[], 0).stdout;
    assert_eq!(falcon.lines().count(), 2, "{falcon}");
    assert!(falcon.contains("web-02"), "{falcon}");
    let v11 = expect(
        &m,
        h,
        &["hosts", "--agent", "basic", "--version", "1.1"],
        &[],
        0,
    )
    .stdout;
    assert!(v11.contains("web-02") && !v11.contains("web-01"), "{v11}");
    let web = expect(&m, h, &["hosts", "--prefix", "web"], &[], 0).stdout;
    assert!(!web.contains("db-01") && web.contains("web-01"), "{web}");
    let fatal = expect(&m, h, &["hosts", "--state", "fatal"], &[], 0).stdout;
    assert_eq!(fatal.lines().count(), 2, "{fatal}");
    // --json: the server's answer, filtered here when a filter is ours.
    let j: HostsResponse =
        serde_json::from_str(&expect(&m, h, &["--json", "hosts"], &[], 0).stdout).unwrap();
    assert_eq!(j.hosts.len(), 3);
    let j: HostsResponse = serde_json::from_str(
        &expect(&m, h, &["--json", "hosts", "--state", "fatal"], &[], 0).stdout,
    )
    .unwrap();
    let names: Vec<_> = j.hosts.iter().map(|h| h.hostname.as_str()).collect();
    assert_eq!(names, ["web-02"]);

    // A batch: queued, shown pending on the host, then done once the host answers.
    let queued = expect(
        &m,
        h,
        &[
            "--json",
            "jobs",
            "restart",
            "basic",
            "--hosts",
            "web-01,web-02,web-99",
        ],
        &[],
        0,
    );
    let batch: JobsResponse = serde_json::from_str(&queued.stdout).unwrap();
    assert_eq!(batch.jobs.len(), 2);
    assert_eq!(batch.skipped[0].host, "web-99");
    let status = expect(&m, h, &["jobs", "status", &batch.id], &[], 0).stdout;
    assert!(status.contains("2 pending"), "{status}");
    let host = expect(&m, h, &["host", "web-01"], &[], 0).stdout;
    assert!(host.contains("pending jobs:"), "{host}");
    assert!(host.contains("restart  basic"), "{host}");
    assert!(host.contains("basic  1.0      running  30s"), "{host}");

    for (host, errcode, message) in [
        (&web1, 0, "success"),
        (&web2, 3, "control restart exited 3"),
    ] {
        let jobs = host.report(vec![]).jobs;
        let job = jobs
            .iter()
            .find(|j| j.name == "basic")
            .expect("the restart job");
        host.report(vec![JobResult {
            id: job.id.clone(),
            errcode,
            message: message.into(),
        }]);
    }
    // --wait returns at once now that none is pending, and fails for the failed job.
    let waited = expect(&m, h, &["jobs", "status", &batch.id, "--wait"], &[], 1);
    assert!(waited.stdout.contains("1 done, 1 failed"), "{waited:?}");
    assert!(
        waited.stdout.contains("control restart exited 3"),
        "{waited:?}"
    );
    assert!(waited.stderr.contains("1 of 2 job(s) failed"), "{waited:?}");
    let b: BatchStatus = serde_json::from_str(
        &expect(&m, h, &["--json", "jobs", "status", &batch.id], &[], 0).stdout,
    )
    .unwrap();
    assert_eq!(b.jobs.len(), 2);
    let host = expect(&m, h, &["host", "web-02"], &[], 0).stdout;
    assert!(host.contains("last job results:"), "{host}");
    assert!(host.contains("falcon  2.0      fatal"), "{host}");
    assert!(host.contains("why jobs wait:\n  basic 1.0: "), "{host}");
    assert!(host.contains("checksum"), "{host}");

    // Stop holds the agent; the host view says so, and retry releases it.
    let stop = expect(
        &m,
        h,
        &["jobs", "stop", "basic", "--prefix", "web-01"],
        &[],
        0,
    )
    .stdout;
    assert!(stop.contains("1 stop job(s) queued"), "{stop}");
    let jobs = web1.report(vec![]).jobs;
    let job = jobs.iter().find(|j| j.name == "basic").unwrap();
    web1.report(vec![JobResult {
        id: job.id.clone(),
        errcode: 0,
        message: "stopped".into(),
    }]);
    let host = expect(&m, h, &["host", "web-01"], &[], 0).stdout;
    assert!(
        host.contains("basic: blocked: held by an operator"),
        "{host}"
    );
    let retry = expect(&m, h, &["retry", "basic", "--hosts", "web-01"], &[], 0).stdout;
    assert!(
        retry.contains("1 host(s) selected, 1 failure(s) and hold(s) forgotten"),
        "{retry}"
    );

    let cfg = expect(
        &m,
        h,
        &[
            "jobs",
            "config",
            "--svrlist",
            "10.0.0.1:2000",
            "--step",
            "60",
            "--tag",
            "a=b",
        ],
        &[],
        3,
    );
    assert!(
        cfg.stderr.contains("no registered host carries tag"),
        "{cfg:?}"
    );
    let unin = expect(
        &m,
        h,
        &["jobs", "uninstall", "falcon", "--prefix", "web"],
        &[],
        0,
    )
    .stdout;
    assert!(
        unin.contains("1 uninstall job(s) queued, 1 host(s) skipped"),
        "{unin}"
    );
    assert!(
        unin.contains("web-01  the host has not reported this agent"),
        "{unin}"
    );

    let audit = expect(&m, h, &["audit", "--limit", "3"], &[], 0).stdout;
    assert_eq!(audit.lines().count(), 4, "{audit}");
    assert!(
        audit.contains("jobs.create") && audit.contains("loopback"),
        "{audit}"
    );
}

#[test]
fn exit_codes_tell_what_went_wrong() {
    let m = Meta::start(Value::Null);
    let home = test_support::tempdir().unwrap();
    let h = home.path();
    m.host("web-01", &[("basic", "1.0", "running")]);

    let r = expect(&m, h, &["host", "web-9"], &[], 3);
    assert!(
        r.stderr.contains("404") && r.stderr.contains("no host named \"web-9\""),
        "{r:?}"
    );
    expect(&m, h, &["jobs", "status", "no-such-batch"], &[], 3);
    expect(
        &m,
        h,
        &["jobs", "restart", "basic", "--prefix", "nomatch"],
        &[],
        3,
    );
    expect(&m, h, &["readmit", "web-9"], &[], 3);
    // Caught before any request: bad names, selectors, flags.
    let r = expect(&m, h, &["host", "../etc"], &[], 2);
    assert!(r.stderr.contains("host"), "{r:?}");
    expect(
        &m,
        h,
        &["jobs", "restart", "bad name", "--prefix", "web"],
        &[],
        2,
    );
    expect(&m, h, &["jobs", "restart", "basic"], &[], 2);
    expect(
        &m,
        h,
        &["jobs", "config", "--svrlist", "nope", "--prefix", "web"],
        &[],
        2,
    );
    expect(
        &m,
        h,
        &["jobs", "config", "--step", "1", "--prefix", "web"],
        &[],
        2,
    );
    expect(&m, h, &["rollout", "status", "a/b"], &[], 2);
    expect(&m, h, &["no-such-command"], &[], 2);
    // Refused by the server as invalid: 400 is a usage error too, with its text.
    let r = expect(&m, h, &["hosts", "--tag", "not-a-tag"], &[], 2);
    assert!(
        r.stderr.contains("400") && r.stderr.contains("tag"),
        "{r:?}"
    );

    // Nothing listening.
    let port = test_support::free_port();
    let r = opsctl(
        h,
        &["--server", &format!("http://127.0.0.1:{port}"), "hosts"],
        &[],
    );
    assert_eq!(r.code, 6, "{r:?}");
    assert!(
        r.stderr.contains("cannot reach") && r.stderr.to_lowercase().contains("refused"),
        "{r:?}"
    );
    // A server URL that is not http(s) is a usage error, before any request.
    let r = opsctl(h, &["--server", "ftp://127.0.0.1:1", "hosts"], &[]);
    assert_eq!(r.code, 2, "{r:?}");

    let help = opsctl(h, &["--help"], &[]);
    assert_eq!(help.code, 0);
    for line in [
        "0  ok",
        "3  not found (404)",
        "4  not allowed (401, 403)",
        "5  conflict (409)",
        "10  rollout paused",
        "12  rollout planned",
    ] {
        assert!(
            help.stdout.contains(line),
            "{line:?} not in --help:\n{}",
            help.stdout
        );
    }
}

const ADMIN: &str = "admin-token-0123456789";
const READER: &str = "read-token-0123456789";

#[test]
fn tokens_come_from_the_flag_the_environment_or_a_private_config_file() {
    let m = Meta::start(json!([
        token("ops", "admin", ADMIN),
        token("grafana", "read", READER)
    ]));
    let home = test_support::tempdir().unwrap();
    let h = home.path();
    m.host("web-01", &[("basic", "1.0", "running")]);
    let restart = ["jobs", "restart", "basic", "--hosts", "web-01"];

    // No token: 401, exit 4, and the message says where a token goes.
    let r = expect(&m, h, &["hosts"], &[], 4);
    assert!(
        r.stderr.contains("401") && r.stderr.contains("OPSCTL_TOKEN"),
        "{r:?}"
    );
    expect(&m, h, &restart, &[], 4);
    // A read token from the environment: reads, but no mutation (403).
    let env = [("OPSCTL_TOKEN", READER)];
    assert!(expect(&m, h, &["hosts"], &env, 0).stdout.contains("web-01"));
    let r = expect(&m, h, &restart, &env, 4);
    assert!(r.stderr.contains("403"), "{r:?}");
    // A wrong token on the command line wins over the environment's.
    expect(&m, h, &["--token", "wrong-token-xyz", "hosts"], &env, 4);
    // The admin token from the default config file, with the server too.
    let cfg = h.join(".config/opsctl/config.json");
    std::fs::create_dir_all(cfg.parent().unwrap()).unwrap();
    std::fs::write(&cfg, json!({"server": m.url(), "token": ADMIN}).to_string()).unwrap();
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o600)).unwrap();
    let r = opsctl(h, &restart, &[]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("1 restart job(s) queued"), "{r:?}");
    // The environment's token beats the file's.
    assert_eq!(opsctl(h, &restart, &env).code, 4);
    // A file others can read is refused, naming the fix, never the token.
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o644)).unwrap();
    let r = opsctl(h, &["hosts"], &[]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stderr.contains("chmod 600") && !r.stderr.contains(ADMIN),
        "{r:?}"
    );
    // OPSCTL_CONFIG names another file.
    let other = h.join("ops.json");
    std::fs::write(
        &other,
        json!({"server": m.url(), "token": ADMIN}).to_string(),
    )
    .unwrap();
    std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o600)).unwrap();
    let r = opsctl(h, &restart, &[("OPSCTL_CONFIG", other.to_str().unwrap())]);
    assert_eq!(r.code, 0, "{r:?}");
    let r = opsctl(
        h,
        &["hosts"],
        &[("OPSCTL_CONFIG", "/nonexistent/opsctl.json")],
    );
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("/nonexistent/opsctl.json"), "{r:?}");

    // The audit log names who did what.
    let audit = opsctl(h, &["audit"], &[("OPSCTL_CONFIG", other.to_str().unwrap())]);
    assert_eq!(audit.code, 0, "{audit:?}");
    assert!(
        audit.stdout.contains("ops") && audit.stdout.contains("jobs.create"),
        "{audit:?}"
    );
}

#[test]
fn completions_are_printed_for_each_shell() {
    let home = test_support::tempdir().unwrap();
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef opsctl"),
        ("fish", "complete -c opsctl"),
    ] {
        let r = opsctl(home.path(), &["completions", shell], &[]);
        assert_eq!(r.code, 0, "{shell}: {r:?}");
        assert!(r.stdout.contains(marker), "{shell}: {}", r.stdout);
        for word in ["rollout", "publish", "hosts", "until-paused"] {
            assert!(r.stdout.contains(word), "{shell} lacks {word}");
        }
    }
    assert_eq!(opsctl(home.path(), &["completions", "tcsh"], &[]).code, 2);
}
