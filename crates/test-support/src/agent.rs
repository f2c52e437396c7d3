//! Fake agents for end-to-end tests: tarballs whose `control` script starts a real
//! background process, records it in a pid file, and answers `status` from whether that
//! process is alive, exactly as a real agent's script would.

use crate::tarball::{targz, Entry};

/// How the fake agent behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// Starts and stays up.
    Good,
    /// `control start` exits 1 and nothing runs.
    StartFails,
    /// `control start` exits 0 but the process dies at once, so status stays `stoped`.
    DiesAtOnce,
    /// `control status` hangs forever.
    StatusHangs,
    /// Starts and stays up, but `control stop` exits 1 and leaves it running.
    StopFails,
    /// Starts, runs for about a second, then exits with code 3: a crash loop.
    Crashes,
    /// Starts a process that waits two seconds (so that `started` is seen), then fills
    /// 200 MB of memory and waits.
    EatsMemory,
    /// Starts a busy loop that uses all of one core.
    Busy,
}

/// The `control` script for `behaviour`. The agent process is `sleep` under a shell loop
/// named after the agent, so tests can find it; every call appends a line to
/// `control.log` beside the script.
pub fn control_script(name: &str, version: &str, behaviour: Behaviour) -> String {
    let start = match behaviour {
        Behaviour::Good | Behaviour::StatusHangs | Behaviour::StopFails => {
            "nohup sh -c 'while :; do sleep 1; done' >/dev/null 2>&1 &\n    echo $! > app.pid\n    echo started"
        }
        Behaviour::StartFails => "echo \"cannot start: port in use\" >&2\n    exit 1",
        Behaviour::DiesAtOnce => "sh -c 'exit 3' &\n    echo $! > app.pid\n    echo started",
        Behaviour::Crashes => {
            "echo \"starting; this one crashes\"\n    nohup sh -c 'sleep 1; exit 3' >/dev/null 2>&1 &\n    echo $! > app.pid\n    echo started"
        }
        Behaviour::EatsMemory => {
            "nohup python3 -c 'import time; time.sleep(2); b = bytearray(b\"x\") * (200 << 20); time.sleep(3600)' >/dev/null 2>&1 &\n    echo $! > app.pid\n    echo started"
        }
        Behaviour::Busy => {
            "nohup sh -c 'while :; do :; done' >/dev/null 2>&1 &\n    echo $! > app.pid\n    echo started"
        }
    };
    let status = match behaviour {
        Behaviour::StatusHangs => "while :; do sleep 1; done",
        // A zombie counts as dead: in containers whose PID 1 does not reap orphans, a
        // process that exited at once lingers as a zombie that `kill -0` still finds.
        _ => "if alive; then echo started; else echo stoped; fi",
    };
    let stop = match behaviour {
        Behaviour::StopFails => "echo \"cannot stop: busy\" >&2\n    exit 1",
        _ => "if [ -f app.pid ]; then kill \"$(cat app.pid)\" 2>/dev/null; rm -f app.pid; fi\n    echo stoped",
    };
    format!(
        r#"#!/bin/sh
# Fake agent {name} {version} for tests.
cd "$(dirname "$0")"
echo "$1 {version} AGENT_ENV=$AGENT_ENV" >> control.log
alive() {{
  [ -f app.pid ] && kill -0 "$(cat app.pid)" 2>/dev/null && [ "$(cut -d' ' -f3 /proc/$(cat app.pid)/stat 2>/dev/null)" != Z ]
}}
case "$1" in
  start)
    if alive; then echo started; exit 0; fi
    {start}
    ;;
  stop)
    {stop}
    ;;
  status)
    {status}
    ;;
  *)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac
"#
    )
}

/// A `.tar.gz` for a fake agent: `control` (0755) at the root, a version file and a small
/// binary-like payload in a subfolder.
pub fn agent_tarball(name: &str, version: &str, behaviour: Behaviour) -> Vec<u8> {
    targz(&[
        Entry::exec("control", control_script(name, version, behaviour)),
        Entry::file("VERSION", format!("{version}\n")),
        Entry::Dir {
            path: "bin/".into(),
        },
        Entry::exec("bin/agent", format!("#!/bin/sh\necho {name} {version}\n")),
    ])
}
