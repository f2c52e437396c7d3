//! Per-agent cgroups, v1 and v2: where the hierarchies are ([`Cgroups::detect`]), one
//! cgroup per agent with its limits written ([`Cgroups::agent`]), a child placed in it
//! before it runs its first instruction ([`AgentCgroup::attach`]), and what the lead's
//! supervision needs from it: its processes, a wait for it to empty, OOM kill counts, a
//! kill of everything in it, and its removal.
//!
//! Layout: `<hierarchy root>/<parent>/<agent>`, `parent` being `ops-updater` unless
//! configured. Nothing here fails an agent: a limit that cannot be applied is carried by
//! the handle as [`AgentCgroup::not_enforced`], and a machine without usable cgroups gives
//! handles that track nothing.
//!
//! Files under `/sys/fs/cgroup` are tiny and served from memory: they are read and
//! written inline, also from the async functions.

use std::collections::BTreeSet;
use std::fmt;
use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use proto::limits::{Limits, CPU_SCALE};
use proto::names::AgentName;

/// The cgroup parent used when the config names none.
pub const DEFAULT_PARENT: &str = "ops-updater";
/// Longest `parent`, in bytes.
pub const MAX_PARENT_LEN: usize = 1024;
/// CFS bandwidth period for CPU limits, in microseconds (the kernel's default).
pub const CPU_PERIOD_US: u64 = 100_000;
/// The period used when a limit is so small that its quota in [`CPU_PERIOD_US`] would fall
/// below [`MIN_CPU_QUOTA_US`]; the kernel accepts periods up to one second.
pub const LONG_CPU_PERIOD_US: u64 = 1_000_000;
/// The smallest quota the kernel accepts, in microseconds.
pub const MIN_CPU_QUOTA_US: u64 = 1_000;
/// How often [`AgentCgroup::wait_empty`] looks at a v1 cgroup (and at a v2 one when
/// inotify is not available). v1 only tells that a cgroup emptied through its
/// hierarchy-wide `release_agent`, a program the kernel runs, which belongs to whoever
/// manages the hierarchy (systemd, a container runtime) and is not ours to take.
pub const EMPTY_POLL: Duration = Duration::from_millis(100);
/// How often [`AgentCgroup::kill_all`] reads `cgroup.procs` while it waits.
pub const KILL_POLL: Duration = Duration::from_millis(20);
/// How long [`AgentCgroup::kill_all`] waits, after SIGKILL, for the cgroup to empty.
pub const KILL_WAIT: Duration = Duration::from_secs(2);

/// A controller this module uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Controller {
    /// CPU bandwidth (`cpu.max`; v1 `cpu.cfs_quota_us`).
    Cpu,
    /// CPU accounting, v1 only (`cpuacct.usage`); v2 has `cpu.stat` always.
    Cpuacct,
    /// Memory limit and OOM kill counts.
    Memory,
    /// Process tracking (no limit is set).
    Pids,
}

impl Controller {
    /// All of them, in a fixed order.
    pub const ALL: [Controller; 4] = [
        Controller::Cpu,
        Controller::Cpuacct,
        Controller::Memory,
        Controller::Pids,
    ];

    /// The kernel's name.
    pub fn name(self) -> &'static str {
        match self {
            Controller::Cpu => "cpu",
            Controller::Cpuacct => "cpuacct",
            Controller::Memory => "memory",
            Controller::Pids => "pids",
        }
    }

    fn of(name: &str) -> Option<Controller> {
        Controller::ALL.into_iter().find(|c| c.name() == name)
    }
}

fn names(cs: &[Controller]) -> String {
    let v: Vec<&str> = cs.iter().map(|c| c.name()).collect();
    v.join(",")
}

/// The cgroup version in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// One hierarchy per controller (or per group of co-mounted controllers).
    V1,
    /// The unified hierarchy.
    V2,
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Version::V1 => "v1",
            Version::V2 => "v2",
        })
    }
}

/// A mounted v1 hierarchy and the controllers of ours it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    /// Its mount point.
    pub path: PathBuf,
    /// Its controllers among [`Controller::ALL`] (`cpu,cpuacct` are often co-mounted).
    pub controllers: Vec<Controller>,
    /// Mounted read-only.
    pub read_only: bool,
}

/// The cgroup mounts of this machine, from `/proc/self/mountinfo`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mounts {
    /// The first cgroup2 mount, and whether it is read-only.
    pub v2: Option<(PathBuf, bool)>,
    /// The v1 hierarchies that carry one of our controllers, each once.
    pub v1: Vec<Hierarchy>,
}

impl Mounts {
    /// Reads `/proc/self/mountinfo`.
    pub fn read() -> io::Result<Mounts> {
        Ok(Mounts::parse(&std::fs::read_to_string(
            "/proc/self/mountinfo",
        )?))
    }

    /// Parses the text of a `mountinfo` file (proc(5)): `id parent dev root mountpoint
    /// options [optional fields] - fstype source super-options`.
    pub fn parse(mountinfo: &str) -> Mounts {
        let mut m = Mounts::default();
        for line in mountinfo.lines() {
            let Some((head, tail)) = line.split_once(" - ") else {
                continue;
            };
            let head: Vec<&str> = head.split(' ').collect();
            let tail: Vec<&str> = tail.split(' ').collect();
            let (Some(mount_point), Some(options), Some(fstype)) =
                (head.get(4), head.get(5), tail.first())
            else {
                continue;
            };
            let path = PathBuf::from(unescape(mount_point));
            let read_only = options.split(',').any(|o| o == "ro");
            match *fstype {
                "cgroup2" if m.v2.is_none() => m.v2 = Some((path, read_only)),
                "cgroup" => {
                    let supers = tail.get(2).copied().unwrap_or("");
                    let mut controllers: Vec<Controller> =
                        supers.split(',').filter_map(Controller::of).collect();
                    // A controller already seen (a bind mount of the same hierarchy) is
                    // used through its first mount only.
                    controllers.retain(|c| !m.v1.iter().any(|h| h.controllers.contains(c)));
                    if !controllers.is_empty() {
                        controllers.sort();
                        m.v1.push(Hierarchy {
                            path,
                            controllers,
                            read_only,
                        });
                    }
                }
                _ => {}
            }
        }
        m
    }
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The v1 controllers the kernel has in use, from the text of `/proc/self/cgroup`
/// (`4:memory:/path`; `0::/path` is the v2 line), or `None` when it shows none.
fn v1_controllers_in_use(proc_self_cgroup: &str) -> Option<BTreeSet<Controller>> {
    let set: BTreeSet<Controller> = proc_self_cgroup
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .flat_map(|cs| cs.split(','))
        .filter_map(Controller::of)
        .collect();
    (!set.is_empty()).then_some(set)
}

/// Where the cgroups go, given explicitly (tests point it at a folder tree that mimics
/// cgroupfs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupRoot {
    /// A cgroup2 mount point.
    V2(PathBuf),
    /// v1 hierarchies.
    V1(Vec<Hierarchy>),
}

/// Why a cgroup parent is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParentError {
    /// Empty, too long, absolute, or with an empty, `.` or `..` component or a bad name.
    #[error("cgroup parent {parent:?}: {reason}")]
    Invalid {
        parent: String,
        reason: &'static str,
    },
}

/// Checks a cgroup parent: a relative path under the hierarchy root, of one or more
/// names (`ops-updater`, `system.slice/agents`) that follow the rules of agent names.
pub fn validate_parent(parent: &str) -> Result<(), ParentError> {
    let bad = |reason| ParentError::Invalid {
        parent: proto::clean_text(parent, 64),
        reason,
    };
    if parent.is_empty() {
        return Err(bad("empty"));
    }
    if parent.len() > MAX_PARENT_LEN {
        return Err(bad("too long"));
    }
    if parent.starts_with('/') {
        return Err(bad("must be relative to the hierarchy root (no leading /)"));
    }
    for part in parent.split('/') {
        if part == ".." {
            return Err(bad("must not contain .."));
        }
        if part.is_empty() || part == "." {
            return Err(bad("has an empty or . component"));
        }
        if proto::validate_agent_name(part).is_err() {
            return Err(bad(
                "components must be letters, digits, '.', '_', '-', not starting with '.'",
            ));
        }
    }
    Ok(())
}

#[derive(Debug, Clone)]
enum Mode {
    /// No cgroup can be used; why.
    None(String),
    /// The unified hierarchy at `root`, with those of our controllers it offers.
    V2 {
        root: PathBuf,
        available: Vec<Controller>,
    },
    /// The usable v1 hierarchies; `dropped` says why others could not be used.
    V1 {
        hierarchies: Vec<Hierarchy>,
        dropped: Vec<String>,
    },
}

/// The cgroup hierarchies of this machine as ops-updater uses them, found once at start.
#[derive(Debug, Clone)]
pub struct Cgroups {
    parent: String,
    mode: Mode,
}

impl Cgroups {
    /// Finds the hierarchies (`/proc/self/mountinfo`, `/proc/self/cgroup`) and picks one
    /// version: v2 when its root offers the `cpu` and `memory` controllers; else the v1
    /// hierarchies that can be written; else v2 without those controllers (tracking, kill
    /// and the empty notification work, limits are not enforced); else none. Creates
    /// `parent` in what it picks. Never fails: what cannot be used says why
    /// ([`Cgroups::unusable`]).
    pub fn detect(parent: &str) -> Cgroups {
        if let Err(e) = validate_parent(parent) {
            return Cgroups::none(parent, e.to_string());
        }
        let mut mounts = match Mounts::read() {
            Ok(m) => m,
            Err(e) => {
                return Cgroups::none(parent, format!("cannot read /proc/self/mountinfo: {e}"))
            }
        };
        // A v1 hierarchy whose controller the kernel does not use for us (mounted but
        // disabled, say with cgroup_disable=) is left out.
        if let Some(in_use) = std::fs::read_to_string("/proc/self/cgroup")
            .ok()
            .and_then(|s| v1_controllers_in_use(&s))
        {
            for h in &mut mounts.v1 {
                h.controllers.retain(|c| in_use.contains(c));
            }
            mounts.v1.retain(|h| !h.controllers.is_empty());
        }
        Cgroups::choose(&mounts, parent)
    }

    /// [`Cgroups::detect`]'s choice among `mounts`. Only what is picked keeps a `parent`
    /// folder: v2 is looked at without writing, and v1 folders made to try the
    /// hierarchies are removed again (when empty) if v1 is not picked.
    pub fn choose(mounts: &Mounts, parent: &str) -> Cgroups {
        if let Err(e) = validate_parent(parent) {
            return Cgroups::none(parent, e.to_string());
        }
        let mut why = Vec::new();
        let mut v2_bare = None;
        if let Some((path, read_only)) = &mounts.v2 {
            match v2_offers(path) {
                _ if *read_only => why.push(format!("read-only hierarchy {}", path.display())),
                Ok(available)
                    if available.contains(&Controller::Cpu)
                        && available.contains(&Controller::Memory) =>
                {
                    return Cgroups::at(CgroupRoot::V2(path.clone()), parent);
                }
                Ok(available) => {
                    why.push(format!(
                        "cgroup v2 at {} offers {}",
                        path.display(),
                        if available.is_empty() {
                            "no cpu or memory controller".to_string()
                        } else {
                            format!("only {}", names(&available))
                        }
                    ));
                    v2_bare = Some(path.clone());
                }
                Err(reason) => why.push(reason),
            }
        }
        if !mounts.v1.is_empty() {
            let cg = Cgroups::at(CgroupRoot::V1(mounts.v1.clone()), parent);
            match &cg.mode {
                Mode::V1 { hierarchies, .. }
                    if hierarchies.iter().any(|h| {
                        h.controllers.contains(&Controller::Cpu)
                            || h.controllers.contains(&Controller::Memory)
                    }) =>
                {
                    return cg
                }
                Mode::V1 {
                    hierarchies,
                    dropped,
                } => {
                    why.push("no writable cgroup v1 cpu or memory hierarchy".to_string());
                    why.extend(dropped.iter().cloned());
                    for h in hierarchies {
                        let _ = std::fs::remove_dir(h.path.join(parent));
                    }
                }
                Mode::None(reason) => why.push(reason.clone()),
                Mode::V2 { .. } => unreachable!("v1 roots give a v1 mode"),
            }
        }
        if let Some(path) = v2_bare {
            let cg = Cgroups::at(CgroupRoot::V2(path), parent);
            match cg.unusable() {
                None => return cg,
                Some(reason) => why.push(reason.to_string()),
            }
        }
        if why.is_empty() {
            why.push("no cgroup hierarchy mounted".to_string());
        }
        Cgroups::none(parent, why.join("; "))
    }

    /// Cgroups at explicit roots, checked as [`Cgroups::detect`] checks what it found:
    /// `parent` is created in each; a v1 hierarchy where that fails is left out.
    pub fn at(root: CgroupRoot, parent: &str) -> Cgroups {
        if let Err(e) = validate_parent(parent) {
            return Cgroups::none(parent, e.to_string());
        }
        match root {
            CgroupRoot::V2(root) => {
                let available = match v2_offers(&root) {
                    Ok(a) => a,
                    Err(reason) => return Cgroups::none(parent, reason),
                };
                if let Err(reason) = make_dir(&root.join(parent)) {
                    return Cgroups::none(parent, reason);
                }
                Cgroups {
                    parent: parent.to_string(),
                    mode: Mode::V2 { root, available },
                }
            }
            CgroupRoot::V1(all) => {
                let mut hierarchies = Vec::new();
                let mut dropped = Vec::new();
                for h in all {
                    if h.read_only {
                        dropped.push(format!("read-only hierarchy {}", h.path.display()));
                        continue;
                    }
                    match make_dir(&h.path.join(parent)) {
                        Ok(()) => hierarchies.push(h),
                        Err(reason) => dropped.push(reason),
                    }
                }
                if hierarchies.is_empty() {
                    let why = if dropped.is_empty() {
                        "no cgroup v1 hierarchy".to_string()
                    } else {
                        dropped.join("; ")
                    };
                    return Cgroups::none(parent, why);
                }
                Cgroups {
                    parent: parent.to_string(),
                    mode: Mode::V1 {
                        hierarchies,
                        dropped,
                    },
                }
            }
        }
    }

    /// No cgroups: every handle tracks nothing and says `reason`.
    pub fn none(parent: &str, reason: impl Into<String>) -> Cgroups {
        Cgroups {
            parent: parent.to_string(),
            mode: Mode::None(reason.into()),
        }
    }

    /// The version in use; `None` when no cgroup can be used.
    pub fn version(&self) -> Option<Version> {
        match self.mode {
            Mode::None(_) => None,
            Mode::V1 { .. } => Some(Version::V1),
            Mode::V2 { .. } => Some(Version::V2),
        }
    }

    /// Why no cgroup can be used (`not root`, `read-only hierarchy …`), when so.
    pub fn unusable(&self) -> Option<&str> {
        match &self.mode {
            Mode::None(reason) => Some(reason),
            _ => None,
        }
    }

    /// The `parent` folder in every hierarchy used (where the agents' cgroups go).
    pub fn parent_dirs(&self) -> Vec<PathBuf> {
        match &self.mode {
            Mode::None(_) => Vec::new(),
            Mode::V2 { root, .. } => vec![root.join(&self.parent)],
            Mode::V1 { hierarchies, .. } => hierarchies
                .iter()
                .map(|h| h.path.join(&self.parent))
                .collect(),
        }
    }

    /// For the start-up log: `cgroup v1: cpu at /sys/fs/cgroup/cpu, memory at …, parent
    /// ops-updater`, `cgroup v2 (cpu,memory,pids) at /sys/fs/cgroup, parent ops-updater`,
    /// or `no cgroup: <why>`.
    pub fn describe(&self) -> String {
        match &self.mode {
            Mode::None(reason) => format!("no cgroup: {reason}"),
            Mode::V2 { root, available } => format!(
                "cgroup v2 ({}) at {}, parent {}",
                if available.is_empty() {
                    "no controllers".to_string()
                } else {
                    names(available)
                },
                root.display(),
                self.parent
            ),
            Mode::V1 {
                hierarchies,
                dropped,
            } => {
                let hs: Vec<String> = hierarchies
                    .iter()
                    .map(|h| format!("{} at {}", names(&h.controllers), h.path.display()))
                    .collect();
                let mut s = format!("cgroup v1: {}, parent {}", hs.join(", "), self.parent);
                if !dropped.is_empty() {
                    s.push_str(&format!(" (not used: {})", dropped.join("; ")));
                }
                s
            }
        }
    }

    /// The cgroup of `agent`: `<parent>/<agent>` created (idempotently) in every
    /// hierarchy used, `limits` written (an unset limit is written as "no limit", so a
    /// limit removed by a later job goes away). On v2 the controllers are first enabled
    /// along `cgroup.subtree_control` from the root down to `parent`. Never fails: what
    /// could not be applied is in [`AgentCgroup::not_enforced`]; a handle that tracks
    /// nothing ([`AgentCgroup::is_tracked`]) is returned when no cgroup can be made.
    pub fn agent(&self, agent: &AgentName, limits: &Limits) -> AgentCgroup {
        let agent = agent.as_str();
        match &self.mode {
            Mode::None(reason) => AgentCgroup::untracked(agent, limits, reason.clone()),
            Mode::V2 { root, available } => self.agent_v2(agent, limits, root, available),
            Mode::V1 { hierarchies, .. } => self.agent_v1(agent, limits, hierarchies),
        }
    }

    fn agent_v2(
        &self,
        agent: &str,
        limits: &Limits,
        root: &Path,
        available: &[Controller],
    ) -> AgentCgroup {
        let mut problems = Vec::new();
        let enabled = enable_chain(root, &self.parent, available, &mut problems);
        let path = root.join(&self.parent).join(agent);
        if let Err(reason) = make_dir(&path) {
            return AgentCgroup::untracked(agent, limits, reason);
        }
        let missing = |c: Controller| match available.contains(&c) {
            true => format!("{} controller not enabled for {}", c.name(), path.display()),
            false => format!(
                "cgroup v2 at {} has no {} controller",
                root.display(),
                c.name()
            ),
        };
        if enabled.contains(&Controller::Cpu) {
            let max = match limits.cpu_percent {
                Some(c) => {
                    let (quota, period) = cpu_quota(c);
                    format!("{quota} {period}")
                }
                None => format!("max {CPU_PERIOD_US}"),
            };
            problems.extend(write_value(&path.join("cpu.max"), &max).err());
        } else if limits.cpu_percent.is_some() {
            problems.push(missing(Controller::Cpu));
        }
        if enabled.contains(&Controller::Memory) {
            let max = limits
                .memory_bytes
                .map_or("max".to_string(), |b| b.to_string());
            problems.extend(write_value(&path.join("memory.max"), &max).err());
            // Without this, a limited agent would page out to swap instead of being
            // stopped at its limit, as on v1 with `memory.memsw.limit_in_bytes`.
            let swap = path.join("memory.swap.max");
            if swap.exists() {
                let v = if limits.memory_bytes.is_some() {
                    "0"
                } else {
                    "max"
                };
                problems.extend(write_value(&swap, v).err());
            }
        } else if limits.memory_bytes.is_some() {
            problems.push(missing(Controller::Memory));
        }
        AgentCgroup {
            agent: agent.to_string(),
            version: Some(Version::V2),
            dirs: vec![Dir {
                path,
                controllers: enabled,
            }],
            untracked: None,
            not_enforced: not_enforced(limits, problems),
        }
    }

    fn agent_v1(&self, agent: &str, limits: &Limits, hierarchies: &[Hierarchy]) -> AgentCgroup {
        let mut problems = Vec::new();
        let mut dirs = Vec::new();
        for h in hierarchies {
            let path = h.path.join(&self.parent).join(agent);
            match make_dir(&path) {
                Ok(()) => dirs.push(Dir {
                    path,
                    controllers: h.controllers.clone(),
                }),
                Err(reason) => problems.push(reason),
            }
        }
        if dirs.is_empty() {
            return AgentCgroup::untracked(agent, limits, problems.join("; "));
        }
        let with = |c: Controller| dirs.iter().find(|d| d.controllers.contains(&c));
        match with(Controller::Cpu) {
            Some(d) => problems.extend(apply_v1_cpu(&d.path, limits.cpu_percent)),
            None if limits.cpu_percent.is_some() => {
                problems.push("no cgroup v1 cpu controller".to_string())
            }
            None => {}
        }
        match with(Controller::Memory) {
            Some(d) => problems.extend(apply_v1_memory(&d.path, limits.memory_bytes)),
            None if limits.memory_bytes.is_some() => {
                problems.push("no cgroup v1 memory controller".to_string())
            }
            None => {}
        }
        AgentCgroup {
            agent: agent.to_string(),
            version: Some(Version::V1),
            dirs,
            untracked: None,
            not_enforced: not_enforced(limits, problems),
        }
    }
}

/// The handle's `not_enforced` text. With no limit asked for, nothing can fail to be
/// enforced: a hierarchy that could not be used or a limit that could not be lifted is then
/// not reported (the agent is still tracked through what worked).
fn not_enforced(limits: &Limits, problems: Vec<String>) -> Option<String> {
    (!limits.is_empty() && !problems.is_empty())
        .then(|| format!("limits not enforced: {}", problems.join("; ")))
}

/// Those of our controllers that the cgroup2 root `root` offers (`cgroup.controllers`).
fn v2_offers(root: &Path) -> Result<Vec<Controller>, String> {
    let file = root.join("cgroup.controllers");
    let offered = std::fs::read_to_string(&file)
        .map_err(|e| format!("not a cgroup v2 root: {}: {e}", file.display()))?;
    Ok([Controller::Cpu, Controller::Memory, Controller::Pids]
        .into_iter()
        .filter(|c| offered.split_whitespace().any(|w| w == c.name()))
        .collect())
}

/// CFS quota and period, in microseconds, for a limit in hundredths of a percent.
fn cpu_quota(hundredths: u32) -> (u64, u64) {
    let full = 100 * u64::from(CPU_SCALE);
    let quota = CPU_PERIOD_US * u64::from(hundredths) / full;
    if quota >= MIN_CPU_QUOTA_US {
        return (quota, CPU_PERIOD_US);
    }
    let quota = LONG_CPU_PERIOD_US * u64::from(hundredths) / full;
    (quota.max(MIN_CPU_QUOTA_US), LONG_CPU_PERIOD_US)
}

/// Enables `wanted` in `cgroup.subtree_control` of the root and of every folder down to
/// `parent`; returns those enabled all the way (what the agent cgroup gets).
fn enable_chain(
    root: &Path,
    parent: &str,
    wanted: &[Controller],
    problems: &mut Vec<String>,
) -> Vec<Controller> {
    let mut have: Vec<Controller> = wanted.to_vec();
    let mut level = root.to_path_buf();
    let mut levels = vec![level.clone()];
    for part in parent.split('/') {
        level.push(part);
        levels.push(level.clone());
    }
    for level in levels {
        if have.is_empty() {
            break;
        }
        let file = level.join("cgroup.subtree_control");
        let current = match std::fs::read_to_string(&file) {
            Ok(s) => s,
            Err(e) => {
                problems.push(format!("reading {}: {e}", file.display()));
                return Vec::new();
            }
        };
        let on = |c: &Controller| {
            current
                .split_whitespace()
                .any(|w| w.trim_start_matches('+') == c.name())
        };
        let missing: Vec<Controller> = have.iter().copied().filter(|c| !on(c)).collect();
        if missing.is_empty() {
            continue;
        }
        let all: Vec<String> = missing.iter().map(|c| format!("+{}", c.name())).collect();
        if write_value(&file, &all.join(" ")).is_ok() {
            continue;
        }
        // One at a time, so that one refused controller does not cost the others.
        for c in missing {
            if let Err(e) = write_value(&file, &format!("+{}", c.name())) {
                problems.push(e);
                have.retain(|h| *h != c);
            }
        }
    }
    have
}

fn apply_v1_cpu(dir: &Path, limit: Option<u32>) -> Vec<String> {
    let mut problems = Vec::new();
    let quota_file = dir.join("cpu.cfs_quota_us");
    let period_file = dir.join("cpu.cfs_period_us");
    // The quota is lifted first: a new period is checked against the quota in force.
    if let Err(e) = write_value(&quota_file, "-1") {
        problems.push(e);
        return problems;
    }
    let (quota, period) = match limit {
        Some(c) => {
            let (q, p) = cpu_quota(c);
            (q.to_string(), p)
        }
        None => ("-1".to_string(), CPU_PERIOD_US),
    };
    problems.extend(write_value(&period_file, &period.to_string()).err());
    if limit.is_some() && problems.is_empty() {
        problems.extend(write_value(&quota_file, &quota).err());
    }
    problems
}

fn apply_v1_memory(dir: &Path, limit: Option<u64>) -> Vec<String> {
    let mem = dir.join("memory.limit_in_bytes");
    let memsw = dir.join("memory.memsw.limit_in_bytes");
    let value = limit.map_or("-1".to_string(), |b| b.to_string());
    if !memsw.exists() {
        return write_value(&mem, &value).err().into_iter().collect();
    }
    // The kernel keeps memory.limit_in_bytes <= memory.memsw.limit_in_bytes at every
    // step: raising both starts with memsw, lowering both with the memory limit. Both the
    // same means no swap, as `memory.swap.max = 0` on v2.
    let current = read_trimmed(&mem)
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(u64::MAX);
    let order = if limit.unwrap_or(u64::MAX) > current {
        [&memsw, &mem]
    } else {
        [&mem, &memsw]
    };
    let mut problems = Vec::new();
    for file in order {
        if let Err(e) = write_value(file, &value) {
            problems.push(e);
            break;
        }
    }
    problems
}

/// Creates `dir` and its parents; the reason in words when that fails.
fn make_dir(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| {
        let what = match e.raw_os_error() {
            Some(libc::EACCES | libc::EPERM) if !nix::unistd::geteuid().is_root() => "not root: ",
            Some(libc::EROFS) => "read-only hierarchy: ",
            _ => "",
        };
        format!("{what}creating {}: {e}", dir.display())
    })
}

/// Writes `value` into an existing cgroup file (never creates one: a missing file is a
/// missing controller).
fn write_value(file: &Path, value: &str) -> Result<(), String> {
    OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(file)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .map_err(|e| format!("writing {value:?} to {}: {e}", file.display()))
}

fn read_trimmed(file: &Path) -> io::Result<String> {
    Ok(std::fs::read_to_string(file)?.trim().to_string())
}

/// The value of `key` in a flat-keyed file (`populated 1`, `oom_kill 3`).
fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

#[derive(Debug, Clone)]
struct Dir {
    path: PathBuf,
    controllers: Vec<Controller>,
}

/// One agent's cgroup: a folder per hierarchy used (v1), or one (v2). Tracks nothing
/// when no cgroup could be made (then every process query fails with `Unsupported`, and
/// [`AgentCgroup::attach`] leaves the command alone).
#[derive(Debug, Clone)]
pub struct AgentCgroup {
    agent: String,
    version: Option<Version>,
    dirs: Vec<Dir>,
    /// Why this handle tracks nothing.
    untracked: Option<String>,
    not_enforced: Option<String>,
}

impl AgentCgroup {
    fn untracked(agent: &str, limits: &Limits, reason: String) -> AgentCgroup {
        AgentCgroup {
            agent: agent.to_string(),
            version: None,
            dirs: Vec::new(),
            not_enforced: (!limits.is_empty())
                .then(|| format!("limits not enforced: no cgroup: {reason}")),
            untracked: Some(reason),
        }
    }

    /// `limits not enforced: <reason>` when a limit asked for is not in force (no cgroup,
    /// controller missing, write refused with its errno); `None` when every limit asked
    /// for was written, or none was asked for.
    pub fn not_enforced(&self) -> Option<&str> {
        self.not_enforced.as_deref()
    }

    /// True when the agent's processes are tracked in a cgroup.
    pub fn is_tracked(&self) -> bool {
        !self.dirs.is_empty()
    }

    /// The cgroup version of this handle; `None` when it tracks nothing.
    pub fn version(&self) -> Option<Version> {
        self.version
    }

    /// The agent's cgroup folder in every hierarchy used.
    pub fn paths(&self) -> Vec<&Path> {
        self.dirs.iter().map(|d| d.path.as_path()).collect()
    }

    /// For logs and status: `cgroup v1 cpu,memory /sys/fs/cgroup/memory/ops-updater/falcon`,
    /// `cgroup v2 (no controllers) /sys/fs/cgroup/unified/ops-updater/falcon`, or
    /// `no cgroup: <why>`.
    pub fn describe(&self) -> String {
        let Some(primary) = self.primary() else {
            return format!(
                "no cgroup: {}",
                self.untracked.as_deref().unwrap_or("unknown")
            );
        };
        let mut all: Vec<Controller> = self
            .dirs
            .iter()
            .flat_map(|d| d.controllers.iter().copied())
            .collect();
        all.sort();
        all.dedup();
        let version = self.version.map_or("?".to_string(), |v| v.to_string());
        let controllers = if all.is_empty() {
            "(no controllers)".to_string()
        } else {
            names(&all)
        };
        format!("cgroup {version} {controllers} {}", primary.path.display())
    }

    /// The folder whose `cgroup.procs` stands for the agent: v2's, or v1 memory's, else
    /// cpu's, else pids', else the first.
    fn primary(&self) -> Option<&Dir> {
        [Controller::Memory, Controller::Cpu, Controller::Pids]
            .into_iter()
            .find_map(|c| self.dirs.iter().find(|d| d.controllers.contains(&c)))
            .or(self.dirs.first())
    }

    fn with(&self, c: Controller) -> Option<&Dir> {
        self.dirs.iter().find(|d| d.controllers.contains(&c))
    }

    fn unsupported(&self) -> io::Error {
        io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "agent {:?} has no cgroup: {}",
                self.agent,
                self.untracked.as_deref().unwrap_or("unknown")
            ),
        )
    }

    /// Makes the child of `cmd` join this cgroup before its first instruction, so that
    /// nothing it forks escapes: the `cgroup.procs` file of every hierarchy used is opened
    /// now, and a `pre_exec` hook writes `0` (the writing process) into each between fork
    /// and exec. A failed write fails the spawn with its error. A handle that tracks
    /// nothing leaves `cmd` alone.
    ///
    /// The files stay open in the parent as long as `cmd` holds the hook (in an `Arc`
    /// captured by it): `process::run` drops the command right after the spawn, which
    /// closes them; they are close-on-exec, so the child loses them at exec.
    #[allow(unsafe_code)] // `pre_exec`: see the SAFETY note.
    pub fn attach(&self, cmd: &mut tokio::process::Command) -> io::Result<()> {
        if self.dirs.is_empty() {
            return Ok(());
        }
        let mut fds: Vec<OwnedFd> = Vec::with_capacity(self.dirs.len());
        for d in &self.dirs {
            let file = d.path.join("cgroup.procs");
            let f = OpenOptions::new().write(true).open(&file).map_err(|e| {
                io::Error::new(e.kind(), format!("opening {}: {e}", file.display()))
            })?;
            fds.push(f.into());
        }
        let fds = Arc::new(fds);
        // SAFETY: the hook runs in the forked child, where only async-signal-safe calls
        // are allowed: it makes one write(2) per descriptor and, on failure, builds an
        // io::Error from the errno, which does not allocate. It touches no lock and no
        // memory but the descriptors, which the closure owns.
        unsafe {
            cmd.pre_exec(move || {
                for fd in fds.iter() {
                    nix::unistd::write(fd, b"0").map_err(io::Error::from)?;
                }
                Ok(())
            });
        }
        Ok(())
    }

    /// The processes in the cgroup (from `cgroup.procs` of the primary hierarchy: v2, or
    /// v1 memory, else cpu, else pids), zombies left out: they run no more.
    pub fn procs(&self) -> io::Result<Vec<i32>> {
        let dir = self.primary().ok_or_else(|| self.unsupported())?;
        let file = dir.path.join("cgroup.procs");
        let text = std::fs::read_to_string(&file)
            .map_err(|e| io::Error::new(e.kind(), format!("reading {}: {e}", file.display())))?;
        Ok(text
            .lines()
            .filter_map(|l| l.trim().parse::<i32>().ok())
            .filter(|pid| !crate::process::is_zombie(*pid))
            .collect())
    }

    /// True when some process runs in the cgroup (v2: `cgroup.events`, which counts the
    /// whole subtree; v1: [`AgentCgroup::procs`]).
    pub fn populated(&self) -> io::Result<bool> {
        let dir = self.primary().ok_or_else(|| self.unsupported())?;
        if self.version == Some(Version::V2) {
            let file = dir.path.join("cgroup.events");
            let text = std::fs::read_to_string(&file).map_err(|e| {
                io::Error::new(e.kind(), format!("reading {}: {e}", file.display()))
            })?;
            return Ok(keyed(&text, "populated").unwrap_or(0) != 0);
        }
        Ok(!self.procs()?.is_empty())
    }

    /// Resolves once no process is left in the cgroup (also when the cgroup can no longer
    /// be read, say removed: it then holds nothing). v2 watches `cgroup.events` with
    /// inotify, so an exit is seen at once; v1 reads `cgroup.procs` every [`EMPTY_POLL`].
    /// Cancel-safe: dropping the future drops the watch. Never resolves for a handle that
    /// tracks nothing (the caller learns of exits another way, such as the reaper).
    pub async fn wait_empty(&self) {
        if self.dirs.is_empty() {
            return std::future::pending().await;
        }
        if self.version == Some(Version::V2) {
            if let Some(dir) = self.primary() {
                match EventsWatch::new(&dir.path.join("cgroup.events")) {
                    Ok(mut watch) => loop {
                        // The watch is in place before the check, so no change is missed.
                        if !self.populated().unwrap_or(false) {
                            return;
                        }
                        watch.changed().await;
                    },
                    Err(e) => {
                        tracing::debug!(agent = %self.agent, error = %e, "no inotify watch on cgroup.events; polling");
                    }
                }
            }
        }
        while self.populated().unwrap_or(false) {
            tokio::time::sleep(EMPTY_POLL).await;
        }
    }

    /// How many times the kernel's OOM killer killed a process of this cgroup (v2
    /// `memory.events` `oom_kill`; v1 `memory.oom_control` `oom_kill`, kernel 4.13 and
    /// later, else `memory.failcnt`: how often the limit was hit, which grows with OOM
    /// kills but also when reclaim sufficed). 0 when unknown. Compare the count before
    /// and after an exit to tell an OOM kill.
    pub fn oom_kills(&self) -> u64 {
        let Some(dir) = self.with(Controller::Memory) else {
            return 0;
        };
        let read = |name: &str| std::fs::read_to_string(dir.path.join(name)).ok();
        match self.version {
            Some(Version::V2) => read("memory.events")
                .and_then(|t| keyed(&t, "oom_kill"))
                .unwrap_or(0),
            _ => read("memory.oom_control")
                .and_then(|t| keyed(&t, "oom_kill"))
                .or_else(|| read("memory.failcnt").and_then(|t| t.trim().parse().ok()))
                .unwrap_or(0),
        }
    }

    /// CPU time used by the cgroup so far (v2 `cpu.stat` `usage_usec`, present without
    /// the cpu controller too; v1 `cpuacct.usage`); `None` when unknown.
    pub fn cpu_usage(&self) -> Option<Duration> {
        match self.version? {
            Version::V2 => {
                let text = std::fs::read_to_string(self.primary()?.path.join("cpu.stat")).ok()?;
                keyed(&text, "usage_usec").map(Duration::from_micros)
            }
            Version::V1 => {
                let dir = self.with(Controller::Cpuacct)?;
                let ns = read_trimmed(&dir.path.join("cpuacct.usage")).ok()?;
                ns.parse().ok().map(Duration::from_nanos)
            }
        }
    }

    /// Stops everything in the cgroup: SIGTERM to every process (again to any that
    /// appears while waiting, since processes may fork while being killed), up to `grace`
    /// for the cgroup to empty, then SIGKILL (v2: `cgroup.kill` when the kernel has it,
    /// which also catches forks in flight), and up to [`KILL_WAIT`] for it to empty.
    /// Returns the pids still there after that; empty means nothing runs in it.
    ///
    /// Pids come from `cgroup.procs`; one that exits and is reused between the read and
    /// the signal would be signalled wrongly, a window of microseconds that the kernel's
    /// pid allocation (which does not reuse at once) makes very unlikely.
    pub async fn kill_all(&self, grace: Duration) -> Vec<i32> {
        if self.dirs.is_empty() {
            return Vec::new();
        }
        let deadline = tokio::time::Instant::now() + grace;
        let mut termed = BTreeSet::new();
        loop {
            let procs = self.procs().unwrap_or_default();
            if procs.is_empty() {
                return Vec::new();
            }
            for pid in procs {
                if termed.insert(pid) {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
                }
            }
            if tokio::time::Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(KILL_POLL).await;
        }
        let cgroup_kill = match (self.version, self.primary()) {
            (Some(Version::V2), Some(d)) => Some(d.path.join("cgroup.kill")).filter(|p| p.exists()),
            _ => None,
        };
        let deadline = tokio::time::Instant::now() + KILL_WAIT;
        loop {
            let procs = self.procs().unwrap_or_default();
            if procs.is_empty() {
                return Vec::new();
            }
            let killed_all = cgroup_kill
                .as_ref()
                .is_some_and(|file| write_value(file, "1").is_ok());
            if !killed_all {
                for pid in &procs {
                    let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return procs;
            }
            tokio::time::sleep(KILL_POLL).await;
        }
    }

    /// Removes the cgroup folder in every hierarchy (the kernel refuses while a process
    /// is in it: `EBUSY`). A folder already gone is fine.
    pub fn remove(&self) -> io::Result<()> {
        for d in &self.dirs {
            match std::fs::remove_dir(&d.path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("removing {}: {e}", d.path.display()),
                    ))
                }
            }
        }
        Ok(())
    }
}

/// An inotify watch on one `cgroup.events` file, readable through tokio.
struct EventsWatch {
    fd: tokio::io::unix::AsyncFd<InotifyFd>,
}

struct InotifyFd(nix::sys::inotify::Inotify);

impl std::os::fd::AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsFd;
        self.0.as_fd().as_raw_fd()
    }
}

impl EventsWatch {
    fn new(file: &Path) -> io::Result<EventsWatch> {
        use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
        let ino = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        // The kernel signals a change of `populated` (and `frozen`) as a modification.
        ino.add_watch(file, AddWatchFlags::IN_MODIFY)?;
        // SAFETY: `InotifyFd` owns the descriptor (an `OwnedFd` inside nix's `Inotify`),
        // keeps it open until it is dropped with the `AsyncFd`, and always returns it.
        #[allow(unsafe_code)]
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(
                InotifyFd(ino),
                tokio::io::Interest::READABLE,
            )
        }?;
        Ok(EventsWatch { fd })
    }

    /// Waits for the next change notice and drains every queued event. When the watch
    /// breaks (it never should), waits [`EMPTY_POLL`] instead, which turns the caller's
    /// loop into polling.
    async fn changed(&mut self) {
        match self.fd.readable().await {
            Ok(mut guard) => {
                while guard.get_inner().0.read_events().is_ok() {}
                guard.clear_ready();
            }
            Err(_) => tokio::time::sleep(EMPTY_POLL).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn falcon() -> AgentName {
        AgentName::parse("falcon").unwrap()
    }

    /// This machine's mountinfo when this was written: cgroup v1 with `cpu` and `cpuacct`
    /// mounted apart, and a cgroup2 mount without controllers.
    const HYBRID: &str = "\
22 27 0:21 / /proc rw,relatime - proc proc rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    /// A systemd host of the v1 era: `cpu,cpuacct` co-mounted, a bind mount of the same
    /// hierarchy, and optional fields before the separator.
    const COMOUNTED: &str = "\
25 18 0:21 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:8 - tmpfs tmpfs ro,mode=755
30 25 0:26 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:12 - cgroup cgroup rw,cpu,cpuacct
31 25 0:27 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:13 - cgroup cgroup rw,memory
32 25 0:28 / /sys/fs/cgroup/pids ro,nosuid,nodev,noexec,relatime shared:14 - cgroup cgroup rw,pids
90 60 0:26 / /mnt/my\\040cpu rw,relatime shared:12 - cgroup cgroup rw,cpu,cpuacct
";

    const PURE_V2: &str = "\
26 21 0:23 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";

    fn h(path: &str, cs: &[Controller], ro: bool) -> Hierarchy {
        Hierarchy {
            path: PathBuf::from(path),
            controllers: cs.to_vec(),
            read_only: ro,
        }
    }

    #[test]
    fn mountinfo_is_read() {
        use Controller::*;
        let cases = [
            (
                HYBRID,
                Mounts {
                    v2: Some((PathBuf::from("/sys/fs/cgroup/unified"), false)),
                    v1: vec![
                        h("/sys/fs/cgroup/cpu", &[Cpu], false),
                        h("/sys/fs/cgroup/cpuacct", &[Cpuacct], false),
                        h("/sys/fs/cgroup/memory", &[Memory], false),
                        h("/sys/fs/cgroup/pids", &[Pids], false),
                    ],
                },
            ),
            (
                COMOUNTED,
                Mounts {
                    v2: None,
                    v1: vec![
                        h("/sys/fs/cgroup/cpu,cpuacct", &[Cpu, Cpuacct], false),
                        h("/sys/fs/cgroup/memory", &[Memory], false),
                        h("/sys/fs/cgroup/pids", &[Pids], true),
                    ],
                },
            ),
            (
                PURE_V2,
                Mounts {
                    v2: Some((PathBuf::from("/sys/fs/cgroup"), false)),
                    v1: vec![],
                },
            ),
            ("", Mounts::default()),
            ("garbage\n1 2 3 - cgroup\n", Mounts::default()),
        ];
        for (text, want) in cases {
            assert_eq!(Mounts::parse(text), want, "{text}");
        }
        assert_eq!(unescape("/mnt/my\\040cpu"), "/mnt/my cpu");
        assert_eq!(unescape("/a\\b\\04"), "/a\\b\\04");
    }

    #[test]
    fn proc_self_cgroup_names_the_v1_controllers_in_use() {
        use Controller::*;
        let text = "9:name=systemd:/\n4:memory:/x\n2:cpu,cpuacct:/\n0::/\n";
        assert_eq!(
            v1_controllers_in_use(text),
            Some([Cpu, Cpuacct, Memory].into_iter().collect())
        );
        assert_eq!(v1_controllers_in_use("0::/user.slice\n"), None);
    }

    #[test]
    fn parents() {
        let cases = [
            ("ops-updater", true),
            ("system.slice/agents", true),
            ("a/b/c", true),
            ("", false),
            ("/ops-updater", false),
            ("../x", false),
            ("a/../b", false),
            ("a//b", false),
            ("a/./b", false),
            ("a/", false),
            (".hidden", false),
            ("a b", false),
        ];
        for (p, ok) in cases {
            assert_eq!(
                validate_parent(p).is_ok(),
                ok,
                "{p:?}: {:?}",
                validate_parent(p)
            );
        }
        let e = validate_parent("../x").unwrap_err().to_string();
        assert_eq!(e, r#"cgroup parent "../x": must not contain .."#);
        assert!(Cgroups::detect("/abs")
            .unusable()
            .unwrap()
            .contains("no leading /"));
    }

    #[test]
    fn cpu_quotas() {
        let cases = [
            (1000, (10_000, 100_000)),
            (250, (2_500, 100_000)),
            (15000, (150_000, 100_000)),
            (10000, (100_000, 100_000)),
            (100, (1_000, 100_000)),
            (99, (9_900, 1_000_000)),
            (10, (1_000, 1_000_000)),
            (1_000_000, (10_000_000, 100_000)),
        ];
        for (hundredths, want) in cases {
            assert_eq!(cpu_quota(hundredths), want, "{hundredths}");
        }
    }

    fn limits(cpu: Option<u32>, mem: Option<u64>) -> Limits {
        Limits {
            cpu_percent: cpu,
            memory_bytes: mem,
        }
    }

    fn touch(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    fn read(path: &Path) -> String {
        std::fs::read_to_string(path).unwrap()
    }

    /// A folder tree that mimics a cgroup2 root with the cpu, memory and pids
    /// controllers, and the files the kernel would create in the agent's folder.
    fn v2_tree(controllers: &str, agent_files: &[&str]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        touch(&d.path().join("cgroup.controllers"), controllers);
        touch(&d.path().join("cgroup.subtree_control"), "");
        touch(&d.path().join("ops-updater/cgroup.subtree_control"), "");
        for f in agent_files {
            touch(&d.path().join("ops-updater/falcon").join(f), "");
        }
        d
    }

    #[test]
    fn v2_limits_are_written_and_controllers_enabled_down_the_chain() {
        let d = v2_tree(
            "cpuset cpu io memory hugetlb pids\n",
            &["cgroup.procs", "cpu.max", "memory.max", "memory.swap.max"],
        );
        let cg = Cgroups::at(CgroupRoot::V2(d.path().into()), DEFAULT_PARENT);
        assert_eq!(cg.version(), Some(Version::V2));
        assert!(
            cg.describe().contains("cgroup v2 (cpu,memory,pids)"),
            "{}",
            cg.describe()
        );
        let a = cg.agent(&falcon(), &limits(Some(1000), Some(20 << 20)));
        assert_eq!(a.not_enforced(), None);
        let agent = d.path().join("ops-updater/falcon");
        assert_eq!(read(&agent.join("cpu.max")), "10000 100000");
        assert_eq!(read(&agent.join("memory.max")), "20971520");
        assert_eq!(read(&agent.join("memory.swap.max")), "0");
        assert_eq!(
            read(&d.path().join("cgroup.subtree_control")),
            "+cpu +memory +pids"
        );
        assert_eq!(
            read(&d.path().join("ops-updater/cgroup.subtree_control")),
            "+cpu +memory +pids"
        );
        assert_eq!(
            a.describe(),
            format!("cgroup v2 cpu,memory,pids {}", agent.display())
        );

        // A later job without limits lifts them.
        let a = cg.agent(&falcon(), &Limits::default());
        assert_eq!(a.not_enforced(), None);
        assert_eq!(read(&agent.join("cpu.max")), "max 100000");
        assert_eq!(read(&agent.join("memory.max")), "max");
        assert_eq!(read(&agent.join("memory.swap.max")), "max");

        // Already enabled: nothing is written to subtree_control again.
        std::fs::write(d.path().join("cgroup.subtree_control"), "cpu memory pids").unwrap();
        std::fs::write(
            d.path().join("ops-updater/cgroup.subtree_control"),
            "cpu memory pids",
        )
        .unwrap();
        let a = cg.agent(&falcon(), &limits(Some(250), None));
        assert_eq!(a.not_enforced(), None);
        assert_eq!(
            read(&d.path().join("cgroup.subtree_control")),
            "cpu memory pids"
        );
        assert_eq!(read(&agent.join("cpu.max")), "2500 100000");
    }

    #[test]
    fn v2_without_controllers_tracks_but_says_why_limits_are_not_enforced() {
        let d = v2_tree("hugetlb\n", &["cgroup.procs"]);
        let cg = Cgroups::at(CgroupRoot::V2(d.path().into()), DEFAULT_PARENT);
        let a = cg.agent(&falcon(), &limits(Some(1000), Some(20 << 20)));
        assert!(a.is_tracked());
        let why = a.not_enforced().unwrap();
        assert!(
            why.starts_with("limits not enforced: cgroup v2 at ")
                && why.contains("has no cpu controller")
                && why.contains("has no memory controller"),
            "{why}"
        );
        assert!(
            a.describe().starts_with("cgroup v2 (no controllers) "),
            "{}",
            a.describe()
        );
        // Without limits asked for, nothing is missing.
        assert_eq!(cg.agent(&falcon(), &Limits::default()).not_enforced(), None);
    }

    #[test]
    fn a_missing_limit_file_is_reported_with_the_error() {
        // The controllers are offered but the kernel made no memory files (or refused).
        let d = v2_tree("cpu memory\n", &["cgroup.procs", "cpu.max"]);
        let cg = Cgroups::at(CgroupRoot::V2(d.path().into()), DEFAULT_PARENT);
        let a = cg.agent(&falcon(), &limits(Some(1000), Some(20 << 20)));
        let why = a.not_enforced().unwrap();
        assert!(
            why.contains("writing \"20971520\" to ") && why.contains("memory.max"),
            "{why}"
        );
        assert_eq!(
            read(&d.path().join("ops-updater/falcon/cpu.max")),
            "10000 100000"
        );
    }

    #[test]
    fn v1_limits_are_written_in_an_order_the_kernel_accepts() {
        let d = tempfile::tempdir().unwrap();
        let cpu = d.path().join("cpu,cpuacct");
        let mem = d.path().join("memory");
        let fa = |root: &Path, f: &str| root.join("ops-updater/falcon").join(f);
        for f in ["cgroup.procs", "cpu.cfs_quota_us", "cpu.cfs_period_us"] {
            touch(&fa(&cpu, f), "");
        }
        touch(&fa(&mem, "cgroup.procs"), "");
        touch(&fa(&mem, "memory.limit_in_bytes"), "9223372036854771712");
        touch(
            &fa(&mem, "memory.memsw.limit_in_bytes"),
            "9223372036854771712",
        );
        let root = CgroupRoot::V1(vec![
            h(
                cpu.to_str().unwrap(),
                &[Controller::Cpu, Controller::Cpuacct],
                false,
            ),
            h(mem.to_str().unwrap(), &[Controller::Memory], false),
        ]);
        let cg = Cgroups::at(root, DEFAULT_PARENT);
        assert_eq!(cg.version(), Some(Version::V1));
        let a = cg.agent(&falcon(), &limits(Some(2500), Some(20 << 20)));
        assert_eq!(a.not_enforced(), None);
        assert_eq!(read(&fa(&cpu, "cpu.cfs_period_us")), "100000");
        assert_eq!(read(&fa(&cpu, "cpu.cfs_quota_us")), "25000");
        assert_eq!(read(&fa(&mem, "memory.limit_in_bytes")), "20971520");
        assert_eq!(read(&fa(&mem, "memory.memsw.limit_in_bytes")), "20971520");
        assert_eq!(
            a.describe(),
            format!(
                "cgroup v1 cpu,cpuacct,memory {}",
                mem.join("ops-updater/falcon").display()
            )
        );
        let a = cg.agent(&falcon(), &Limits::default());
        assert_eq!(a.not_enforced(), None);
        assert_eq!(read(&fa(&cpu, "cpu.cfs_quota_us")), "-1");
        assert_eq!(read(&fa(&mem, "memory.limit_in_bytes")), "-1");
        assert_eq!(read(&fa(&mem, "memory.memsw.limit_in_bytes")), "-1");
    }

    #[test]
    fn unusable_cgroups_give_handles_that_say_why_and_leave_commands_alone() {
        let d = tempfile::tempdir().unwrap();
        // A file where the hierarchy should be: mkdir fails (as it would without root).
        let file = d.path().join("not-a-dir");
        std::fs::write(&file, "").unwrap();
        let cases = [
            Cgroups::at(CgroupRoot::V2(file.clone()), DEFAULT_PARENT),
            Cgroups::at(
                CgroupRoot::V1(vec![h(
                    file.to_str().unwrap(),
                    &[Controller::Memory],
                    false,
                )]),
                DEFAULT_PARENT,
            ),
            Cgroups::at(
                CgroupRoot::V1(vec![h(
                    "/sys/fs/cgroup/memory",
                    &[Controller::Memory],
                    true,
                )]),
                DEFAULT_PARENT,
            ),
            Cgroups::choose(&Mounts::default(), DEFAULT_PARENT),
            Cgroups::none(DEFAULT_PARENT, "not root"),
        ];
        for cg in cases {
            let why = cg.unusable().expect("unusable").to_string();
            assert_eq!(cg.describe(), format!("no cgroup: {why}"));
            let a = cg.agent(&falcon(), &limits(Some(1000), None));
            assert!(!a.is_tracked());
            assert_eq!(
                a.not_enforced(),
                Some(format!("limits not enforced: no cgroup: {why}").as_str())
            );
            assert_eq!(cg.agent(&falcon(), &Limits::default()).not_enforced(), None);
            let mut cmd =
                crate::process::command(Path::new("/bin/true"), &[], d.path(), &Default::default());
            a.attach(&mut cmd).unwrap();
            let e = a.procs().unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::Unsupported);
            assert!(e.to_string().contains(&why), "{e}");
            assert!(a.remove().is_ok());
            assert_eq!(a.oom_kills(), 0);
        }
        let none = Cgroups::choose(&Mounts::default(), DEFAULT_PARENT);
        assert_eq!(none.unusable(), Some("no cgroup hierarchy mounted"));
        let ro = Cgroups::choose(
            &Mounts {
                v2: Some((PathBuf::from("/sys/fs/cgroup"), true)),
                v1: vec![],
            },
            DEFAULT_PARENT,
        );
        assert_eq!(ro.unusable(), Some("read-only hierarchy /sys/fs/cgroup"));
    }

    #[test]
    fn choice_prefers_v2_with_controllers_then_v1_then_bare_v2() {
        let with = v2_tree("cpu memory pids\n", &[]);
        let bare = v2_tree("hugetlb\n", &[]);
        let v1 = tempfile::tempdir().unwrap();
        let v1h = vec![h(v1.path().to_str().unwrap(), &[Controller::Memory], false)];
        let pick = |v2: &Path, v1: Vec<Hierarchy>| {
            Cgroups::choose(
                &Mounts {
                    v2: Some((v2.to_path_buf(), false)),
                    v1,
                },
                DEFAULT_PARENT,
            )
            .version()
        };
        assert_eq!(pick(with.path(), v1h.clone()), Some(Version::V2));
        assert_eq!(pick(bare.path(), v1h), Some(Version::V1));
        assert_eq!(pick(bare.path(), vec![]), Some(Version::V2));
        let pids_only = vec![h(v1.path().to_str().unwrap(), &[Controller::Pids], false)];
        assert_eq!(pick(bare.path(), pids_only), Some(Version::V2));
    }

    /// Regression: detecting on a host with v1 beside a bare cgroup2 mount left an empty
    /// `ops-updater` folder in the cgroup2 hierarchy, which was looked at but not picked.
    #[test]
    fn only_the_hierarchy_picked_keeps_a_parent_folder() {
        let bare = v2_tree("hugetlb\n", &[]);
        let v1 = tempfile::tempdir().unwrap();
        let mounts = |v1: Vec<Hierarchy>| Mounts {
            v2: Some((bare.path().to_path_buf(), false)),
            v1,
        };
        let memory = vec![h(v1.path().to_str().unwrap(), &[Controller::Memory], false)];
        let cg = Cgroups::choose(&mounts(memory), "picked");
        assert_eq!(cg.version(), Some(Version::V1));
        assert!(v1.path().join("picked").is_dir());
        assert!(!bare.path().join("picked").exists());
        std::fs::remove_dir(v1.path().join("picked")).unwrap();

        let pids = vec![h(v1.path().to_str().unwrap(), &[Controller::Pids], false)];
        let cg = Cgroups::choose(&mounts(pids), "picked");
        assert_eq!(cg.version(), Some(Version::V2));
        assert!(bare.path().join("picked").is_dir());
        assert!(!v1.path().join("picked").exists());
    }

    #[test]
    fn keyed_files() {
        assert_eq!(keyed("populated 1\nfrozen 0\n", "populated"), Some(1));
        assert_eq!(keyed("low 0\noom 2\noom_kill 3\n", "oom_kill"), Some(3));
        assert_eq!(keyed("oom_kill_disable 0\n", "oom_kill"), None);
        assert_eq!(keyed("", "populated"), None);
    }
}
