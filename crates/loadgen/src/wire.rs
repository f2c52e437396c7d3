//! What the simulated hosts send and how their answers are read, for the legacy heartbeat
//! and the BootAgent status protocol. Bodies are built from `proto`'s types, so field names
//! live in `proto` alone; the load loops render them from a [`Template`] so that building a
//! body costs a few copies rather than a serializer run per request.

use proto::bootagent::{self, Action, JobResult, StatusRequest, StatusResponse};
use proto::legacy::{HeartbeatRequest, HeartbeatResponse, RealAgent};

use crate::fleet::{agentsn, push_digits, Fleet, HOST_DIGITS};

/// Which protocol the simulated hosts speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// `POST /heartbeat` as the original ops-updater sends it.
    Legacy,
    /// `POST /agent/status` (and `/agent/register` once per host in converge mode).
    BootAgent,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Legacy => "legacy",
            Protocol::BootAgent => "bootagent",
        }
    }

    /// Path of the periodic report.
    pub fn report_path(self) -> &'static str {
        match self {
            Protocol::Legacy => "/heartbeat",
            Protocol::BootAgent => "/agent/status",
        }
    }
}

/// The version string a simulated BootAgent host reports for itself.
pub const BOOTAGENT_SELF_VERSION: &str = "bootagent-loadgen";
/// Report step a simulated BootAgent host announces, in seconds.
pub const BOOTAGENT_STEP: u64 = 600;

/// Markers that cannot occur in a validated name, so they are found unambiguously in the
/// serialized body and cut out as holes.
const HOST_MARK: &str = "@@loadgen-host@@";
const SN_MARK: &str = "@@loadgen-sn@@";
/// Timestamps are numbers; this value is far from any real clock and from anything the
/// fleet's validated names can spell next to a `:`.
const TS_MARK: i64 = 7_070_707_070_707_070;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hole {
    /// The host's index, as fixed-width digits after the host prefix.
    HostDigits,
    /// The host's BootAgent serial.
    Serial,
    /// Unix seconds.
    Timestamp,
}

/// A request body with holes for the host and the clock.
#[derive(Debug, Clone)]
pub struct Template {
    parts: Vec<Vec<u8>>,
    holes: Vec<Hole>,
}

impl Template {
    /// The report every host of `fleet` sends while all its agents run `fleet.version` and
    /// are started.
    pub fn report(protocol: Protocol, fleet: &Fleet) -> Template {
        let versions: Vec<&str> = fleet
            .agents
            .iter()
            .map(|_| fleet.version.as_str())
            .collect();
        let host = format!("{}{HOST_MARK}", fleet.host_prefix);
        let body = match protocol {
            Protocol::Legacy => {
                serde_json::to_string(&legacy_request(fleet, &host, &versions, TS_MARK))
            }
            Protocol::BootAgent => serde_json::to_string(&status_request(
                fleet,
                &host,
                SN_MARK,
                &versions,
                TS_MARK,
                Vec::new(),
            )),
        }
        .expect("serializing plain structs cannot fail");
        Template::cut(&body)
    }

    fn cut(body: &str) -> Template {
        let ts = TS_MARK.to_string();
        let marks: [(&str, Hole); 3] = [
            (HOST_MARK, Hole::HostDigits),
            (SN_MARK, Hole::Serial),
            (ts.as_str(), Hole::Timestamp),
        ];
        let mut parts = Vec::new();
        let mut holes = Vec::new();
        let mut rest = body;
        loop {
            let next = marks
                .iter()
                .filter_map(|(m, h)| rest.find(m).map(|at| (at, m.len(), *h)))
                .min_by_key(|(at, _, _)| *at);
            match next {
                Some((at, len, hole)) => {
                    parts.push(rest.as_bytes()[..at].to_vec());
                    holes.push(hole);
                    rest = &rest[at + len..];
                }
                None => {
                    parts.push(rest.as_bytes().to_vec());
                    break;
                }
            }
        }
        Template { parts, holes }
    }

    /// Appends the body of host `index` at Unix time `now` to `out`.
    pub fn render(&self, index: u64, now: i64, out: &mut Vec<u8>) {
        for (part, hole) in self.parts.iter().zip(&self.holes) {
            out.extend_from_slice(part);
            match hole {
                Hole::HostDigits => push_digits(out, index, HOST_DIGITS),
                Hole::Serial => out.extend_from_slice(agentsn(index).as_bytes()),
                Hole::Timestamp => out.extend_from_slice(now.to_string().as_bytes()),
            }
        }
        out.extend_from_slice(self.parts.last().expect("a template has a tail"));
    }
}

/// The legacy heartbeat of one host whose agents run `versions` (same order as
/// `fleet.agents`) and are started.
pub fn legacy_request(
    fleet: &Fleet,
    hostname: &str,
    versions: &[&str],
    now: i64,
) -> HeartbeatRequest {
    HeartbeatRequest {
        hostname: hostname.to_string(),
        real_agents: fleet
            .agents
            .iter()
            .zip(versions)
            .map(|(name, version)| RealAgent {
                name: name.clone(),
                version: version.to_string(),
                status: proto::legacy::STATUS_STARTED.to_string(),
                timestamp: now,
            })
            .collect(),
    }
}

/// The BootAgent status report of one host, carrying the results of jobs it ran since
/// the last report.
pub fn status_request(
    fleet: &Fleet,
    hostname: &str,
    serial: &str,
    versions: &[&str],
    now: i64,
    jobs: Vec<JobResult>,
) -> StatusRequest {
    StatusRequest {
        hostname: hostname.to_string(),
        agentsn: serial.to_string(),
        version: BOOTAGENT_SELF_VERSION.to_string(),
        uptime: 3600,
        timestamp: now,
        step: BOOTAGENT_STEP,
        agents: fleet
            .agents
            .iter()
            .zip(versions)
            .map(|(name, version)| bootagent::AgentStatus {
                name: name.clone(),
                version: version.to_string(),
                status: bootagent::STATE_RUNNING.to_string(),
                uptime: 3600,
            })
            .collect(),
        jobs,
        supervised: false,
        events: Vec::new(),
    }
}

/// Why an answer with status 200 was not a good answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BadAnswer {
    /// Not the JSON shape of the protocol.
    Body(String),
    /// Well-formed, but the server refused the report (`errorMessage` set, or a BootAgent
    /// `status` other than 0).
    Refused(String),
}

/// What a host is told to do, in the terms the converge mode acts on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Orders {
    /// `(agent, version)` to install and start.
    pub installs: Vec<(String, String)>,
    /// BootAgent job results to carry in the next report.
    pub job_results: Vec<JobResult>,
    /// BootAgent: for each of `installs`, the index of its job's result in `job_results`
    /// (a failing host changes that result); empty for the legacy protocol.
    pub install_jobs: Vec<usize>,
}

/// Checks an answer and extracts what the host must do.
pub fn read_answer(protocol: Protocol, body: &[u8]) -> Result<Orders, BadAnswer> {
    match protocol {
        Protocol::Legacy => {
            let r: HeartbeatResponse =
                serde_json::from_slice(body).map_err(|e| BadAnswer::Body(e.to_string()))?;
            if !r.error_message.is_empty() {
                return Err(BadAnswer::Refused(r.error_message));
            }
            let installs = r
                .desired_agents
                .into_iter()
                .filter(|d| proto::legacy::Cmd::parse(&d.cmd) == Some(proto::legacy::Cmd::Start))
                .map(|d| (d.name, d.version))
                .collect();
            Ok(Orders {
                installs,
                ..Orders::default()
            })
        }
        Protocol::BootAgent => {
            let r: StatusResponse =
                serde_json::from_slice(body).map_err(|e| BadAnswer::Body(e.to_string()))?;
            if r.status != bootagent::STATUS_OK {
                return Err(BadAnswer::Refused(format!(
                    "status {}: {}",
                    r.status, r.message
                )));
            }
            let mut orders = Orders::default();
            for job in r.jobs {
                // A simulated host does every job at once and succeeds; only installs and
                // upgrades change what it reports.
                if matches!(job.action, Action::Install | Action::Upgrade)
                    && !job.version.is_empty()
                {
                    orders
                        .installs
                        .push((job.name.clone(), job.version.clone()));
                    orders.install_jobs.push(orders.job_results.len());
                }
                orders.job_results.push(JobResult {
                    id: job.id,
                    errcode: bootagent::ERRCODE_OK,
                    message: "success".to_string(),
                });
            }
            Ok(orders)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet() -> Fleet {
        Fleet::new(1000, 3, "agent-", "sim-", "1.0.0").unwrap()
    }

    #[test]
    fn legacy_template_renders_what_serde_would() {
        let f = fleet();
        let t = Template::report(Protocol::Legacy, &f);
        let mut out = Vec::new();
        t.render(42, 1_431_000_000, &mut out);
        let want = legacy_request(&f, "sim-000000042", &["1.0.0"; 3], 1_431_000_000);
        let got: HeartbeatRequest = serde_json::from_slice(&out).unwrap();
        assert_eq!(got, want);
        assert_eq!(out, serde_json::to_vec(&want).unwrap());
    }

    #[test]
    fn bootagent_template_renders_what_serde_would() {
        let f = fleet();
        let t = Template::report(Protocol::BootAgent, &f);
        let mut out = Vec::new();
        t.render(7, 1_700_000_000, &mut out);
        let want = status_request(
            &f,
            "sim-000000007",
            &agentsn(7),
            &["1.0.0"; 3],
            1_700_000_000,
            vec![],
        );
        assert_eq!(out, serde_json::to_vec(&want).unwrap());
    }

    #[test]
    fn legacy_answers_become_installs_and_refusals_are_named() {
        let ok = br#"{"errorMessage":"","desiredAgents":[
            {"name":"agent-0","version":"2.0.0","tarball":"http://t","md5":"","cmd":"start"},
            {"name":"agent-1","version":"2.0.0","tarball":"http://t","md5":"","cmd":"stop"}]}"#;
        let o = read_answer(Protocol::Legacy, ok).unwrap();
        assert_eq!(
            o.installs,
            vec![("agent-0".to_string(), "2.0.0".to_string())]
        );
        assert_eq!(
            read_answer(Protocol::Legacy, br#"{"errorMessage":"busy"}"#),
            Err(BadAnswer::Refused("busy".into()))
        );
        assert!(matches!(
            read_answer(Protocol::Legacy, b"body is blank"),
            Err(BadAnswer::Body(_))
        ));
    }

    #[test]
    fn bootagent_jobs_are_done_and_reported() {
        let body = br#"{"status":0,"jobs":[
            {"id":"j1","action":"upgrade","name":"agent-0","version":"2.0.0","url":"http://t/a"},
            {"id":"j2","action":"config","step":1200}]}"#;
        let o = read_answer(Protocol::BootAgent, body).unwrap();
        assert_eq!(
            o.installs,
            vec![("agent-0".to_string(), "2.0.0".to_string())]
        );
        let ids: Vec<_> = o.job_results.iter().map(|j| j.id.as_str()).collect();
        assert_eq!(ids, ["j1", "j2"]);
        assert_eq!(o.install_jobs, [0]);
        assert!(matches!(
            read_answer(
                Protocol::BootAgent,
                br#"{"status":3,"message":"unknown serial"}"#
            ),
            Err(BadAnswer::Refused(_))
        ));
    }
}
