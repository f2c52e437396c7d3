//! The flags → [`RolloutSpec`] parsing and the drawing of plans, views and lists, from
//! fixtures built of the proto types and sent through JSON as the server would.

use super::*;
use clap::Parser;
use proto::rollout::{Hold, HostFailure, PhaseCounts, STATE_RUNNING};

fn spec_of(args: &[&str]) -> Result<RolloutSpec, Error> {
    let cli = crate::cli::Cli::try_parse_from(
        ["opsctl", "rollout", "create"].iter().chain(args).copied(),
    )
    .map_err(|e| Error::Usage(e.to_string()))?;
    let crate::cli::Command::Rollout(r) = cli.command else {
        panic!("not rollout")
    };
    let RolloutCommand::Create { spec, start } = r.command else {
        panic!("not create")
    };
    spec_from_args(&spec, start)
}

/// What the server would have received: the spec as JSON, read back.
fn over_the_wire<T: serde::Serialize + serde::de::DeserializeOwned>(t: &T) -> T {
    serde_json::from_str(&serde_json::to_string(t).unwrap()).unwrap()
}

#[test]
fn every_spec_flag_lands_in_its_field() {
    let s = spec_of(&[
        "--agent",
        "falcon-agent",
        "--version",
        "1.0.1",
        "--tarball",
        "http://meta:2000/files",
        "--sha256",
        &"AB".repeat(32),
        "--wave",
        "canary:prefix=web-0,web-1",
        "--wave",
        "tagged:tag=role=canary,dc=bj",
        "--wave",
        "percent=10",
        "--wave",
        "rest:percent=100",
        "--max-in-flight",
        "5",
        "--min-healthy",
        "30",
        "--healthy-deadline",
        "600",
        "--missing-after",
        "120",
        "--max-failures",
        "2",
        "--max-failure-percent",
        "12.5",
        "--approval",
        "--window",
        "mon,Tue@02:00-05:30",
        "--start",
    ])
    .unwrap();
    let want = RolloutSpec {
        agent: "falcon-agent".into(),
        version: "1.0.1".into(),
        tarball: "http://meta:2000/files".into(),
        sha256: "ab".repeat(32),
        waves: vec![
            WaveSpec {
                name: "canary".into(),
                prefixes: vec!["web-0".into(), "web-1".into()],
                ..WaveSpec::default()
            },
            WaveSpec {
                name: "tagged".into(),
                tags: vec!["role=canary".into(), "dc=bj".into()],
                ..WaveSpec::default()
            },
            WaveSpec {
                percent: Some(10.0),
                ..WaveSpec::default()
            },
            WaveSpec {
                name: "rest".into(),
                percent: Some(100.0),
                ..WaveSpec::default()
            },
        ],
        max_in_flight: Some(5),
        min_healthy_secs: Some(30),
        healthy_deadline_secs: Some(600),
        missing_after_secs: Some(120),
        max_failures: Some(2),
        max_failure_percent: Some(12.5),
        approval: true,
        window: Some(WindowSpec {
            days: vec!["mon".into(), "tue".into()],
            start: "02:00".into(),
            end: "05:30".into(),
        }),
        start: true,
    };
    assert_eq!(s, want);
    assert_eq!(over_the_wire(&s), want);
    // The body as the server reads it: camelCase, optional numbers left out when unset.
    let min = spec_of(&[
        "--agent",
        "a",
        "--version",
        "1",
        "--wave",
        "all:percent=100",
    ])
    .unwrap();
    assert_eq!(
        serde_json::to_value(&min).unwrap(),
        serde_json::json!({"agent": "a", "version": "1", "approval": false, "start": false,
                           "waves": [{"name": "all", "percent": 100.0}]})
    );
}

#[test]
fn bad_spec_flags_are_usage_errors_that_name_the_flag() {
    let base = ["--agent", "a", "--version", "1"];
    let check = |extra: &[&str], want: &str| {
        let args: Vec<&str> = base.iter().chain(extra).copied().collect();
        let e = spec_of(&args).unwrap_err();
        assert_eq!(e.exit_code(), exit::USAGE, "{extra:?}");
        assert!(e.to_string().contains(want), "{extra:?}: {e}");
    };
    check(&["--wave", "canary"], "--wave");
    check(&["--wave", "c:prefix="], "empty entry");
    check(&["--wave", "c:host=web"], "not prefix, tag or percent");
    check(&["--wave", "c:percent=0"], "above 0");
    check(&["--wave", "c:percent=101"], "at most 100");
    check(&["--wave", "c:percent=ten"], "not a number");
    check(&["--wave", "c:tag=role"], "not key=value");
    check(&["--wave", "../x:percent=1"], "wave name");
    check(&["--wave", "c:prefix=a b"], "prefix");
    check(
        &["--wave", "all:percent=100", "--sha256", "abc"],
        "--sha256",
    );
    check(
        &["--wave", "all:percent=100", "--window", "02:00"],
        "HH:MM-HH:MM",
    );
    check(
        &["--wave", "all:percent=100", "--window", "fun@02:00-03:00"],
        "not a day",
    );
    check(
        &["--wave", "all:percent=100", "--window", "24:00-03:00"],
        "not HH:MM",
    );
    check(
        &["--wave", "all:percent=100", "--max-failure-percent", "150"],
        "0 to 100",
    );
    check(
        &["--wave", "all:percent=100", "--max-in-flight", "0"],
        "at least 1",
    );
    check(
        &["--wave", "all:percent=100", "--tarball", "ftp://x/"],
        "--tarball",
    );
    check(
        &[
            "--wave",
            "all:percent=100",
            "--tarball",
            "http://x/a-1.tar.gz",
        ],
        "base URL",
    );
    let e = spec_of(&["--agent", "../etc", "--version", "1", "--wave", "percent=1"]).unwrap_err();
    assert!(e.to_string().contains("--agent"), "{e}");
    let many: Vec<String> = (0..=MAX_WAVES)
        .map(|i| format!("w{i}:percent=100"))
        .collect();
    let mut args: Vec<&str> = base.to_vec();
    for w in &many {
        args.extend(["--wave", w]);
    }
    assert!(spec_of(&args).unwrap_err().to_string().contains("limit"));
}

#[test]
fn a_spec_file_is_read_whole_and_start_can_be_added() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("spec.json");
    std::fs::write(
        &p,
        r#"{"agent": "basic", "version": "2.0", "waves": [{"name": "c", "prefixes": ["web-0"]}],
            "maxInFlight": 3, "window": {"start": "22:00", "end": "04:00"}}"#,
    )
    .unwrap();
    let s = spec_of(&["--file", p.to_str().unwrap(), "--start"]).unwrap();
    assert_eq!(s.agent, "basic");
    assert_eq!(s.max_in_flight, Some(3));
    assert_eq!(s.waves[0].prefixes, ["web-0"]);
    assert_eq!(s.window.as_ref().unwrap().end, "04:00");
    assert!(s.start);
    std::fs::write(&p, "{not json").unwrap();
    let e = spec_of(&["--file", p.to_str().unwrap()]).unwrap_err();
    assert_eq!(e.exit_code(), exit::USAGE);
    assert!(e.to_string().contains("spec.json"), "{e}");
}

fn wave(index: usize, name: &str, state: &str, counts: PhaseCounts, limit: u64) -> WaveView {
    WaveView {
        index,
        name: name.into(),
        state: state.into(),
        hosts: counts.total(),
        counts,
        sample: vec![format!("{name}-01"), format!("{name}-02")],
        failure_limit: limit,
    }
}

fn running_view() -> RolloutView {
    let w0 = PhaseCounts {
        healthy: 2,
        ..PhaseCounts::default()
    };
    let w1 = PhaseCounts {
        pending: 5,
        in_flight: 2,
        healthy: 1,
        failed: 1,
        infra_failed: 1,
        missing: 0,
    };
    let mut all = w1.clone();
    all.healthy += 2;
    RolloutView {
        id: "r-7f3a".into(),
        agent: "falcon-agent".into(),
        version: "1.0.1".into(),
        from_version: "1.0.0".into(),
        tarball_url: "http://meta:2000/falcon-agent-1.0.1.tar.gz".into(),
        state: STATE_PAUSED.into(),
        paused_reason: "1 of 10 hosts of wave rest failed (limit 1)".into(),
        current_wave: 1,
        waves: vec![
            wave(0, "canary", "done", w0, 0),
            wave(1, "rest", "active", w1, 1),
        ],
        counts: all,
        holds: vec![Hold {
            kind: "threshold".into(),
            text: "paused: wave rest reached its failure limit".into(),
            hosts: vec!["rest-03".into()],
            count: 1,
        }],
        failures: vec![
            HostFailure {
                host: "rest-03".into(),
                phase: "failed".into(),
                reason: "control start exited 1: port in use".into(),
                wave: 1,
            },
            HostFailure {
                host: "rest-07".into(),
                phase: "infra_failed".into(),
                reason: "download: connection reset".into(),
                wave: 1,
            },
        ],
        created: 1_700_000_000,
        updated: 1_700_000_600,
        ..RolloutView::default()
    }
}

#[test]
fn a_status_says_why_it_is_not_moving_and_what_failed() {
    let v = over_the_wire(&running_view());
    let text = status_view(&v, 1_700_000_660);
    for want in [
        "rollout r-7f3a: falcon-agent 1.0.0 -> 1.0.1  [paused]",
        "sha256   not known yet",
        "paused   1 of 10 hosts of wave rest failed (limit 1)",
        "updated  2023-11-14 22:23:20Z (60s ago)",
        "why it is not moving:\n  - paused: wave rest reached its failure limit (rest-03)",
        "rest-03  rest  release              control start exited 1: port in use",
        "rest-07  rest  infra (not counted)  download: connection reset",
        "all: 12 host(s): 3 healthy, 2 in flight, 5 pending, 1 failed, 1 infra-failed, 0 missing",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    // The wave being worked on is marked; its counts are in their columns.
    let line = text.lines().find(|l| l.starts_with("2*")).expect(&text);
    let cols: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(
        cols,
        ["2*", "rest", "active", "10", "1", "2", "5", "1", "1", "0", "1"]
    );
    assert!(!text.contains("completed."), "{text}");
    assert_eq!(state_exit(&v.state), exit::PAUSED);
}

#[test]
fn a_completed_status_shows_how_to_make_it_permanent() {
    // As the server would send it: JSON text in the proto's shape.
    let body = r#"{"id": "r-1", "agent": "falcon-agent", "version": "1.0.1", "fromVersion": "1.0.0",
        "tarballUrl": "http://meta:2000/sub/falcon-agent-1.0.1.tar.gz",
        "sha256": "aa11", "signatureUrl": "http://meta:2000/sub/falcon-agent-1.0.1.tar.gz.minisig",
        "state": "completed", "currentWave": 0,
        "waves": [{"index": 0, "name": "all", "state": "done", "hosts": 3,
                   "counts": {"pending": 0, "inFlight": 0, "healthy": 3, "failed": 0, "infraFailed": 0, "missing": 0},
                   "failureLimit": 0}],
        "counts": {"pending": 0, "inFlight": 0, "healthy": 3, "failed": 0, "infraFailed": 0, "missing": 0},
        "spec": {"agent": "falcon-agent", "version": "1.0.1", "waves": [{"percent": 100}]},
        "created": 1700000000, "updated": 1700000100,
        "permanent": "set agents[falcon-agent].default.version to 1.0.1 in cfg.json and reload"}"#;
    let v: RolloutView = decode(body, "test").unwrap();
    let text = status_view(&v, 1_700_000_100);
    assert!(
        text.contains("completed. set agents[falcon-agent].default.version to 1.0.1"),
        "{text}"
    );
    let snippet = cfg_snippet(&v);
    let parsed: serde_json::Value = serde_json::from_str(&snippet).unwrap();
    assert_eq!(
        parsed,
        serde_json::json!({"default": {"name": "falcon-agent", "version": "1.0.1",
            "tarball": "http://meta:2000/sub", "sha256": "aa11"}})
    );
    assert!(text.contains(&snippet), "{text}");
    assert!(
        text.contains("signature  http://meta:2000/sub/falcon-agent-1.0.1.tar.gz.minisig"),
        "{text}"
    );
    assert_eq!(state_exit(&v.state), exit::OK);
}

#[test]
fn states_map_to_exit_codes() {
    for (state, code) in [
        (STATE_COMPLETED, 0),
        (STATE_PAUSED, 10),
        (STATE_ABORTED, 11),
        (STATE_ROLLED_BACK, 11),
        (STATE_SUPERSEDED, 11),
        (STATE_RUNNING, 12),
        (proto::rollout::STATE_PLANNED, 12),
    ] {
        assert_eq!(state_exit(state), code, "{state}");
    }
}

#[test]
fn a_plan_lists_waves_samples_and_warnings() {
    let p = over_the_wire(&RolloutPlan {
        agent: "basic".into(),
        version: "2.0".into(),
        from_version: "1.0".into(),
        tarball_url: "http://meta:2000/basic-2.0.tar.gz".into(),
        waves: vec![
            WaveView {
                index: 0,
                name: "canary".into(),
                state: "waiting".into(),
                hosts: 2,
                sample: vec!["web-0".into(), "web-1".into()],
                ..WaveView::default()
            },
            WaveView {
                index: 1,
                name: "rest".into(),
                state: "waiting".into(),
                hosts: 98,
                sample: (0..5).map(|i| format!("app-{i}")).collect(),
                failure_limit: 5,
                ..WaveView::default()
            },
        ],
        outside: 7,
        warnings: vec!["no sha256 known yet for basic-2.0.tar.gz".into()],
    });
    let text = plan_view(&p);
    for want in [
        "plan: basic 1.0 -> 2.0",
        "1  canary  2      none           web-0, web-1",
        "2  rest    98     5              app-0, app-1, app-2, app-3, app-4, +93 more",
        "100 host(s) in 2 wave(s); 7 known host(s) in no wave are left alone",
        "warnings:\n  - no sha256 known yet for basic-2.0.tar.gz",
        "nothing was stored",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
}

#[test]
fn a_list_has_one_line_per_rollout() {
    let mut done = running_view();
    done.id = "r-1".into();
    done.state = STATE_COMPLETED.into();
    let l = over_the_wire(&RolloutList {
        rollouts: vec![running_view(), done],
    });
    let text = list_view(&l, 1_700_000_660);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    let cols: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        cols,
        [
            "r-7f3a",
            "falcon-agent",
            "1.0.0",
            "1.0.1",
            "paused",
            "2/2",
            "3/12",
            "1",
            "60s",
            "ago"
        ]
    );
    assert_eq!(list_view(&RolloutList::default(), 0), "no rollouts\n");
}

#[test]
fn progress_bars_show_each_part_of_a_wave() {
    assert_eq!(bar(&[(5, '#')], 10, 10), "#####.....");
    assert_eq!(bar(&[(10, '#')], 10, 10), "##########");
    assert_eq!(bar(&[], 0, 4), "....");
    // One failure in a thousand still shows.
    assert_eq!(bar(&[(999, '#'), (1, 'x')], 1000, 10), "#########x");
    assert_eq!(bar(&[(3, '#'), (1, '>'), (1, 'x')], 10, 10), "###>x.....");
    let lines = progress(&running_view());
    assert_eq!(lines[0], "rollout r-7f3a falcon-agent -> 1.0.1: paused (1 of 10 hosts of wave rest failed (limit 1))");
    assert_eq!(
        lines[1],
        format!("  canary  [{}] 100%  2/2 healthy", "#".repeat(30))
    );
    assert_eq!(
        lines[2],
        format!(
            "  rest    [{}{}{}{}{}]  10%  1/10 healthy, 2 in flight, 1 failed, 1 infra",
            "###", ">>>>>>", "xxx", "!!!", "...............",
        )
    );
    assert_eq!(
        lines[3],
        "  holding: paused: wave rest reached its failure limit"
    );
    let plain = plain_line(&running_view());
    assert!(plain.ends_with("r-7f3a: paused | canary 2/2 | rest 1/10 >2 x1 !1; holding: paused: wave rest reached its failure limit"), "{plain}");
}
