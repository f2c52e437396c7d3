//! The command line: `-v`, `-T` on good and bad configs (exit 78 and every problem listed),
//! the original `cfg.json` accepted unchanged, and a busy `http.listen` reported at start-up.

use std::io::Read as _;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use test_support::{command, tempdir, write_file};

fn updater(args: &[&str], cwd: &Path) -> Output {
    command(Path::new(env!("CARGO_BIN_EXE_ops-updater")))
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn dash_v_prints_the_version() {
    let d = tempdir().unwrap();
    let o = updater(&["-v"], d.path());
    assert!(o.status.success());
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        env!("CARGO_PKG_VERSION")
    );
}

#[test]
fn original_cfg_json_passes_the_check_from_the_default_path() {
    let d = tempdir().unwrap();
    write_file(
        d.path(),
        "cfg.json",
        r#"{"debug": true, "hostname": "", "desiredAgent": "", "server": "127.0.0.1:2000",
            "interval": 300, "http": {"enabled": true, "listen": "0.0.0.0:2001"}}"#,
    );
    let o = updater(&["-T"], d.path());
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("is ok"), "{}", text(&o));
}

#[test]
fn unknown_keys_are_warnings_not_errors() {
    let d = tempdir().unwrap();
    write_file(
        d.path(),
        "my.json",
        r#"{"server": "127.0.0.1:2000", "forkOption": 1, "http": {"enabled": false, "tls": true}}"#,
    );
    let o = updater(&["-T", "-c", "my.json"], d.path());
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("warning: forkOption: unknown key"), "{t}");
    assert!(t.contains("warning: http.tls: unknown key"), "{t}");
}

#[test]
fn bad_config_lists_every_problem_and_exits_78() {
    let d = tempdir().unwrap();
    write_file(
        d.path(),
        "cfg.json",
        r#"{"server": "nowhere", "interval": "300", "desiredAgent": "../x",
            "keepVersions": 0, "http": {"enabled": true, "listen": "2001"}}"#,
    );
    for args in [&["-T"][..], &[][..]] {
        let o = updater(args, d.path());
        assert_eq!(o.status.code(), Some(78), "{args:?}: {}", text(&o));
        let t = text(&o);
        for field in [
            "server:",
            "interval:",
            "desiredAgent:",
            "keepVersions:",
            "http.listen:",
        ] {
            assert!(t.contains(field), "{args:?}: no {field} in {t}");
        }
    }
}

#[test]
fn missing_or_broken_file_exits_78() {
    let d = tempdir().unwrap();
    let o = updater(&["-c", "absent.json"], d.path());
    assert_eq!(o.status.code(), Some(78), "{}", text(&o));
    assert!(text(&o).contains("absent.json"), "{}", text(&o));
    write_file(d.path(), "cfg.json", "{\"server\": ");
    let o = updater(&["-T"], d.path());
    assert_eq!(o.status.code(), Some(78), "{}", text(&o));
    assert!(text(&o).contains("not valid JSON"), "{}", text(&o));
}

#[test]
fn busy_listen_address_fails_at_start_up() {
    let d = tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    write_file(
        d.path(),
        "cfg.json",
        format!(
            r#"{{"server": "127.0.0.1:1", "hostname": "h", "workdir": "{}",
                "http": {{"enabled": true, "listen": "{addr}"}}}}"#,
            d.path().join("work").display()
        ),
    );
    let o = updater(&[], d.path());
    assert!(!o.status.success());
    assert!(text(&o).contains(&addr.to_string()), "{}", text(&o));
}

#[test]
fn shipped_example_config_is_valid() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/updater/cfg.json");
    let d = tempdir().unwrap();
    let o = updater(&["-T", "-c", example.to_str().unwrap()], d.path());
    assert!(o.status.success(), "{}", text(&o));
    assert!(!text(&o).contains("warning"), "{}", text(&o));
}

#[test]
fn sigterm_stops_the_daemon_cleanly() {
    let d = tempdir().unwrap();
    let port = test_support::free_port();
    write_file(
        d.path(),
        "cfg.json",
        format!(
            r#"{{"server": "127.0.0.1:1", "hostname": "h", "interval": 1, "workdir": "{}",
                "http": {{"enabled": true, "listen": "127.0.0.1:{port}"}}}}"#,
            d.path().join("work").display()
        ),
    );
    let mut child = test_support::KillOnDrop(
        command(Path::new(env!("CARGO_BIN_EXE_ops-updater")))
            .current_dir(d.path())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    test_support::wait_listening(
        ([127, 0, 0, 1], port).into(),
        std::time::Duration::from_secs(30),
    );
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = test_support::wait_for_some("exit", std::time::Duration::from_secs(30), || {
        child.try_wait().unwrap()
    });
    assert!(status.success(), "{status:?}");
}

/// Two ops-updaters ran on one workdir at once (seen with `http` disabled), breaking "one
/// action per agent at a time": a second one now exits with 75 and says who holds it.
#[test]
fn a_second_updater_on_one_workdir_exits_75_and_a_killed_one_does_not_block_the_next() {
    let d = tempdir().unwrap();
    let work = d.path().join("work");
    write_file(
        d.path(),
        "cfg.json",
        format!(
            r#"{{"server": "127.0.0.1:1", "hostname": "h", "interval": 1, "protocol": "legacy",
                "workdir": "{}", "http": {{"enabled": false}}}}"#,
            work.display()
        ),
    );
    let start = || {
        let mut c = test_support::command(Path::new(env!("CARGO_BIN_EXE_ops-updater")));
        c.current_dir(d.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        test_support::KillOnDrop(c.spawn().unwrap())
    };
    let mut first = start();
    test_support::wait_for(
        "the first to hold the lock",
        Duration::from_secs(30),
        || {
            std::fs::read_to_string(work.join(".ops-updater.lock"))
                .is_ok_and(|s| s.trim() == first.id().to_string())
        },
    );
    let mut c = test_support::command(Path::new(env!("CARGO_BIN_EXE_ops-updater")));
    c.current_dir(d.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut second = test_support::KillOnDrop(c.spawn().unwrap());
    let mut status = None;
    test_support::wait_for("the second to exit", Duration::from_secs(30), || {
        status = second.try_wait().unwrap();
        status.is_some()
    });
    let mut err = String::new();
    second
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(status.unwrap().code(), Some(75), "{err}");
    assert!(err.contains("another ops-updater"), "{err}");
    assert!(err.contains(&first.id().to_string()), "{err}");
    assert!(first.try_wait().unwrap().is_none(), "the first one exited");
    // kill -9: the kernel releases the lock, the next start takes it.
    first.kill().unwrap();
    first.wait().unwrap();
    let second = start();
    test_support::wait_for("the next to hold the lock", Duration::from_secs(30), || {
        std::fs::read_to_string(work.join(".ops-updater.lock"))
            .is_ok_and(|s| s.trim() == second.id().to_string())
    });
}
