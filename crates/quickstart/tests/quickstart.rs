//! The README's first command, run as a newcomer would: the whole canary rollout must
//! converge, print the fleet at each step, and leave nothing behind.

use std::path::PathBuf;

#[test]
fn quickstart_rolls_out_through_the_canary_and_cleans_up() {
    // The quickstart looks for its siblings beside itself; make sure they are built.
    test_support::cargo_bin("ops-meta");
    test_support::cargo_bin("ops-updater");
    test_support::cargo_bin("opsctl");
    let out = test_support::command(&PathBuf::from(env!("CARGO_BIN_EXE_ops-quickstart")))
        .args(["--interval", "1", "--step-timeout-secs", "120"])
        // Under `cargo test`, CARGO is set; without this the quickstart would run a nested
        // `cargo build` with other features and rebuild dependencies.
        .env_remove("CARGO")
        .output()
        .expect("run ops-quickstart");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");

    let steps: Vec<&str> = stdout.split("== step ").skip(1).collect();
    assert_eq!(steps.len(), 3, "{stdout}");
    for host in ["web-01", "web-02", "canary-01"] {
        assert!(
            steps[0].contains(&format!("{host} 1.0.0 started")),
            "{}",
            steps[0]
        );
        assert!(
            steps[2].contains(&format!("{host} 1.1.0 started")),
            "{}",
            steps[2]
        );
    }
    assert!(steps[1].contains("canary-01 1.1.0 started"), "{}", steps[1]);
    assert!(steps[1].contains("web-01 1.0.0 started"), "{}", steps[1]);
    assert!(steps[1].contains("web-02 1.0.0 started"), "{}", steps[1]);
    // The rollout is driven by opsctl: published, planned, the canary wave first, held for
    // approval, then approved and watched to its end.
    for cmd in [
        "$ opsctl publish",
        "$ opsctl rollout plan",
        "$ opsctl rollout status",
    ] {
        assert!(steps[1].contains(cmd), "{cmd} missing: {}", steps[1]);
    }
    assert!(steps[1].contains("approv"), "{}", steps[1]);
    assert!(
        steps[2].contains("$ opsctl rollout approve"),
        "{}",
        steps[2]
    );
    assert!(steps[2].contains("completed"), "{}", steps[2]);

    let root = stdout
        .lines()
        .find_map(|l| l.strip_prefix("== working in "))
        .expect("working folder printed");
    assert!(
        !std::path::Path::new(root).exists(),
        "{root} was not removed"
    );
}
