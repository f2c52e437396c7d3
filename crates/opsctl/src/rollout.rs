//! `opsctl rollout ...`: staged rollouts over `/api/rollouts`. The spec is built from
//! flags ([`spec_from_args`]) or read from a file; plans, views and lists are drawn by
//! pure functions ([`plan_view`], [`status_view`], [`list_view`], [`progress`]), and
//! `watch` redraws the progress of each wave until the rollout ends.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use proto::rollout::{
    PauseRequest, RolloutList, RolloutPlan, RolloutSpec, RolloutView, WaveSpec, WaveView,
    WindowSpec, MAX_SELECTORS, MAX_WAVES, STATE_ABORTED, STATE_COMPLETED, STATE_PAUSED,
    STATE_ROLLED_BACK, STATE_SUPERSEDED,
};

use crate::cli::{RolloutCommand, SpecArgs};
use crate::client::{decode, segment, with_query, Client};
use crate::table::{ago, cut, now, or_dash, sample, when, Table};
use crate::{exit, print, Error};

/// Largest spec file read.
const MAX_SPEC_BYTES: u64 = 1024 * 1024;

/// How long `watch` keeps polling a server that does not answer (restarting, say) before
/// it gives up with exit 6.
const WATCH_OUTAGE: Duration = Duration::from_secs(60);

pub fn run(c: &Client, json: bool, cmd: &RolloutCommand) -> Result<u8, Error> {
    match cmd {
        RolloutCommand::Plan(a) => {
            let spec = spec_from_args(a, false)?;
            let body = c.post("/api/rollouts/plan", Some(&spec))?;
            if json {
                print(&body);
            } else {
                let p: RolloutPlan = decode(&body, "POST /api/rollouts/plan")?;
                print(&plan_view(&p));
            }
            Ok(exit::OK)
        }
        RolloutCommand::Create { spec, start } => {
            let spec = spec_from_args(spec, *start)?;
            let body = c.post("/api/rollouts", Some(&spec))?;
            show_view(&body, json, "POST /api/rollouts")
        }
        RolloutCommand::Start { id } => action(c, json, id, "start", None),
        RolloutCommand::Pause { id, reason } => {
            let body = reason.as_ref().map(|r| PauseRequest { reason: r.clone() });
            action(c, json, id, "pause", body.as_ref())
        }
        RolloutCommand::Resume { id } => action(c, json, id, "resume", None),
        RolloutCommand::Approve { id } => action(c, json, id, "approve", None),
        RolloutCommand::Abort { id } => action(c, json, id, "abort", None),
        RolloutCommand::Rollback { id } => action(c, json, id, "rollback", None),
        RolloutCommand::Status { id, exit_status } => {
            let body = c.get(&format!("/api/rollouts/{}", segment("rollout id", id)?))?;
            let v: RolloutView = decode(&body, "GET /api/rollouts/ID")?;
            if json {
                print(&body);
            } else {
                print(&status_view(&v, now()));
            }
            Ok(if *exit_status {
                state_exit(&v.state)
            } else {
                exit::OK
            })
        }
        RolloutCommand::Watch {
            id,
            interval,
            until_paused,
        } => watch(c, json, id, *interval, *until_paused),
        RolloutCommand::List { agent } => {
            if let Some(a) = agent {
                proto::validate_agent_name(a).map_err(|e| Error::Usage(format!("--agent: {e}")))?;
            }
            let body = c.get(&with_query("/api/rollouts", &[("agent", agent.as_deref())]))?;
            if json {
                print(&body);
            } else {
                let l: RolloutList = decode(&body, "GET /api/rollouts")?;
                print(&list_view(&l, now()));
            }
            Ok(exit::OK)
        }
    }
}

fn action(
    c: &Client,
    json: bool,
    id: &str,
    verb: &str,
    body: Option<&PauseRequest>,
) -> Result<u8, Error> {
    let id = segment("rollout id", id)?;
    let body = c.post(
        &format!("/api/rollouts/{id}/{verb}"),
        body.map(|b| b as &dyn crate::client::ErasedJson),
    )?;
    show_view(&body, json, &format!("POST /api/rollouts/ID/{verb}"))
}

fn show_view(body: &str, json: bool, what: &str) -> Result<u8, Error> {
    if json {
        print(body);
    } else {
        let v: RolloutView = decode(body, what)?;
        print(&status_view(&v, now()));
    }
    Ok(exit::OK)
}

/// The exit code of a rollout state (`status --exit-status`).
pub fn state_exit(state: &str) -> u8 {
    match state {
        STATE_COMPLETED => exit::OK,
        STATE_PAUSED => exit::PAUSED,
        STATE_ABORTED | STATE_ROLLED_BACK | STATE_SUPERSEDED => exit::ENDED,
        _ => exit::RUNNING,
    }
}

// ---- the spec from flags ----

/// The [`RolloutSpec`] of `plan`/`create`: from `--file`, or from the flags, checked
/// here as far as the client can (names, hex, wave syntax, bounds) so that a typo is
/// caught before a request.
pub fn spec_from_args(a: &SpecArgs, start: bool) -> Result<RolloutSpec, Error> {
    if let Some(path) = &a.file {
        let mut spec = read_spec(path)?;
        spec.start |= start;
        return Ok(spec);
    }
    let usage = |flag: &str, e: &dyn std::fmt::Display| Error::Usage(format!("{flag}: {e}"));
    let agent = a.agent.clone().unwrap_or_default();
    proto::validate_agent_name(&agent).map_err(|e| usage("--agent", &e))?;
    let version = a.version.clone().unwrap_or_default();
    proto::validate_version(&version).map_err(|e| usage("--version", &e))?;
    let tarball = a.tarball.clone().unwrap_or_default();
    if !tarball.is_empty() {
        let u = reqwest::Url::parse(&tarball).map_err(|e| usage("--tarball", &e))?;
        if !matches!(u.scheme(), "http" | "https") {
            return Err(usage("--tarball", &"not an http:// or https:// URL"));
        }
        if tarball.ends_with(".tar.gz") {
            return Err(usage(
                "--tarball",
                &"is the base URL (the folder), not the .tar.gz itself",
            ));
        }
    }
    let sha256 = a.sha256.clone().unwrap_or_default().to_ascii_lowercase();
    if !sha256.is_empty() && (sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return Err(usage("--sha256", &"want 64 hex digits"));
    }
    if a.waves.is_empty() {
        return Err(usage("--wave", &"give at least one"));
    }
    if a.waves.len() > MAX_WAVES {
        return Err(usage(
            "--wave",
            &format!("{} waves, the limit is {MAX_WAVES}", a.waves.len()),
        ));
    }
    let waves = a
        .waves
        .iter()
        .map(|w| parse_wave(w).map_err(|e| usage("--wave", &format!("{w:?}: {e}"))))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(p) = a.max_failure_percent {
        if !(0.0..=100.0).contains(&p) {
            return Err(usage("--max-failure-percent", &"want 0 to 100"));
        }
    }
    if a.max_in_flight == Some(0) {
        return Err(usage("--max-in-flight", &"must be at least 1"));
    }
    let window = a
        .window
        .as_deref()
        .map(|w| parse_window(w).map_err(|e| usage("--window", &format!("{w:?}: {e}"))))
        .transpose()?;
    Ok(RolloutSpec {
        agent,
        version,
        tarball,
        sha256,
        waves,
        max_in_flight: a.max_in_flight,
        min_healthy_secs: a.min_healthy,
        healthy_deadline_secs: a.healthy_deadline,
        missing_after_secs: a.missing_after,
        max_failures: a.max_failures,
        max_failure_percent: a.max_failure_percent,
        approval: a.approval,
        window,
        start,
    })
}

fn read_spec(path: &std::path::Path) -> Result<RolloutSpec, Error> {
    use std::io::Read;
    let mut text = String::new();
    let what = path.display().to_string();
    let r = if what == "-" {
        std::io::stdin()
            .lock()
            .take(MAX_SPEC_BYTES + 1)
            .read_to_string(&mut text)
    } else {
        std::fs::File::open(path).and_then(|f| f.take(MAX_SPEC_BYTES + 1).read_to_string(&mut text))
    };
    r.map_err(|e| Error::Usage(format!("--file {what}: {e}")))?;
    if text.len() as u64 > MAX_SPEC_BYTES {
        return Err(Error::Usage(format!(
            "--file {what}: larger than {MAX_SPEC_BYTES} bytes"
        )));
    }
    serde_json::from_str(&text).map_err(|e| Error::Usage(format!("--file {what}: {e}")))
}

/// One `--wave`: `[NAME:]prefix=P,P | [NAME:]tag=K=V,K=V | [NAME:]percent=N`.
pub fn parse_wave(s: &str) -> Result<WaveSpec, String> {
    // A name is what comes before the first ':', when that holds no '='.
    let (name, sel) = match s.split_once(':') {
        Some((n, rest)) if !n.contains('=') => (n, rest),
        _ => ("", s),
    };
    if !name.is_empty() {
        proto::validate_agent_name(name).map_err(|e| format!("wave name: {e}"))?;
    }
    let (kind, value) = sel
        .split_once('=')
        .ok_or("want prefix=..., tag=... or percent=...")?;
    let list = |v: &str| -> Result<Vec<String>, String> {
        let items: Vec<String> = v.split(',').map(|x| x.trim().to_string()).collect();
        if items.iter().any(String::is_empty) {
            return Err("an empty entry in the list".into());
        }
        if items.len() > MAX_SELECTORS {
            return Err(format!(
                "{} entries, the limit is {MAX_SELECTORS}",
                items.len()
            ));
        }
        Ok(items)
    };
    let mut w = WaveSpec {
        name: name.to_string(),
        ..WaveSpec::default()
    };
    match kind {
        "prefix" => {
            w.prefixes = list(value)?;
            for p in &w.prefixes {
                proto::validate_hostname(p).map_err(|e| format!("prefix: {e}"))?;
            }
        }
        "tag" => {
            w.tags = list(value)?;
            for t in &w.tags {
                let ok = t.split_once('=').is_some_and(|(k, v)| {
                    let part = |p: &str| {
                        !p.is_empty()
                            && p.bytes().all(|b| {
                                b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')
                            })
                    };
                    part(k) && part(v)
                });
                if !ok {
                    return Err(format!("tag {t:?} is not key=value"));
                }
            }
        }
        "percent" => {
            let p: f64 = value
                .trim_end_matches('%')
                .parse()
                .map_err(|_| format!("percent {value:?} is not a number"))?;
            if !(p > 0.0 && p <= 100.0) {
                return Err("percent must be above 0 and at most 100".into());
            }
            w.percent = Some(p);
        }
        other => return Err(format!("{other:?} is not prefix, tag or percent")),
    }
    Ok(w)
}

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// `--window`: `[DAY,DAY@]HH:MM-HH:MM` (UTC).
pub fn parse_window(s: &str) -> Result<WindowSpec, String> {
    let (days, times) = match s.split_once('@') {
        Some((d, t)) => (d, t),
        None => ("", s),
    };
    let days: Vec<String> = if days.is_empty() {
        Vec::new()
    } else {
        days.split(',')
            .map(|d| {
                let d = d.trim().to_ascii_lowercase();
                if DAYS.contains(&d.as_str()) {
                    Ok(d)
                } else {
                    Err(format!("{d:?} is not a day (mon, tue, ... sun)"))
                }
            })
            .collect::<Result<_, _>>()?
    };
    let (start, end) = times.split_once('-').ok_or("want HH:MM-HH:MM")?;
    for t in [start, end] {
        let ok = t.len() == 5
            && t.as_bytes()[2] == b':'
            && t[..2].parse::<u8>().is_ok_and(|h| h < 24)
            && t[3..].parse::<u8>().is_ok_and(|m| m < 60)
            && t.bytes().filter(u8::is_ascii_digit).count() == 4;
        if !ok {
            return Err(format!("{t:?} is not HH:MM"));
        }
    }
    if start == end {
        return Err("the window starts and ends at the same minute".into());
    }
    Ok(WindowSpec {
        days,
        start: start.to_string(),
        end: end.to_string(),
    })
}

// ---- drawing ----

/// A dry run's plan: where the version goes, the waves with their hosts, what is left
/// alone and what would hold it.
pub fn plan_view(p: &RolloutPlan) -> String {
    let mut out = format!(
        "plan: {} {} -> {}\ntarball  {}\n",
        p.agent,
        or_dash(&p.from_version),
        p.version,
        or_dash(&p.tarball_url)
    );
    let mut t = Table::new(&["#", "WAVE", "HOSTS", "FAILURE LIMIT", "SAMPLE"]);
    for w in &p.waves {
        t.row(vec![
            (w.index + 1).to_string(),
            w.name.clone(),
            w.hosts.to_string(),
            limit(w),
            sample(&w.sample, w.hosts),
        ]);
    }
    out.push('\n');
    out.push_str(&t.render());
    let total: u64 = p.waves.iter().map(|w| w.hosts).sum();
    out.push_str(&format!(
        "\n{total} host(s) in {} wave(s); {} known host(s) in no wave are left alone\n",
        p.waves.len(),
        p.outside
    ));
    if !p.warnings.is_empty() {
        out.push_str("\nwarnings:\n");
        for w in &p.warnings {
            out.push_str(&format!("  - {}\n", proto::clean_text(w, 1024)));
        }
    }
    out.push_str("\nnothing was stored: `opsctl rollout create` with the same flags makes it\n");
    out
}

fn limit(w: &WaveView) -> String {
    if w.failure_limit == 0 {
        "none".into()
    } else {
        w.failure_limit.to_string()
    }
}

/// One rollout: state, waves with their counts, what holds it in words, failures with
/// reasons, and once completed how to make it permanent.
pub fn status_view(v: &RolloutView, now: i64) -> String {
    let mut out = format!(
        "rollout {}: {} {} -> {}  [{}]\n",
        v.id,
        v.agent,
        or_dash(&v.from_version),
        v.version,
        v.state
    );
    let mut head = Table::new(&["", ""]);
    head.row(vec!["tarball".into(), or_dash(&v.tarball_url)]);
    head.row(vec![
        "sha256".into(),
        if v.sha256.is_empty() {
            "not known yet".into()
        } else {
            v.sha256.clone()
        },
    ]);
    if !v.signature_url.is_empty() {
        head.row(vec!["signature".into(), v.signature_url.clone()]);
    }
    head.row(vec![
        "created".into(),
        format!("{} ({})", when(v.created), ago(now, v.created)),
    ]);
    head.row(vec![
        "updated".into(),
        format!("{} ({})", when(v.updated), ago(now, v.updated)),
    ]);
    if !v.paused_reason.is_empty() {
        head.row(vec!["paused".into(), v.paused_reason.clone()]);
    }
    if !v.rollback_of.is_empty() {
        head.row(vec!["rolls back".into(), v.rollback_of.clone()]);
    }
    if !v.rolled_back_by.is_empty() {
        head.row(vec!["rolled back by".into(), v.rolled_back_by.clone()]);
    }
    out.extend(head.render().lines().skip(1).map(|l| format!("  {l}\n")));

    out.push('\n');
    out.push_str(&waves_table(v));
    let c = &v.counts;
    out.push_str(&format!(
        "all: {} host(s): {} healthy, {} in flight, {} pending, {} failed, {} infra-failed, {} missing\n",
        c.total(),
        c.healthy,
        c.in_flight,
        c.pending,
        c.failed,
        c.infra_failed,
        c.missing
    ));

    if !v.holds.is_empty() {
        out.push_str("\nwhy it is not moving:\n");
        for h in &v.holds {
            out.push_str(&format!("  - {}", proto::clean_text(&h.text, 1024)));
            if !h.hosts.is_empty() || h.count > 0 {
                out.push_str(&format!(" ({})", sample(&h.hosts, h.count)));
            }
            out.push('\n');
        }
    } else if is_moving(&v.state) {
        out.push_str("\nnothing holds it: hosts are being admitted\n");
    }

    if !v.failures.is_empty() {
        out.push_str("\nfailures:\n");
        let mut t = Table::new(&["HOST", "WAVE", "KIND", "REASON"]);
        for f in &v.failures {
            let wave = v
                .waves
                .iter()
                .find(|w| w.index == f.wave)
                .map(|w| w.name.clone())
                .unwrap_or_else(|| (f.wave + 1).to_string());
            let kind = match f.phase.as_str() {
                "failed" => "release",
                "infra_failed" => "infra (not counted)",
                "missing" => "missing",
                other => other,
            };
            t.row(vec![f.host.clone(), wave, kind.into(), cut(&f.reason, 100)]);
        }
        for l in t.render().lines() {
            out.push_str(&format!("  {l}\n"));
        }
    }

    if v.state == STATE_COMPLETED {
        out.push_str("\ncompleted.");
        if !v.permanent.is_empty() {
            out.push_str(&format!(" {}", proto::clean_text(&v.permanent, 2048)));
        }
        out.push_str("\nthe agent's default in cfg.json, to keep this version for good:\n");
        out.push_str(&cfg_snippet(v));
        out.push_str(
            "(keep the entry's other keys, such as cmd and md5, as they are; then reload)\n",
        );
    }
    out
}

fn is_moving(state: &str) -> bool {
    state == proto::rollout::STATE_RUNNING
}

/// The `default` of the agent's `cfg.json` entry with the rollout's version, from the
/// view's fields (`tarball` is the folder of the tarball URL).
pub fn cfg_snippet(v: &RolloutView) -> String {
    let file = proto::legacy::tarball_file(&v.agent, &v.version);
    let base = v
        .tarball_url
        .strip_suffix(&file)
        .map(|b| b.trim_end_matches('/'))
        .unwrap_or(&v.tarball_url);
    let mut d = serde_json::Map::new();
    d.insert("name".into(), v.agent.clone().into());
    d.insert("version".into(), v.version.clone().into());
    if !base.is_empty() {
        d.insert("tarball".into(), base.into());
    }
    if !v.sha256.is_empty() {
        d.insert("sha256".into(), v.sha256.clone().into());
    }
    let snippet = serde_json::json!({ "default": d });
    let text = serde_json::to_string_pretty(&snippet).expect("serializable");
    let mut out = String::new();
    for l in text.lines() {
        out.push_str("  ");
        out.push_str(l);
        out.push('\n');
    }
    out
}

fn waves_table(v: &RolloutView) -> String {
    let mut t = Table::new(&[
        "#",
        "WAVE",
        "STATE",
        "HOSTS",
        "HEALTHY",
        "IN FLIGHT",
        "PENDING",
        "FAILED",
        "INFRA",
        "MISSING",
        "LIMIT",
    ]);
    for w in &v.waves {
        let marker = if w.index == v.current_wave && w.state != "done" && is_live(&v.state) {
            "*"
        } else {
            ""
        };
        t.row(vec![
            format!("{}{marker}", w.index + 1),
            w.name.clone(),
            w.state.clone(),
            w.hosts.to_string(),
            w.counts.healthy.to_string(),
            w.counts.in_flight.to_string(),
            w.counts.pending.to_string(),
            w.counts.failed.to_string(),
            w.counts.infra_failed.to_string(),
            w.counts.missing.to_string(),
            limit(w),
        ]);
    }
    t.render()
}

fn is_live(state: &str) -> bool {
    matches!(
        state,
        proto::rollout::STATE_RUNNING | STATE_PAUSED | proto::rollout::STATE_PLANNED
    )
}

/// `GET /api/rollouts`: one line per rollout.
pub fn list_view(l: &RolloutList, now: i64) -> String {
    if l.rollouts.is_empty() {
        return "no rollouts\n".into();
    }
    let mut t = Table::new(&[
        "ID", "AGENT", "FROM", "TO", "STATE", "WAVE", "HEALTHY", "FAILED", "UPDATED",
    ]);
    for v in &l.rollouts {
        let wave = if v.waves.is_empty() {
            "-".into()
        } else {
            format!(
                "{}/{}",
                (v.current_wave + 1).min(v.waves.len()),
                v.waves.len()
            )
        };
        t.row(vec![
            v.id.clone(),
            v.agent.clone(),
            or_dash(&v.from_version),
            v.version.clone(),
            v.state.clone(),
            wave,
            format!("{}/{}", v.counts.healthy, v.counts.total()),
            (v.counts.failed + v.counts.missing).to_string(),
            ago(now, v.updated),
        ]);
    }
    t.render()
}

/// Width of a progress bar, in characters.
const BAR: usize = 30;

/// One line per wave: a bar (`#` healthy, `>` in flight, `x` failed or missing, `!`
/// infra-failed, `.` pending) and the counts; then the state and the first hold.
pub fn progress(v: &RolloutView) -> Vec<String> {
    let name_w = v
        .waves
        .iter()
        .map(|w| w.name.chars().count())
        .max()
        .unwrap_or(0);
    let mut lines = vec![format!(
        "rollout {} {} -> {}: {}{}",
        v.id,
        v.agent,
        v.version,
        v.state,
        if v.paused_reason.is_empty() {
            String::new()
        } else {
            format!(" ({})", proto::clean_text(&v.paused_reason, 200))
        }
    )];
    for w in &v.waves {
        let c = &w.counts;
        let total = w.hosts.max(c.total());
        let bar = bar(
            &[
                (c.healthy, '#'),
                (c.in_flight, '>'),
                (c.failed + c.missing, 'x'),
                (c.infra_failed, '!'),
            ],
            total,
            BAR,
        );
        let mut extra = Vec::new();
        if c.in_flight > 0 {
            extra.push(format!("{} in flight", c.in_flight));
        }
        if c.failed + c.missing > 0 {
            extra.push(format!("{} failed", c.failed + c.missing));
        }
        if c.infra_failed > 0 {
            extra.push(format!("{} infra", c.infra_failed));
        }
        lines.push(format!(
            "  {:<name_w$}  [{bar}] {:>3}%  {}/{} healthy{}{}",
            w.name,
            (c.healthy * 100).checked_div(total).unwrap_or(100),
            c.healthy,
            total,
            if extra.is_empty() { "" } else { ", " },
            extra.join(", ")
        ));
    }
    if let Some(h) = v.holds.first() {
        lines.push(format!(
            "  holding: {}",
            cut(&proto::clean_text(&h.text, 512), 120)
        ));
    }
    lines
}

/// A bar of `width` characters: each part's share of `total`, the rest `.`. Parts are
/// rounded down but never to nothing, so one failed host of a thousand still shows.
pub fn bar(parts: &[(u64, char)], total: u64, width: usize) -> String {
    let mut out = String::new();
    if total == 0 {
        return ".".repeat(width);
    }
    for &(n, ch) in parts {
        if n == 0 {
            continue;
        }
        let cells = ((n as u128 * width as u128) / total as u128).max(1) as usize;
        let cells = cells.min(width - out.chars().count().min(width));
        out.extend(std::iter::repeat_n(ch, cells));
    }
    let used = out.chars().count();
    out.push_str(&".".repeat(width.saturating_sub(used)));
    out
}

/// The line `watch` prints when stdout is not a terminal, once per change.
pub fn plain_line(v: &RolloutView) -> String {
    let waves: Vec<String> = v
        .waves
        .iter()
        .map(|w| {
            let c = &w.counts;
            let mut s = format!("{} {}/{}", w.name, c.healthy, w.hosts.max(c.total()));
            if c.in_flight > 0 {
                s.push_str(&format!(" >{}", c.in_flight));
            }
            if c.failed + c.missing > 0 {
                s.push_str(&format!(" x{}", c.failed + c.missing));
            }
            if c.infra_failed > 0 {
                s.push_str(&format!(" !{}", c.infra_failed));
            }
            s
        })
        .collect();
    let hold = v
        .holds
        .first()
        .map(|h| format!("; holding: {}", cut(&proto::clean_text(&h.text, 512), 120)))
        .unwrap_or_default();
    format!(
        "{} {}: {} | {}{hold}",
        crate::table::when(now()),
        v.id,
        v.state,
        waves.join(" | ")
    )
}

fn watch(c: &Client, json: bool, id: &str, interval: f64, until_paused: bool) -> Result<u8, Error> {
    let id = segment("rollout id", id)?;
    if !(interval.is_finite() && interval >= 0.1) {
        return Err(Error::Usage("--interval: at least 0.1 seconds".into()));
    }
    let interval = Duration::from_secs_f64(interval);
    let tty = !json && std::io::stdout().is_terminal();
    let path = format!("/api/rollouts/{id}");
    let mut drawn = 0usize;
    let mut last = String::new();
    let mut failing_since: Option<Instant> = None;
    loop {
        let body = match c.get(&path) {
            Ok(b) => {
                failing_since = None;
                b
            }
            Err(e) if e.exit_code() == exit::UNAVAILABLE => {
                // A restarting server is waited for a while; the rollout goes on without us.
                let since = *failing_since.get_or_insert_with(Instant::now);
                if since.elapsed() > WATCH_OUTAGE {
                    return Err(e);
                }
                eprintln!("opsctl: {e} (still trying)");
                c.sleep(interval);
                continue;
            }
            Err(e) => return Err(e),
        };
        let v: RolloutView = decode(&body, "GET /api/rollouts/ID")?;
        if json {
            // One line per change: NDJSON for a script.
            let line: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            let line = line.to_string();
            if line != last {
                print(&line);
                last = line;
            }
        } else if tty {
            let lines = progress(&v);
            let mut out = std::io::stdout().lock();
            if drawn > 0 {
                // Back to the first line drawn, and clear everything below it.
                let _ = write!(out, "\x1b[{drawn}A\r\x1b[J");
            }
            for l in &lines {
                let _ = writeln!(out, "{l}");
            }
            let _ = out.flush();
            drawn = lines.len();
        } else {
            let line = plain_line(&v);
            // The time prefix changes every second; compare what follows it.
            let key = line
                .split_once(' ')
                .map(|x| x.1)
                .unwrap_or(&line)
                .to_string();
            let key = key.split_once(' ').map(|x| x.1.to_string()).unwrap_or(key);
            if key != last {
                print(&line);
                last = key;
            }
        }
        let code = state_exit(&v.state);
        if code == exit::OK || code == exit::ENDED || (code == exit::PAUSED && until_paused) {
            if !json {
                print(&end_line(&v));
            }
            return Ok(code);
        }
        c.sleep(interval);
    }
}

/// The last line of `watch`.
fn end_line(v: &RolloutView) -> String {
    match v.state.as_str() {
        STATE_COMPLETED => format!(
            "rollout {} completed: `opsctl rollout status {}` shows how to make it permanent",
            v.id, v.id
        ),
        STATE_PAUSED => format!(
            "rollout {} is paused{}: `opsctl rollout resume {}` when fixed",
            v.id,
            if v.paused_reason.is_empty() {
                String::new()
            } else {
                format!(" ({})", proto::clean_text(&v.paused_reason, 200))
            },
            v.id
        ),
        s => format!("rollout {} ended: {s}", v.id),
    }
}

#[cfg(test)]
mod tests;
