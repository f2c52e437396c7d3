//! Runs the demo fleet: writes the configs, starts the processes, drives the rollout with
//! `opsctl` (publish, plan, a canary wave, approval, the rest), and tears everything down.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

use crate::demo::{self, AGENT};

/// What the caller can tune.
#[derive(Debug)]
pub struct Options {
    pub step_timeout: Duration,
    pub interval: u64,
    pub keep: bool,
}

/// The demo hosts; the rollout's canary wave (prefix `canary`) is the last one.
const HOSTS: [&str; 3] = ["web-01", "web-02", "canary-01"];

/// Everything started, so that `Drop` can stop it whatever happened.
struct Fleet {
    root: PathBuf,
    keep: bool,
    /// The cgroup parent of this run's updaters (each host below it: several updaters on
    /// one machine must not share an agent's cgroup).
    cgroup_parent: String,
    meta: Option<Child>,
    updaters: Vec<Child>,
    workdirs: Vec<PathBuf>,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        // Updaters first, so none restarts an agent we are about to stop.
        for child in &mut self.updaters {
            terminate(child);
        }
        for workdir in &self.workdirs {
            stop_agents(workdir);
        }
        remove_cgroups(&self.cgroup_parent);
        if let Some(meta) = &mut self.meta {
            terminate(meta);
        }
        if self.keep {
            println!("kept {}", self.root.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

pub fn run(opts: &Options) -> Result<()> {
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let flag = interrupted.clone();
        ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst))
            .context("install Ctrl-C handler")?;
    }
    let (meta_bin, updater_bin, opsctl_bin) = find_binaries()?;

    let root = tempfile::Builder::new()
        .prefix("ops-quickstart-")
        .tempdir()
        .context("create temporary folder")?
        .keep();
    let mut fleet = Fleet {
        root: root.clone(),
        keep: opts.keep,
        cgroup_parent: format!("ops-quickstart-{}", std::process::id()),
        meta: None,
        updaters: Vec::new(),
        workdirs: Vec::new(),
    };
    println!("== working in {}", root.display());

    let tarballs = root.join("tarball");
    std::fs::create_dir_all(&tarballs)?;
    demo::publish(&tarballs, "1.0.0")?;
    println!("== published {AGENT} 1.0.0 into {}", tarballs.display());
    // The next release is built aside, for opsctl to publish.
    let release = root.join("release");
    std::fs::create_dir_all(&release)?;
    demo::publish(&release, "1.1.0")?;

    let port = free_port()?;
    let base = format!("http://127.0.0.1:{port}");
    let meta_dir = root.join("meta");
    std::fs::create_dir_all(&meta_dir)?;
    let meta_cfg = meta_dir.join("cfg.json");
    write_meta_config(&meta_cfg, &tarballs, port, &base, "1.0.0")?;
    fleet.meta = Some(spawn(
        &meta_bin,
        &["-c", path_str(&meta_cfg)?],
        &meta_dir,
        &meta_dir.join("ops-meta.log"),
    )?);
    wait_until(
        "ops-meta to answer /health",
        opts.step_timeout,
        &interrupted,
        || Ok(get(&format!("{base}/health")).is_ok()),
    )?;
    println!("== ops-meta listening on {base}");

    for host in HOSTS {
        let dir = root.join(host);
        std::fs::create_dir_all(&dir)?;
        let cfg = dir.join("cfg.json");
        let body = json!({
            "debug": false,
            "hostname": host,
            "desiredAgent": "",
            "server": format!("127.0.0.1:{port}"),
            "interval": opts.interval,
            "http": {"enabled": false, "listen": ""},
            "workdir": path_str(&dir)?,
            "cgroupParent": format!("{}/{host}", fleet.cgroup_parent),
        });
        std::fs::write(&cfg, serde_json::to_vec_pretty(&body)?)?;
        let child = spawn(
            &updater_bin,
            &["-c", path_str(&cfg)?],
            &dir,
            &dir.join("ops-updater.log"),
        )?;
        fleet.updaters.push(child);
        fleet.workdirs.push(dir);
    }
    println!("== started ops-updater on {}", HOSTS.join(", "));

    let opsctl = Opsctl {
        bin: opsctl_bin,
        server: base.clone(),
    };
    let converged = |title: &str, want: [&str; 3]| -> Result<()> {
        let started = Instant::now();
        wait_until(title, opts.step_timeout, &interrupted, || {
            let status = fleet_status(&base)?;
            Ok(HOSTS.iter().zip(want.iter()).all(|(h, v)| {
                status
                    .get(*h)
                    .is_some_and(|(ver, st)| ver == v && st == "started")
            }))
        })?;
        println!(
            "   converged in {:.1} s; fleet status (GET /status/text/{AGENT}):",
            started.elapsed().as_secs_f64()
        );
        for line in get(&format!("{base}/status/text/{AGENT}"))?.lines() {
            println!("   {line}");
        }
        Ok(())
    };

    println!("\n== step 1: every host installs 1.0.0 (cfg.json's default)");
    converged("every host on 1.0.0", ["1.0.0", "1.0.0", "1.0.0"])?;

    println!("\n== step 2: canary: opsctl publishes 1.1.0 and starts a rollout; its first wave is canary-01");
    let file = release.join(proto::legacy::tarball_file(AGENT, "1.1.0"));
    opsctl.show(&["publish", path_str(&file)?, "--dir", path_str(&tarballs)?])?;
    let spec = [
        "--agent",
        AGENT,
        "--version",
        "1.1.0",
        "--wave",
        "canary:prefix=canary",
        "--wave",
        "rest:percent=100",
        "--min-healthy",
        "3",
        "--healthy-deadline",
        "120",
        "--max-failures",
        "1",
        "--approval",
    ];
    opsctl.show(&[&["rollout", "plan"][..], &spec[..]].concat())?;
    let created =
        opsctl.json(&[&["rollout", "create"][..], &spec[..], &["--start"][..]].concat())?;
    let id = created["id"]
        .as_str()
        .ok_or_else(|| anyhow!("opsctl rollout create printed no id: {created}"))?
        .to_string();
    println!("   created and started rollout {id}");
    converged("canary-01 on 1.1.0", ["1.0.0", "1.0.0", "1.1.0"])?;
    // The canary counts once it ran 3 s without a restart; then the rollout waits for
    // the operator.
    wait_until(
        "the canary wave to be healthy",
        opts.step_timeout,
        &interrupted,
        || {
            let v = opsctl.json(&["rollout", "status", &id])?;
            Ok(v["holds"]
                .as_array()
                .is_some_and(|h| h.iter().any(|h| h["kind"] == "approval")))
        },
    )?;
    opsctl.show(&["rollout", "status", &id])?;

    println!("\n== step 3: rollout: the canary is healthy; opsctl approves the rest");
    opsctl.show(&["rollout", "approve", &id])?;
    opsctl.show(&["rollout", "watch", &id])?;
    converged("every host on 1.1.0", ["1.1.0", "1.1.0", "1.1.0"])?;
    opsctl.show(&["rollout", "status", &id])?;
    println!("\n== done: stopping the updaters, the agents and ops-meta");
    drop(fleet);
    Ok(())
}

/// hostname → (version, status) from `/status/json/NAME`.
fn fleet_status(base: &str) -> Result<BTreeMap<String, (String, String)>> {
    let text = get(&format!("{base}/status/json/{AGENT}"))?;
    let v: Value = serde_json::from_str(&text).context("parse /status/json")?;
    let mut out = BTreeMap::new();
    if let Value::Object(map) = v {
        for (host, agent) in map {
            let field = |k: &str| {
                agent
                    .get(k)
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string()
            };
            out.insert(host, (field("version"), field("status")));
        }
    }
    Ok(out)
}

fn write_meta_config(
    path: &Path,
    tarballs: &Path,
    port: u16,
    base: &str,
    default_version: &str,
) -> Result<()> {
    let cfg = json!({
        "debug": false,
        "tarballDir": path_str(tarballs)?,
        "http": {"enabled": true, "listen": format!("127.0.0.1:{port}")},
        "agents": [{
            "default": {"name": AGENT, "version": default_version, "tarball": base, "md5": "", "cmd": "start"},
        }],
        // The demo's rollout looks at its hosts four times a second.
        "rolloutPassMillis": 250,
    });
    // Written beside and renamed, so ops-meta never reads a half-written file.
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&cfg)?)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// `opsctl` as the quickstart runs it: against the demo's ops-meta, each command printed
/// before its output.
struct Opsctl {
    bin: PathBuf,
    server: String,
}

impl Opsctl {
    fn run(&self, args: &[&str], json: bool) -> Result<std::process::Output> {
        let mut cmd = command(&self.bin);
        cmd.env("OPSCTL_SERVER", &self.server)
            .env_remove("OPSCTL_TOKEN");
        if json {
            cmd.arg("--json");
        }
        let out = cmd
            .args(args)
            .output()
            .with_context(|| format!("run {}", self.bin.display()))?;
        if !out.status.success() {
            bail!(
                "opsctl {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(out)
    }

    /// Runs `opsctl ARGS` and prints the command and what it printed.
    fn show(&self, args: &[&str]) -> Result<()> {
        println!("   $ opsctl {}", args.join(" "));
        let out = self.run(args, false)?;
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            println!("     {line}");
        }
        Ok(())
    }

    /// Runs `opsctl --json ARGS` and parses what it printed.
    fn json(&self, args: &[&str]) -> Result<Value> {
        let out = self.run(args, true)?;
        serde_json::from_slice(&out.stdout)
            .with_context(|| format!("parse the output of opsctl {}", args.join(" ")))
    }
}

/// `ops-meta`, `ops-updater` and `opsctl` sit beside this executable. Under `cargo run`,
/// build them first so that the demo never runs stale binaries.
fn find_binaries() -> Result<(PathBuf, PathBuf, PathBuf)> {
    let exe = std::env::current_exe().context("locate ops-quickstart")?;
    let dir = exe
        .parent()
        .ok_or_else(|| anyhow!("executable has no folder"))?;
    if let Ok(cargo) = std::env::var("CARGO") {
        println!("== building ops-meta, ops-updater and opsctl");
        let mut cmd = command(Path::new(&cargo));
        cmd.args([
            "build",
            "--quiet",
            "--bin",
            "ops-meta",
            "--bin",
            "ops-updater",
            "--bin",
            "opsctl",
        ]);
        if dir.ends_with("release") {
            cmd.arg("--release");
        }
        let status = cmd.status().context("run cargo build")?;
        if !status.success() {
            bail!("cargo build of ops-meta, ops-updater and opsctl failed");
        }
    }
    let meta = dir.join("ops-meta");
    let updater = dir.join("ops-updater");
    let opsctl = dir.join("opsctl");
    for p in [&meta, &updater, &opsctl] {
        if !p.exists() {
            bail!(
                "{} not found: build the workspace first (cargo build --release)",
                p.display()
            );
        }
    }
    Ok((meta, updater, opsctl))
}

/// The one place this program builds a child process.
#[allow(clippy::disallowed_methods)] // The daemons' builder lives in `updater`; this is the demo's.
fn command(program: &Path) -> Command {
    let mut c = Command::new(program);
    c.stdin(Stdio::null());
    c
}

fn spawn(program: &Path, args: &[&str], cwd: &Path, log: &Path) -> Result<Child> {
    let out = std::fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
    let err = out.try_clone()?;
    command(program)
        .args(args)
        .current_dir(cwd)
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("start {}", program.display()))
}

/// SIGTERM, then SIGKILL if the process has not exited within five seconds.
fn terminate(child: &mut Child) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Runs `control stop` in every version folder of the demo agent on one host.
fn stop_agents(workdir: &Path) {
    let Ok(entries) = std::fs::read_dir(workdir.join(AGENT)) else {
        return;
    };
    for e in entries.flatten() {
        let control = e.path().join("control");
        if control.is_file() {
            let _ = command(&control)
                .arg("stop")
                .current_dir(e.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

fn wait_until(
    what: &str,
    timeout: Duration,
    interrupted: &AtomicBool,
    mut cond: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if interrupted.load(Ordering::SeqCst) {
            bail!("interrupted");
        }
        if cond().unwrap_or(false) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn get(url: &str) -> Result<String> {
    let resp = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?
        .get(url)
        .send()
        .with_context(|| format!("GET {url}"))?;
    let status = resp.status();
    let text = resp.text()?;
    if !status.is_success() {
        bail!("GET {url}: {status}: {text}");
    }
    Ok(text)
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .ok_or_else(|| anyhow!("path is not UTF-8: {}", p.display()))
}

/// Removes the (empty, once the agents are stopped) cgroup folders made under `parent` in
/// every hierarchy, deepest first. Only folders are removed, with rmdir: a cgroup that
/// still holds a process stays.
fn remove_cgroups(parent: &str) {
    fn remove_tree(dir: &Path) {
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    remove_tree(&e.path());
                }
            }
        }
        let _ = std::fs::remove_dir(dir);
    }
    let root = Path::new("/sys/fs/cgroup");
    let mut bases = vec![root.to_path_buf()];
    if let Ok(rd) = std::fs::read_dir(root) {
        bases.extend(rd.flatten().map(|e| e.path()));
    }
    for b in bases {
        let d = b.join(parent);
        if d.is_dir() {
            remove_tree(&d);
        }
    }
}
