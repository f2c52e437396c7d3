//! Desired state per host: the config compiled into a form the heartbeat hot path can
//! answer from without locking or allocating much.
//!
//! For each agent the answer for hosts that match no override is serialized once, at
//! compile time, through `proto::legacy::DesiredAgent`; hosts that match an override (a
//! canary, a small share of the fleet) get their entry merged and serialized per request.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;

use bytes::Bytes;

use proto::legacy::{DesiredAgent, HeartbeatResponse};
use proto::AgentName;

use crate::config::{AgentDefault, AgentOverride, Config};
use crate::digests::{Artifact, Digests, Known};

/// The hosts a rollout moved to its version of one agent: they get that version (and
/// its tarball and digest) instead of what `cfg.json` says, until the rollout lets go.
#[derive(Debug)]
pub struct Pin {
    pub rollout: String,
    pub agent: AgentName,
    pub version: String,
    /// Tarball base URL; the config's for the host when empty.
    pub tarball: String,
    /// The SHA-256 the rollout was given; else the learned one is handed out.
    pub sha256: Option<String>,
    pub hosts: HashSet<Box<str>, foldhash::fast::FixedState>,
}

impl Pin {
    pub fn holds(&self, hostname: &str) -> bool {
        !self.hosts.is_empty() && self.hosts.contains(hostname)
    }
}

/// Every rollout's pins, the newest rollout first: a host takes the first pin of its
/// agent that holds it.
#[derive(Debug, Default)]
pub struct Pins(pub Vec<Arc<Pin>>);

/// A config ready to answer heartbeats.
#[derive(Debug)]
pub struct Desired {
    pub config: Arc<Config>,
    /// The rollouts' pins this snapshot answers with.
    pub pins: Arc<Pins>,
    agents: Vec<CompiledAgent>,
    /// What ops-meta learned of each tarball's digests (by tarball URL) when this snapshot
    /// was compiled; configured `sha256` values win over these.
    pub digests: Arc<Digests>,
    /// The whole answer for hosts that match no override: shared by reference count, so
    /// most heartbeats neither allocate nor copy their answer.
    default_response: Bytes,
}

#[derive(Debug)]
struct CompiledAgent {
    default: AgentDefault,
    others: Vec<AgentOverride>,
    /// The pins of this agent, newest rollout first.
    pins: Vec<Arc<Pin>>,
    /// JSON of the answer for hosts that match no override.
    default_json: Box<[u8]>,
}

/// Start of every answer: the original's envelope with an empty error.
const HEAD: &[u8] = br#"{"errorMessage":"","desiredAgents":["#;
const TAIL: &[u8] = b"]}";

impl Desired {
    /// Compiles `config` with the digests ops-meta learned so far, without rollouts.
    pub fn compile(config: Arc<Config>, digests: Arc<Digests>) -> Desired {
        Desired::compile_with(config, digests, Arc::default())
    }

    /// Compiles `config` with the digests ops-meta learned so far and the rollouts' pins.
    pub fn compile_with(config: Arc<Config>, digests: Arc<Digests>, pins: Arc<Pins>) -> Desired {
        let mut agents = Vec::new();
        for a in &config.agents {
            // An entry without default is skipped, as in the original.
            let Some(d) = &a.default else { continue };
            let mut c = CompiledAgent {
                default: d.clone(),
                others: a.others.clone(),
                pins: pins
                    .0
                    .iter()
                    .filter(|p| p.agent == d.name)
                    .cloned()
                    .collect(),
                default_json: Box::new([]),
            };
            let da = c.merge("", &digests, false);
            c.default_json = serde_json::to_vec(&da)
                .expect("serializing strings cannot fail")
                .into_boxed_slice();
            agents.push(c);
        }
        let mut d = Desired {
            config,
            pins,
            agents,
            digests,
            default_response: Bytes::new(),
        };
        let mut out = Vec::new();
        d.write_agents(&mut out, None);
        d.default_response = Bytes::from(out);
        d
    }

    /// Every tarball the desired state can hand out, for learning its digests. The
    /// overrides that match one hostname are all prefixes of it, so they are exactly the
    /// overrides that match its longest matching prefix: merging for each override's own
    /// prefix (and for a host no override matches) yields every answer there can be.
    pub fn artifacts(&self) -> Vec<Artifact> {
        let mut out = BTreeSet::new();
        // Merged without learned digests, a `sha256` present is a configured one.
        let none = Digests::new();
        for a in &self.agents {
            let hosts =
                std::iter::once(None).chain(a.others.iter().map(|o| Some(o.prefix.as_str())));
            for h in hosts {
                let d = match h {
                    None => a.merge("", &none, false),
                    Some(p) => a.merge(p, &none, true),
                };
                if d.tarball.is_empty() {
                    continue;
                }
                out.insert(Artifact {
                    file: d.tarball_file(),
                    tarball_url: d.tarball_url(),
                    md5_url: d.md5_url(),
                    sha256_configured: d.sha256.is_some(),
                });
            }
            for p in &a.pins {
                let d = a.pinned(a.merge("", &none, false), p, &none);
                out.insert(Artifact {
                    file: d.tarball_file(),
                    tarball_url: d.tarball_url(),
                    md5_url: d.md5_url(),
                    sha256_configured: d.sha256.is_some(),
                });
            }
        }
        out.into_iter().collect()
    }

    /// What is known of the tarball at `url`.
    pub fn known(&self, url: &str) -> Option<&Known> {
        self.digests.get(url)
    }

    /// The desired agents for `hostname`, as proto types.
    pub fn for_host(&self, hostname: &str) -> Vec<DesiredAgent> {
        self.agents
            .iter()
            .map(|a| a.merge(hostname, &self.digests, true))
            .collect()
    }

    /// Appends the whole heartbeat answer for `hostname` to `out`: the same bytes as
    /// `serde_json::to_vec(&HeartbeatResponse{..})`, mostly copied from pre-serialized parts.
    pub fn write_response(&self, hostname: &str, out: &mut Vec<u8>) {
        self.write_agents(out, Some(hostname));
    }

    /// The whole heartbeat answer for `hostname`, as [`Desired::write_response`] writes it;
    /// the prebuilt one when no override matches the host.
    pub fn response_bytes(&self, hostname: &str) -> Bytes {
        if !self.agents.iter().any(|a| a.matches(hostname)) {
            return self.default_response.clone();
        }
        let mut out = Vec::with_capacity(self.default_response.len() + 64 * self.agents.len());
        self.write_response(hostname, &mut out);
        Bytes::from(out)
    }

    /// The answer: each agent merged for `hostname` when one of its overrides matches it,
    /// its prebuilt default JSON otherwise (always with `None`).
    fn write_agents(&self, out: &mut Vec<u8>, hostname: Option<&str>) {
        out.extend_from_slice(HEAD);
        for (i, a) in self.agents.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            match hostname {
                Some(h) if a.matches(h) => {
                    let da = a.merge(h, &self.digests, true);
                    serde_json::to_writer(&mut *out, &da).expect("writing to a Vec cannot fail");
                }
                _ => out.extend_from_slice(&a.default_json),
            }
        }
        out.extend_from_slice(TAIL);
    }

    /// The version `cfg.json` alone (no rollout) gives `hostname` of `agent`, and the
    /// tarball base; `None` when the config has no such agent.
    pub fn baseline(&self, agent: &str, hostname: &str) -> Option<(String, String)> {
        let a = self
            .agents
            .iter()
            .find(|a| a.default.name.as_str() == agent)?;
        let d = a.merge(hostname, &Digests::new(), true);
        let pinned = a.pins.iter().any(|p| p.holds(hostname));
        let version = if pinned {
            a.configured_version(hostname).to_string()
        } else {
            d.version
        };
        let tarball = if pinned {
            let mut t = a.default.tarball.as_str();
            for o in a.others.iter().filter(|o| hostname.starts_with(&o.prefix)) {
                if !o.tarball.is_empty() {
                    t = &o.tarball;
                }
            }
            t.to_string()
        } else {
            d.tarball
        };
        Some((version, tarball))
    }

    /// The name of each agent, checked, in the order of [`Desired::for_host`].
    pub fn agent_names(&self) -> impl Iterator<Item = &AgentName> {
        self.agents.iter().map(|a| &a.default.name)
    }

    /// BootAgent `envs` and `limits` of each agent for `hostname`, in the order of
    /// [`Desired::for_host`]: the default's, each replaced whole by every matching
    /// override that sets it (in order, later wins).
    pub fn extras_for(
        &self,
        hostname: &str,
    ) -> Vec<(BTreeMap<String, String>, BTreeMap<String, String>)> {
        self.agents
            .iter()
            .map(|a| {
                let (mut envs, mut limits) = (&a.default.envs, &a.default.limits);
                for o in a.others.iter().filter(|o| hostname.starts_with(&o.prefix)) {
                    if !o.envs.is_empty() {
                        envs = &o.envs;
                    }
                    if !o.limits.is_empty() {
                        limits = &o.limits;
                    }
                }
                (envs.clone(), limits.clone())
            })
            .collect()
    }

    /// The answer for `hostname` as a proto value (tests and debug logs).
    pub fn response(&self, hostname: &str) -> HeartbeatResponse {
        HeartbeatResponse {
            error_message: String::new(),
            desired_agents: self.for_host(hostname),
        }
    }
}

impl CompiledAgent {
    /// True when an override or a rollout's pin of this agent applies to `hostname`.
    fn matches(&self, hostname: &str) -> bool {
        self.others.iter().any(|o| hostname.starts_with(&o.prefix))
            || self.pins.iter().any(|p| p.holds(hostname))
    }

    /// `d` (this agent merged for a host) as the rollout of `pin` changes it: its version,
    /// its tarball when it names one (the `.md5` then beside it), its digest.
    fn pinned(&self, mut d: DesiredAgent, pin: &Pin, digests: &Digests) -> DesiredAgent {
        d.version = pin.version.clone();
        if !pin.tarball.is_empty() {
            d.tarball = pin.tarball.clone();
            d.md5 = String::new();
        }
        d.sha256 = pin
            .sha256
            .clone()
            .or_else(|| digests.get(&d.tarball_url()).and_then(|k| k.sha256.clone()));
        d
    }

    /// Default, then every override whose prefix starts `hostname`, in order; each
    /// non-empty field wins. With `overrides` false, the default alone.
    fn merge(&self, hostname: &str, digests: &Digests, overrides: bool) -> DesiredAgent {
        let d = &self.default;
        let mut version = d.version.as_str();
        // A configured sha256 belongs to the version written in the same entry; track the
        // one of the entry that set the final version.
        let mut sha = d.sha256.as_deref();
        let (mut tarball, mut md5, mut cmd) = (d.tarball.as_str(), d.md5.as_str(), d.cmd.as_str());
        let (mut envs, mut limits) = (&d.envs, &d.limits);
        if overrides {
            for o in self
                .others
                .iter()
                .filter(|o| hostname.starts_with(&o.prefix))
            {
                if !o.version.is_empty() {
                    version = &o.version;
                    sha = o.sha256.as_deref();
                }
                if !o.tarball.is_empty() {
                    tarball = &o.tarball;
                }
                if !o.md5.is_empty() {
                    md5 = &o.md5;
                }
                if !o.cmd.is_empty() {
                    cmd = &o.cmd;
                }
                if !o.envs.is_empty() {
                    envs = &o.envs;
                }
                if !o.limits.is_empty() {
                    limits = &o.limits;
                }
            }
        }
        let sha256 = sha.map(str::to_string).or_else(|| {
            let url = proto::legacy::join_url(
                tarball,
                &proto::legacy::tarball_file(d.name.as_str(), version),
            );
            digests.get(&url).and_then(|k| k.sha256.clone())
        });
        let out = DesiredAgent {
            name: d.name.to_string(),
            version: version.to_string(),
            tarball: tarball.to_string(),
            md5: md5.to_string(),
            cmd: cmd.to_string(),
            sha256,
            // Extensions of the legacy answer (original updaters ignore them); absent when
            // the config sets none, so the original shape is kept.
            envs: (!envs.is_empty()).then(|| envs.clone()),
            limits: (!limits.is_empty()).then(|| limits.clone()),
        };
        match overrides
            .then(|| self.pins.iter().find(|p| p.holds(hostname)))
            .flatten()
        {
            Some(pin) => self.pinned(out, pin, digests),
            None => out,
        }
    }

    /// The version the config (defaults and overrides, without rollouts) gives `hostname`.
    fn configured_version(&self, hostname: &str) -> &str {
        let mut version = self.default.version.as_str();
        for o in self
            .others
            .iter()
            .filter(|o| hostname.starts_with(&o.prefix))
        {
            if !o.version.is_empty() {
                version = &o.version;
            }
        }
        version
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digests(list: &[(&str, &str)]) -> Arc<Digests> {
        Arc::new(
            list.iter()
                .map(|(url, byte)| {
                    let k = Known {
                        sha256: Some(byte.repeat(32)),
                        ..Known::default()
                    };
                    (url.to_string(), k)
                })
                .collect(),
        )
    }

    fn cfg(text: &str) -> Arc<Config> {
        Arc::new(crate::config::parse(text).unwrap().config)
    }

    const TWO: &str = r#"{"tarballDir": "t", "http": {"enabled": true, "listen": ":1"},
      "agents": [
        {"default": {"name": "falcon", "version": "1.0", "tarball": "http://d/t", "md5": "http://d/m", "cmd": "start"},
         "others": [
           {"prefix": "lg-", "version": "2.0", "tarball": "", "md5": "", "cmd": ""},
           {"prefix": "lg-falcon", "version": "", "tarball": "http://canary/t", "md5": "", "cmd": ""},
           {"prefix": "lg-falcon-9", "version": "3.0", "tarball": "", "md5": "", "cmd": "stop"},
           {"prefix": "db", "version": "", "tarball": "", "md5": "http://dbm/", "cmd": ""}
         ]},
        {"others": [{"prefix": "x", "version": "9"}]},
        {"default": {"name": "logger", "version": "0.1", "tarball": "http://d/t", "md5": "", "cmd": "stop"}}
      ]}"#;

    #[test]
    fn prefix_overrides_apply_in_order_and_later_wins() {
        let d = Desired::compile(cfg(TWO), Default::default());
        // (hostname, version, tarball, md5, cmd) of falcon.
        let table = [
            ("web-1", "1.0", "http://d/t", "http://d/m", "start"),
            ("lg-1", "2.0", "http://d/t", "http://d/m", "start"),
            (
                "lg-falcon-1",
                "2.0",
                "http://canary/t",
                "http://d/m",
                "start",
            ),
            (
                "lg-falcon-99",
                "3.0",
                "http://canary/t",
                "http://d/m",
                "stop",
            ),
            ("db-1", "1.0", "http://d/t", "http://dbm/", "start"),
            ("LG-1", "1.0", "http://d/t", "http://d/m", "start"),
            ("xlg-1", "1.0", "http://d/t", "http://d/m", "start"),
        ];
        for (host, v, t, m, c) in table {
            let got = d.for_host(host);
            assert_eq!(got.len(), 2, "agent entry without default is skipped");
            let f = &got[0];
            assert_eq!(
                (
                    f.version.as_str(),
                    f.tarball.as_str(),
                    f.md5.as_str(),
                    f.cmd.as_str()
                ),
                (v, t, m, c),
                "host {host}"
            );
            assert_eq!(got[1].name, "logger");
        }
    }

    #[test]
    fn fast_writer_matches_proto_serialization() {
        let d = Desired::compile(cfg(TWO), digests(&[("http://d/t/falcon-2.0.tar.gz", "ab")]));
        for host in ["web-1", "lg-1", "lg-falcon-99", "db-1", "\"quote"] {
            let mut out = Vec::new();
            d.write_response(host, &mut out);
            let want = serde_json::to_vec(&d.response(host)).unwrap();
            assert_eq!(d.response_bytes(host), want, "host {host}");
            assert_eq!(
                String::from_utf8(out).unwrap(),
                String::from_utf8(want).unwrap()
            );
        }
        let empty = Desired::compile(cfg(r#"{"agents": []}"#), Default::default());
        assert_eq!(
            empty.response_bytes("h"),
            &br#"{"errorMessage":"","desiredAgents":[]}"#[..]
        );
        let mut out = Vec::new();
        empty.write_response("h", &mut out);
        assert_eq!(out, br#"{"errorMessage":"","desiredAgents":[]}"#);
    }

    #[test]
    fn sha256_belongs_to_its_version() {
        let a = "aa".repeat(32);
        let b = "bb".repeat(32);
        let c = "cc".repeat(32);
        let text = format!(
            r#"{{"agents": [{{"default": {{"name": "f", "version": "1", "tarball": "http://d", "cmd": "start", "sha256": "{a}"}},
              "others": [{{"prefix": "canary", "version": "2"}},
                         {{"prefix": "canary-b", "version": "3", "sha256": "{b}"}},
                         {{"prefix": "canary-bt", "tarball": "http://other"}}]}}]}}"#
        );
        let d = Desired::compile(
            cfg(&text),
            digests(&[("http://d/f-2.tar.gz", "cc"), ("http://d/f-1.tar.gz", "dd")]),
        );
        let sha = |h: &str| d.for_host(h)[0].sha256.clone();
        // Configured values win over computed ones.
        assert_eq!(sha("web"), Some(a.clone()));
        // The default's sha does not follow a version change; the computed one is used.
        assert_eq!(sha("canary-1"), Some(c));
        assert_eq!(sha("canary-b1"), Some(b.clone()));
        assert_eq!(sha("canary-bt"), Some(b));
        let none = Desired::compile(cfg(&text), Default::default());
        assert_eq!(none.for_host("canary-1")[0].sha256, None);
        // A digest learned for one URL is not used for the same file name at another.
        let elsewhere = Desired::compile(cfg(&text), digests(&[("http://other/f-2.tar.gz", "ee")]));
        assert_eq!(elsewhere.for_host("canary-1")[0].sha256, None);
        let urls: Vec<String> = none
            .artifacts()
            .into_iter()
            .map(|a| a.tarball_url)
            .collect();
        assert_eq!(
            urls,
            vec![
                "http://d/f-1.tar.gz",
                "http://d/f-2.tar.gz",
                "http://d/f-3.tar.gz",
                "http://other/f-3.tar.gz"
            ]
        );
    }
}
