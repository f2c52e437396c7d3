//! Runs the demo fleet: writes the configs, starts the processes, drives the rollout through
//! ops-meta's config file and `/config/reload`, and tears everything down.

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

/// The demo hosts; the canary prefix in the rollout matches only the last one.
const HOSTS: [&str; 3] = ["web-01", "web-02", "canary-01"];
const CANARY_PREFIX: &str = "canary";

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
    let (meta_bin, updater_bin) = find_binaries()?;

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
    demo::publish(&tarballs, "1.1.0")?;
    println!(
        "== published {AGENT} 1.0.0 and 1.1.0 into {}",
        tarballs.display()
    );

    let port = free_port()?;
    let base = format!("http://127.0.0.1:{port}");
    let meta_dir = root.join("meta");
    std::fs::create_dir_all(&meta_dir)?;
    let meta_cfg = meta_dir.join("cfg.json");
    write_meta_config(&meta_cfg, &tarballs, port, &base, "1.0.0", None)?;
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

    let steps: [(&str, &str, Option<&str>, [&str; 3]); 3] = [
        (
            "every host installs 1.0.0",
            "1.0.0",
            None,
            ["1.0.0", "1.0.0", "1.0.0"],
        ),
        (
            "canary: 1.1.0 on canary-01 only",
            "1.0.0",
            Some("1.1.0"),
            ["1.0.0", "1.0.0", "1.1.0"],
        ),
        (
            "rollout: 1.1.0 everywhere",
            "1.1.0",
            None,
            ["1.1.0", "1.1.0", "1.1.0"],
        ),
    ];
    for (i, (title, default, canary, want)) in steps.iter().enumerate() {
        println!("\n== step {}: {title}", i + 1);
        if i > 0 {
            write_meta_config(&meta_cfg, &tarballs, port, &base, default, *canary)?;
            get(&format!("{base}/config/reload")).context("reload ops-meta's config")?;
            println!("   config changed and reloaded (GET /config/reload)");
        }
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
    }
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
    canary_version: Option<&str>,
) -> Result<()> {
    let others: Vec<Value> = canary_version
        .map(
            |v| json!({"prefix": CANARY_PREFIX, "version": v, "tarball": "", "md5": "", "cmd": ""}),
        )
        .into_iter()
        .collect();
    let cfg = json!({
        "debug": false,
        "tarballDir": path_str(tarballs)?,
        "http": {"enabled": true, "listen": format!("127.0.0.1:{port}")},
        "agents": [{
            "default": {"name": AGENT, "version": default_version, "tarball": base, "md5": "", "cmd": "start"},
            "others": others,
        }],
    });
    // Written beside and renamed, so ops-meta never reads a half-written file.
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&cfg)?)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// `ops-meta` and `ops-updater` sit beside this executable. Under `cargo run`, build them
/// first so that the demo never runs stale binaries.
fn find_binaries() -> Result<(PathBuf, PathBuf)> {
    let exe = std::env::current_exe().context("locate ops-quickstart")?;
    let dir = exe
        .parent()
        .ok_or_else(|| anyhow!("executable has no folder"))?;
    if let Ok(cargo) = std::env::var("CARGO") {
        println!("== building ops-meta and ops-updater");
        let mut cmd = command(Path::new(&cargo));
        cmd.args([
            "build",
            "--quiet",
            "--bin",
            "ops-meta",
            "--bin",
            "ops-updater",
        ]);
        if dir.ends_with("release") {
            cmd.arg("--release");
        }
        let status = cmd.status().context("run cargo build")?;
        if !status.success() {
            bail!("cargo build of ops-meta and ops-updater failed");
        }
    }
    let meta = dir.join("ops-meta");
    let updater = dir.join("ops-updater");
    for p in [&meta, &updater] {
        if !p.exists() {
            bail!(
                "{} not found: build the workspace first (cargo build --release)",
                p.display()
            );
        }
    }
    Ok((meta, updater))
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
