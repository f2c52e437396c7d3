//! `opsctl jobs ...`, `opsctl retry`, `opsctl audit`: operator jobs over `/api/jobs`,
//! `/api/retry` and `/api/audit`.

use std::time::Duration;

use proto::ops::{
    AuditResponse, BatchStatus, JobsRequest, JobsResponse, RetryRequest, RetryResponse, JOB_DONE,
    JOB_PENDING,
};

use crate::cli::{JobsCommand, RetryArgs, Selector};
use crate::client::{decode, segment, with_query, Client};
use crate::table::{ago, cut, now, or_dash, when, Table};
use crate::{exit, print, Error};

pub fn run(c: &Client, json: bool, cmd: &JobsCommand) -> Result<u8, Error> {
    let (action, req) = match cmd {
        JobsCommand::Status { batch, wait } => return status(c, json, batch, *wait),
        JobsCommand::Restart(j) => ("restart", agent_job("restart", &j.agent, &j.select)?),
        JobsCommand::Stop(j) => ("stop", agent_job("stop", &j.agent, &j.select)?),
        JobsCommand::Uninstall(j) => ("uninstall", agent_job("uninstall", &j.agent, &j.select)?),
        JobsCommand::Reset(j) => ("reset", agent_job("reset", &j.agent, &j.select)?),
        JobsCommand::Config(j) => {
            let mut r = JobsRequest {
                action: "config".into(),
                svrlist: j.svrlist.clone().unwrap_or_default(),
                step: j.step,
                ..JobsRequest::default()
            };
            if !r.svrlist.is_empty() {
                proto::rules::parse_svrlist(&r.svrlist)
                    .map_err(|e| Error::Usage(format!("--svrlist: {e}")))?;
            }
            if let Some(s) = r.step {
                proto::rules::check_step(s).map_err(|e| Error::Usage(format!("--step: {e}")))?;
            }
            select(&mut r.hosts, &mut r.prefix, &mut r.tag, &j.select)?;
            ("config", r)
        }
    };
    let body = c.post("/api/jobs", Some(&req))?;
    if json {
        print(&body);
        return Ok(exit::OK);
    }
    let r: JobsResponse = decode(&body, "POST /api/jobs")?;
    print(&queued(action, &r));
    Ok(exit::OK)
}

fn agent_job(action: &str, agent: &str, sel: &Selector) -> Result<JobsRequest, Error> {
    proto::validate_agent_name(agent).map_err(|e| Error::Usage(format!("agent: {e}")))?;
    let mut r = JobsRequest {
        action: action.into(),
        name: agent.into(),
        ..JobsRequest::default()
    };
    select(&mut r.hosts, &mut r.prefix, &mut r.tag, sel)?;
    Ok(r)
}

/// Puts the one selector the flags gave into a request's three fields.
fn select(
    hosts: &mut Option<Vec<String>>,
    prefix: &mut Option<String>,
    tag: &mut Option<String>,
    sel: &Selector,
) -> Result<(), Error> {
    if !sel.hosts.is_empty() {
        for h in &sel.hosts {
            proto::validate_hostname(h).map_err(|e| Error::Usage(format!("--hosts: {e}")))?;
        }
        *hosts = Some(sel.hosts.clone());
    } else if let Some(p) = &sel.prefix {
        *prefix = Some(p.clone());
    } else if let Some(t) = &sel.tag {
        *tag = Some(t.clone());
    } else {
        return Err(Error::Usage("give one of --hosts, --prefix, --tag".into()));
    }
    Ok(())
}

/// What a `POST /api/jobs` did, in words.
pub fn queued(action: &str, r: &JobsResponse) -> String {
    let mut out = format!(
        "batch {}: {} {action} job(s) queued, {} host(s) skipped\n",
        r.id,
        r.jobs.len(),
        r.skipped.len()
    );
    if !r.jobs.is_empty() {
        let mut t = Table::new(&["HOST", "JOB"]);
        for j in &r.jobs {
            t.row(vec![j.host.clone(), j.id.clone()]);
        }
        out.push_str(&t.render());
    }
    if !r.skipped.is_empty() {
        out.push_str("skipped:\n");
        let mut t = Table::new(&["HOST", "WHY"]);
        for s in &r.skipped {
            t.row(vec![s.host.clone(), s.reason.clone()]);
        }
        out.push_str(&t.render());
    }
    out.push_str(&format!("follow it: opsctl jobs status {}\n", r.id));
    out
}

fn status(c: &Client, json: bool, batch: &str, wait: bool) -> Result<u8, Error> {
    let path = format!("/api/jobs/{}", segment("batch", batch)?);
    loop {
        let body = c.get(&path)?;
        let b: BatchStatus = decode(&body, "GET /api/jobs/ID")?;
        let pending = b.jobs.iter().any(|j| j.state == JOB_PENDING);
        if !wait || !pending {
            if json {
                print(&body);
            } else {
                print(&batch_view(&b, now()));
            }
            let bad = b.jobs.iter().filter(|j| j.state != JOB_DONE).count();
            if wait && bad > 0 {
                return Err(Error::Other(format!(
                    "batch {}: {bad} of {} job(s) failed or were lost",
                    b.id,
                    b.jobs.len()
                )));
            }
            return Ok(exit::OK);
        }
        c.sleep(Duration::from_secs(1));
    }
}

/// A batch: one line per job, and a count per state.
pub fn batch_view(b: &BatchStatus, now: i64) -> String {
    let mut counts: Vec<(&str, usize)> = Vec::new();
    for j in &b.jobs {
        match counts.iter_mut().find(|(s, _)| *s == j.state) {
            Some((_, n)) => *n += 1,
            None => counts.push((&j.state, 1)),
        }
    }
    let summary: Vec<String> = counts.iter().map(|(s, n)| format!("{n} {s}")).collect();
    let what = if b.name.is_empty() {
        b.action.clone()
    } else {
        format!("{} {}", b.action, b.name)
    };
    let mut out = format!(
        "batch {}: {what}, created {} ({}): {}\n",
        b.id,
        ago(now, b.created),
        when(b.created),
        if summary.is_empty() {
            "no jobs".into()
        } else {
            summary.join(", ")
        }
    );
    let mut t = Table::new(&["HOST", "JOB", "STATE", "ERRCODE", "FINISHED", "MESSAGE"]);
    for j in &b.jobs {
        t.row(vec![
            j.host.clone(),
            j.id.clone(),
            j.state.clone(),
            j.errcode
                .map(|e| e.to_string())
                .unwrap_or_else(|| "-".into()),
            j.finished
                .map(|f| ago(now, f))
                .unwrap_or_else(|| "-".into()),
            cut(&or_dash(&j.message), 80),
        ]);
    }
    out.push_str(&t.render());
    out
}

/// `POST /api/retry`.
pub fn retry(c: &Client, json: bool, a: &RetryArgs) -> Result<u8, Error> {
    let mut r = RetryRequest::default();
    if let Some(n) = &a.agent {
        proto::validate_agent_name(n).map_err(|e| Error::Usage(format!("agent: {e}")))?;
        r.name = n.clone();
    }
    select(&mut r.hosts, &mut r.prefix, &mut r.tag, &a.select)?;
    let body = c.post("/api/retry", Some(&r))?;
    if json {
        print(&body);
        return Ok(exit::OK);
    }
    let r: RetryResponse = decode(&body, "POST /api/retry")?;
    print(&format!(
        "{} host(s) selected, {} failure(s) and hold(s) forgotten: jobs are derived again at their next report",
        r.hosts, r.cleared
    ));
    Ok(exit::OK)
}

/// `GET /api/audit`.
pub fn audit(c: &Client, json: bool, limit: u32, before: Option<i64>) -> Result<u8, Error> {
    let limit = limit.to_string();
    let before = before.map(|b| b.to_string());
    let path = with_query(
        "/api/audit",
        &[("limit", Some(&limit)), ("before", before.as_deref())],
    );
    let body = c.get(&path)?;
    if json {
        print(&body);
        return Ok(exit::OK);
    }
    let r: AuditResponse = decode(&body, "GET /api/audit")?;
    let mut t = Table::new(&[
        "ID", "TIME", "ACTOR", "ACTION", "TARGET", "HOSTS", "STATUS", "OUTCOME",
    ]);
    for e in &r.entries {
        t.row(vec![
            e.id.to_string(),
            when(e.time),
            or_dash(&e.actor),
            e.action.clone(),
            or_dash(&e.target),
            e.host_count.to_string(),
            if e.status == 0 {
                "-".into()
            } else {
                e.status.to_string()
            },
            cut(&e.outcome, 80),
        ]);
    }
    print(&if t.is_empty() {
        "no audit entries\n".into()
    } else {
        t.render()
    });
    Ok(exit::OK)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::ops::BatchJob;

    #[test]
    fn a_batch_counts_its_states() {
        let b = BatchStatus {
            id: "b1".into(),
            action: "restart".into(),
            name: "basic".into(),
            created: 900,
            jobs: vec![
                BatchJob {
                    host: "web-1".into(),
                    id: "j1".into(),
                    state: "done".into(),
                    errcode: Some(0),
                    finished: Some(950),
                    ..BatchJob::default()
                },
                BatchJob {
                    host: "web-2".into(),
                    id: "j2".into(),
                    state: "failed".into(),
                    errcode: Some(7),
                    message: "not installed".into(),
                    finished: Some(960),
                    ..BatchJob::default()
                },
                BatchJob {
                    host: "web-3".into(),
                    id: "j3".into(),
                    state: "pending".into(),
                    ..BatchJob::default()
                },
            ],
        };
        let text = batch_view(&b, 1000);
        assert!(
            text.starts_with("batch b1: restart basic, created 100s ago"),
            "{text}"
        );
        assert!(text.contains("1 done, 1 failed, 1 pending"), "{text}");
        assert!(
            text.contains("web-2  j2   failed   7        40s ago   not installed"),
            "{text}"
        );
    }
}
