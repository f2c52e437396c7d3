//! `opsctl hosts`, `opsctl host NAME`, `opsctl readmit HOST`: what hosts report, and why
//! nothing happens on one.

use proto::ops::{HostView, HostsResponse, ReadmitResponse};

use crate::cli::HostsArgs;
use crate::client::{decode, with_query, Client};
use crate::table::{ago, cut, now, or_dash, span, when, Table};
use crate::{exit, print, Error};

/// `GET /api/hosts` (prefix and tag asked of the server), agent, version and state
/// filtered here.
pub fn list(c: &Client, json: bool, a: &HostsArgs) -> Result<u8, Error> {
    if let Some(p) = &a.prefix {
        proto::validate_hostname(p).map_err(|e| Error::Usage(format!("--prefix: {e}")))?;
    }
    let path = with_query(
        "/api/hosts",
        &[("prefix", a.prefix.as_deref()), ("tag", a.tag.as_deref())],
    );
    let body = c.get(&path)?;
    let filtered = a.agent.is_some() || a.version.is_some() || a.state.is_some();
    if json && !filtered {
        print(&body);
        return Ok(exit::OK);
    }
    let mut resp: HostsResponse = decode(&body, "GET /api/hosts")?;
    resp.hosts.retain(|h| keep(h, a));
    if json {
        print(&serde_json::to_string(&resp).expect("serializable"));
    } else {
        print(&hosts_table(&resp.hosts, a, now()));
    }
    Ok(exit::OK)
}

/// Whether a host has an agent that passes the filters (every host, without filters).
fn keep(h: &HostView, a: &HostsArgs) -> bool {
    if a.agent.is_none() && a.version.is_none() && a.state.is_none() {
        return true;
    }
    h.agents.iter().any(|ag| agent_matches(ag, a))
}

fn agent_matches(ag: &proto::bootagent::AgentStatus, a: &HostsArgs) -> bool {
    a.agent.as_deref().is_none_or(|n| ag.name == n)
        && a.version.as_deref().is_none_or(|v| ag.version == v)
        && a.state.as_deref().is_none_or(|s| ag.status == s)
}

/// One line per host and agent that passes the filters; a host without agents is one
/// line with `-` when nothing filters agents.
pub fn hosts_table(hosts: &[HostView], a: &HostsArgs, now: i64) -> String {
    let mut t = Table::new(&["HOST", "PROTOCOL", "AGENT", "VERSION", "STATE", "LAST SEEN"]);
    let filtered = a.agent.is_some() || a.version.is_some() || a.state.is_some();
    for h in hosts {
        let seen = ago(now, h.last_seen);
        let agents: Vec<_> = h.agents.iter().filter(|ag| agent_matches(ag, a)).collect();
        if agents.is_empty() && !filtered {
            t.row(vec![
                h.hostname.clone(),
                h.protocol.clone(),
                "-".into(),
                "-".into(),
                "-".into(),
                seen.clone(),
            ]);
        }
        for ag in agents {
            t.row(vec![
                h.hostname.clone(),
                h.protocol.clone(),
                ag.name.clone(),
                or_dash(&ag.version),
                cut(&or_dash(&ag.status), 40),
                seen.clone(),
            ]);
        }
    }
    if t.is_empty() {
        return "no host matches\n".into();
    }
    t.render()
}

/// `GET /api/hosts/NAME`.
pub fn show(c: &Client, json: bool, name: &str) -> Result<u8, Error> {
    proto::validate_hostname(name).map_err(|e| Error::Usage(format!("host: {e}")))?;
    let body = c.get(&format!("/api/hosts/{name}"))?;
    if json {
        print(&body);
    } else {
        let v: HostView = decode(&body, "GET /api/hosts/NAME")?;
        print(&host_view(&v, now()));
    }
    Ok(exit::OK)
}

/// Events shown by `opsctl host`, newest last.
const EVENTS_SHOWN: usize = 10;
/// Job results shown by `opsctl host`, newest last.
const RESULTS_SHOWN: usize = 10;

/// One host in words and tables.
pub fn host_view(v: &HostView, now: i64) -> String {
    let mut out = String::new();
    let mut head = Table::new(&["", ""]);
    head.row(vec!["host".into(), v.hostname.clone()]);
    head.row(vec!["protocol".into(), v.protocol.clone()]);
    if !v.agentsn.is_empty() {
        head.row(vec!["serial".into(), v.agentsn.clone()]);
    }
    if !v.tags.is_empty() {
        head.row(vec!["tags".into(), v.tags.clone()]);
    }
    if v.registered > 0 {
        head.row(vec!["registered".into(), when(v.registered)]);
    }
    head.row(vec![
        "last seen".into(),
        match v.last_seen {
            0 => "never".into(),
            t => format!("{} ({})", ago(now, t), when(t)),
        },
    ]);
    if !v.version.is_empty() {
        head.row(vec![
            "host daemon".into(),
            format!(
                "{}, up {}, reports every {}s",
                v.version,
                span(v.uptime),
                v.step
            ),
        ]);
    }
    // The head table has no column titles.
    out.extend(head.render().lines().skip(1).map(|l| format!("{l}\n")));

    out.push_str("\nagents:\n");
    if v.agents.is_empty() {
        out.push_str("  none reported\n");
    } else {
        let mut t = Table::new(&["AGENT", "VERSION", "STATE", "UPTIME"]);
        for a in &v.agents {
            t.row(vec![
                a.name.clone(),
                or_dash(&a.version),
                or_dash(&a.status),
                if a.uptime > 0 {
                    span(a.uptime)
                } else {
                    "-".into()
                },
            ]);
        }
        indent(&mut out, &t.render());
    }

    if !v.waiting.is_empty() || !v.blocked.is_empty() {
        out.push_str("\nwhy jobs wait:\n");
        for w in &v.waiting {
            let what = if w.version.is_empty() {
                w.name.clone()
            } else {
                format!("{} {}", w.name, w.version)
            };
            out.push_str(&format!(
                "  {what}: {}\n",
                proto::clean_text(&w.reason, 1024)
            ));
        }
        for b in &v.blocked {
            let why = match b.reason.as_str() {
                "failed" => "a derived job failed; nothing more is derived until the desired state changes or `opsctl retry`",
                "held" => "held by an operator's stop or uninstall; `opsctl retry` releases it",
                other => other,
            };
            out.push_str(&format!("  {}: blocked: {why}\n", b.name));
        }
    }

    if !v.pending.is_empty() {
        out.push_str("\npending jobs:\n");
        let mut t = Table::new(&[
            "JOB", "ACTION", "AGENT", "VERSION", "ORIGIN", "QUEUED", "SENT",
        ]);
        for p in &v.pending {
            t.row(vec![
                p.id.clone(),
                p.action.clone(),
                or_dash(&p.name),
                or_dash(&p.version),
                p.origin.clone(),
                ago(now, p.created),
                format!("{}x", p.sent),
            ]);
        }
        indent(&mut out, &t.render());
    }

    if !v.results.is_empty() {
        out.push_str("\nlast job results:\n");
        let mut t = Table::new(&[
            "JOB", "ACTION", "AGENT", "VERSION", "ERRCODE", "WHEN", "MESSAGE",
        ]);
        let skip = v.results.len().saturating_sub(RESULTS_SHOWN);
        for r in &v.results[skip..] {
            t.row(vec![
                r.id.clone(),
                r.action.clone(),
                or_dash(&r.name),
                or_dash(&r.version),
                r.errcode.to_string(),
                ago(now, r.finished),
                cut(&r.message, 80),
            ]);
        }
        indent(&mut out, &t.render());
    }

    let events: Vec<_> = if v.events.is_empty() {
        v.last_event.iter().collect()
    } else {
        v.events.iter().collect()
    };
    if !events.is_empty() {
        out.push_str(&format!(
            "\nlast events ({} kept):\n",
            v.event_count.max(events.len())
        ));
        let mut t = Table::new(&[
            "WHEN", "AGENT", "VERSION", "KIND", "STATE", "RESTARTS", "CAUSE",
        ]);
        let skip = events.len().saturating_sub(EVENTS_SHOWN);
        for e in &events[skip..] {
            t.row(vec![
                ago(now, e.time),
                or_dash(&e.agent),
                or_dash(&e.version),
                e.kind.clone(),
                or_dash(&e.state),
                e.restarts.to_string(),
                cut(&e.cause, 80),
            ]);
        }
        indent(&mut out, &t.render());
        if let Some(last) = events.last() {
            if !last.output.is_empty() {
                out.push_str("  output of the last one:\n");
                for l in &last.output {
                    out.push_str(&format!("    {}\n", proto::clean_text(l, 512)));
                }
            }
        }
    }
    out
}

fn indent(out: &mut String, text: &str) {
    for l in text.lines() {
        out.push_str("  ");
        out.push_str(l);
        out.push('\n');
    }
}

/// `POST /api/hosts/NAME/readmit`.
pub fn readmit(c: &Client, json: bool, host: &str) -> Result<u8, Error> {
    proto::validate_hostname(host).map_err(|e| Error::Usage(format!("host: {e}")))?;
    let body = c.post(&format!("/api/hosts/{host}/readmit"), None)?;
    if json {
        print(&body);
        return Ok(exit::OK);
    }
    let r: ReadmitResponse = decode(&body, "POST /api/hosts/NAME/readmit")?;
    print(&if r.had_credential {
        format!(
            "{}: credential forgotten; its next registration is admitted and given a new one",
            r.hostname
        )
    } else {
        format!("{}: held no credential; nothing to forget", r.hostname)
    });
    Ok(exit::OK)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::bootagent::AgentStatus;

    fn host(name: &str, agents: &[(&str, &str, &str)]) -> HostView {
        HostView {
            hostname: name.into(),
            protocol: "bootagent".into(),
            last_seen: 990,
            agents: agents
                .iter()
                .map(|(n, v, s)| AgentStatus {
                    name: n.to_string(),
                    version: v.to_string(),
                    status: s.to_string(),
                    uptime: 5,
                })
                .collect(),
            ..HostView::default()
        }
    }

    #[test]
    fn filters_pick_agent_lines() {
        let hosts = vec![
            host(
                "web-1",
                &[("basic", "1.0", "running"), ("falcon", "2.0", "fatal")],
            ),
            host("web-2", &[("basic", "1.1", "running")]),
            host("web-3", &[]),
        ];
        let all = hosts_table(&hosts, &HostsArgs::default(), 1000);
        assert_eq!(all.lines().count(), 5, "{all}");
        assert!(all.contains("web-3  bootagent  -"), "{all}");
        assert!(all.contains("10s ago"), "{all}");

        let a = HostsArgs {
            agent: Some("basic".into()),
            version: Some("1.0".into()),
            ..HostsArgs::default()
        };
        let t = hosts_table(&hosts, &a, 1000);
        assert_eq!(t.lines().count(), 2, "{t}");
        assert!(
            t.contains("web-1") && !t.contains("web-2") && !t.contains("falcon"),
            "{t}"
        );

        let a = HostsArgs {
            state: Some("fatal".into()),
            ..HostsArgs::default()
        };
        let kept: Vec<_> = hosts
            .iter()
            .filter(|h| keep(h, &a))
            .map(|h| &h.hostname)
            .collect();
        assert_eq!(kept, ["web-1"]);
        let none = HostsArgs {
            agent: Some("nope".into()),
            ..HostsArgs::default()
        };
        assert_eq!(hosts_table(&hosts, &none, 1000), "no host matches\n");
    }

    #[test]
    fn a_host_says_why_its_jobs_wait() {
        let mut v = host("web-1", &[("basic", "1.0", "running")]);
        v.waiting = vec![proto::bootagent::Waiting {
            name: "basic".into(),
            version: "1.1".into(),
            reason: "waiting: no checksum for basic-1.1.tar.gz yet".into(),
        }];
        v.blocked = vec![proto::ops::BlockedAgent {
            name: "falcon".into(),
            reason: "held".into(),
        }];
        let text = host_view(&v, 1000);
        assert!(
            text.contains("basic 1.1: waiting: no checksum for basic-1.1.tar.gz yet"),
            "{text}"
        );
        assert!(
            text.contains("falcon: blocked: held by an operator"),
            "{text}"
        );
        assert!(text.contains("last seen  10s ago"), "{text}");
    }
}
