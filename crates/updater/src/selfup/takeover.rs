//! Moving a host from the original ops-updater to ours by a config change alone. The
//! operator adds agent `ops-updater` (our release tarball) to ops-meta's `cfg.json`; the
//! original installs it like any agent and runs its `control start`, which runs
//! `ops-updater --take-over` (dist/control does, when it finds itself in an agent's
//! version folder). That:
//!
//! 1. finds the original among its parent processes (the one whose command line runs a
//!    file named `ops-updater`), with its executable, arguments and working directory;
//! 2. checks that our binary accepts the original's config (`-T`); nothing changes if not;
//! 3. puts our binary in place of the original's executable (the original kept as
//!    `<exe>.orig`), by a copy beside it and one rename;
//! 4. detaches a waiter and returns, so the original's `control start` ends: the waiter
//!    sends the original SIGTERM, waits for it to exit (SIGKILL after 30 s), and starts the
//!    executable — ours now — with the original's arguments from its folder. A service
//!    manager that restarts the original (systemd `Restart=`) starts ours as well; the
//!    second one finds the workdir locked and exits 75.
//!
//! The agents are never stopped: the original leaves them running when it ends, and ours
//! takes over their folders as they are.

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt as _, OsStringExt as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The original updater as found among our parents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Original {
    pub pid: i32,
    pub exe: PathBuf,
    pub args: Vec<OsString>,
    pub cwd: PathBuf,
}

/// Environment of the detached waiter: what to wait for and start.
const ENV_WAIT_PID: &str = "OPS_UPDATER_TAKEOVER_PID";
const ENV_EXE: &str = "OPS_UPDATER_TAKEOVER_EXE";
const ENV_CWD: &str = "OPS_UPDATER_TAKEOVER_CWD";
/// The original's arguments, each in hex, comma-separated.
const ENV_ARGS: &str = "OPS_UPDATER_TAKEOVER_ARGS";

fn ppid_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid ...`; comm may hold spaces and parentheses.
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// The nearest parent process that runs a file named `ops-updater` other than `own`:
/// `argv[0]`, or `argv[1]` when `argv[0]` is an interpreter running a script.
pub fn find_original(own: &Path) -> Result<Original, String> {
    let mut pid = std::os::unix::process::parent_id() as i32;
    while pid > 1 {
        if let Some(o) = original_at(pid, own) {
            return Ok(o);
        }
        pid = ppid_of(pid).ok_or_else(|| format!("cannot read /proc/{pid}/stat"))?;
    }
    Err("no original ops-updater among the parent processes (run by hand?)".into())
}

fn original_at(pid: i32, own: &Path) -> Option<Original> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let argv: Vec<OsString> = raw
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| OsString::from_vec(a.to_vec()))
        .collect();
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).ok()?;
    for i in 0..argv.len().min(2) {
        let p = Path::new(&argv[i]);
        if p.file_name().is_none_or(|n| n != "ops-updater") {
            continue;
        }
        let exe = cwd.join(p).canonicalize().ok()?;
        if exe == own || !exe.is_file() {
            return None;
        }
        return Some(Original {
            pid,
            exe,
            args: argv[i + 1..].to_vec(),
            cwd,
        });
    }
    None
}

/// `ops-updater --take-over`: steps 1 to 4 above. Returns the line to print.
pub fn take_over() -> Result<String, String> {
    let own = std::env::current_exe().map_err(|e| format!("finding our executable: {e}"))?;
    let orig = find_original(&own)?;
    check_config(&own, &orig)?;
    install_over(&own, &orig.exe)?;
    spawn_waiter(&orig)?;
    Ok(format!(
        "started: taking over from the original ops-updater (pid {}) at {}",
        orig.pid,
        orig.exe.display()
    ))
}

fn check_config(own: &Path, orig: &Original) -> Result<(), String> {
    let mut args = vec![OsString::from("-T")];
    let mut it = orig.args.iter();
    while let Some(a) = it.next() {
        if a == "-c" {
            args.push(a.clone());
            if let Some(v) = it.next() {
                args.push(v.clone());
            }
        }
    }
    let out = crate::process::std_command(own)
        .args(&args)
        .current_dir(&orig.cwd)
        .output()
        .map_err(|e| format!("running {} -T: {e}", own.display()))?;
    if !out.status.success() {
        return Err(format!(
            "our ops-updater refuses the original's config: {}{}",
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        ));
    }
    Ok(())
}

#[allow(clippy::disallowed_methods)] // A one-shot command: no runtime thread to protect.
fn install_over(own: &Path, exe: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = exe
        .parent()
        .ok_or("the original's executable has no folder")?;
    let tmp = dir.join(format!(
        ".ops-updater.takeover-{}",
        uuid::Uuid::new_v4().simple()
    ));
    let orig_keep = {
        let mut s = exe.as_os_str().to_owned();
        s.push(".orig");
        PathBuf::from(s)
    };
    let res = (|| -> std::io::Result<()> {
        std::fs::copy(own, &tmp)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
        std::fs::File::open(&tmp)?.sync_all()?;
        if !orig_keep.exists() {
            std::fs::hard_link(exe, &orig_keep)
                .or_else(|_| std::fs::copy(exe, &orig_keep).map(|_| ()))?;
        }
        std::fs::rename(&tmp, exe)?;
        crate::fsx::fsync_dir(dir)
    })();
    res.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("cannot put ops-updater in place of {}: {e}", exe.display())
    })
}

#[allow(unsafe_code)] // `pre_exec` with `setsid` only.
fn spawn_waiter(orig: &Original) -> Result<(), String> {
    use std::os::unix::process::CommandExt as _;
    let own = std::env::current_exe().map_err(|e| e.to_string())?;
    // Each argument in hex, comma-separated: an environment value cannot hold every byte.
    let args: Vec<String> = orig
        .args
        .iter()
        .map(|a| hex::encode(a.as_bytes()))
        .collect();
    let args = args.join(",");
    let log = orig.cwd.join("ops-updater.takeover.log");
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .map_err(|e| format!("{}: {e}", log.display()))?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    let mut c = crate::process::std_command(&own);
    c.arg("--take-over-wait")
        .env(ENV_WAIT_PID, orig.pid.to_string())
        .env(ENV_EXE, &orig.exe)
        .env(ENV_CWD, &orig.cwd)
        .env(ENV_ARGS, args)
        .stdout(out)
        .stderr(err);
    // SAFETY: setsid is async-signal-safe.
    unsafe {
        c.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    c.spawn()
        .map(|_| ())
        .map_err(|e| format!("cannot start the take-over waiter: {e}"))
}

/// `ops-updater --take-over-wait`: ends the original and starts ours in its place (by
/// `exec`: this process becomes the supervisor).
pub fn wait_and_start() -> Result<(), String> {
    use std::os::unix::process::CommandExt as _;
    let pid: i32 = std::env::var(ENV_WAIT_PID)
        .ok()
        .and_then(|p| p.parse().ok())
        .ok_or("no pid to take over from")?;
    let exe = PathBuf::from(std::env::var_os(ENV_EXE).ok_or("no executable")?);
    let cwd = PathBuf::from(std::env::var_os(ENV_CWD).ok_or("no folder")?);
    let raw = std::env::var(ENV_ARGS).unwrap_or_default();
    let args: Vec<OsString> = raw
        .split(',')
        .filter(|a| !a.is_empty())
        .map(|a| hex::decode(a).map(OsString::from_vec))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("bad arguments to take over: {e}"))?;
    let p = nix::unistd::Pid::from_raw(pid);
    let _ = nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(30);
    while nix::sys::signal::kill(p, None).is_ok() && !is_zombie(pid) {
        if Instant::now() > deadline {
            let _ = nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "ops-updater take-over: the original (pid {pid}) ended; starting {}",
        exe.display()
    );
    let e = crate::process::std_command(&exe)
        .args(&args)
        .current_dir(&cwd)
        .env_remove(ENV_WAIT_PID)
        .env_remove(ENV_EXE)
        .env_remove(ENV_CWD)
        .env_remove(ENV_ARGS)
        .exec();
    Err(format!("cannot start {}: {e}", exe.display()))
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}
