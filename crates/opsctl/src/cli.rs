//! The command line: every command and flag of `opsctl` (clap derive).

use std::path::PathBuf;

use clap::{ArgGroup, Args, Parser, Subcommand};

/// Shown under `opsctl --help`: what a script can branch on.
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
   0  ok (rollout watch/status: completed)
   1  any other error
   2  usage: bad flags or arguments, or the server refused the request (400)
   3  not found (404): no such host, batch or rollout, or no host matched
   4  not allowed (401, 403): no token, or one that may not do this
   5  conflict (409): wrong state, another active rollout; publish: a different release exists
   6  server unreachable, timed out, or 5xx
  10  rollout paused (watch --until-paused, status --exit-status)
  11  rollout aborted, rolled back or superseded (watch, status --exit-status)
  12  rollout planned or still running (status --exit-status)

Server and token: --server / --token, else OPSCTL_SERVER / OPSCTL_TOKEN, else the config
file ($OPSCTL_CONFIG, default ~/.config/opsctl/config.json: {\"server\": ..., \"token\": ...},
mode 0600 when it holds a token), else http://127.0.0.1:2000 without a token.";

#[derive(Debug, Parser)]
#[command(
    name = "opsctl",
    version,
    about = "The operator CLI of ops-meta: hosts, jobs, staged rollouts, publishing releases",
    after_help = EXIT_CODES_HELP
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// Flags every command takes.
#[derive(Debug, Clone, Default, Args)]
pub struct Global {
    /// ops-meta's base URL [env: OPSCTL_SERVER; default http://127.0.0.1:2000]
    #[arg(long, global = true, value_name = "URL")]
    pub server: Option<String>,
    /// Bearer token (prefer OPSCTL_TOKEN or the config file: a flag shows in `ps`)
    #[arg(long, global = true, value_name = "TOKEN")]
    pub token: Option<String>,
    /// Print the server's JSON as it is, for scripts
    #[arg(long, global = true)]
    pub json: bool,
    /// Trust only the CA certificates of this PEM file for an https:// server
    #[arg(long, global = true, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Seconds one request may take
    #[arg(long, global = true, value_name = "SECS", default_value_t = 30)]
    pub timeout: u64,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// List hosts: one line per host and agent
    Hosts(HostsArgs),
    /// Show one host: agents, pending jobs, why jobs wait, results, events
    Host {
        /// The hostname
        name: String,
    },
    /// Queue operator jobs (restart, stop, uninstall, reset, config) and follow them
    Jobs(JobsArgs),
    /// Forget failed derived jobs and operator holds, so the desired state is derived again
    Retry(RetryArgs),
    /// Forget a BootAgent host's credential so that its next registration is admitted
    Readmit {
        /// The hostname
        host: String,
    },
    /// Show the audit log of operator actions, newest first
    Audit {
        /// Entries to show (1-1000)
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// Entries older than this id (the next page)
        #[arg(long, value_name = "ID")]
        before: Option<i64>,
    },
    /// Staged rollouts of one agent version across waves of hosts
    Rollout(RolloutArgs),
    /// Put a release into ops-meta's tarballDir with its .md5, .sha256 (and .minisig)
    Publish(PublishArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell)
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Clone, Default, Args)]
pub struct HostsArgs {
    /// Only hosts running (or reporting) this agent
    #[arg(long)]
    pub agent: Option<String>,
    /// Only agents at this version
    #[arg(long)]
    pub version: Option<String>,
    /// Only agents in this state (running, stoped, started, fatal, ...)
    #[arg(long)]
    pub state: Option<String>,
    /// Only hosts whose name starts with this (asked of the server)
    #[arg(long)]
    pub prefix: Option<String>,
    /// Only hosts carrying these tags, key=value[,key=value] (asked of the server)
    #[arg(long)]
    pub tag: Option<String>,
}

/// Exactly one way to pick hosts.
#[derive(Debug, Clone, Default, Args)]
#[group(required = true, multiple = false)]
pub struct Selector {
    /// These hosts, comma-separated
    #[arg(long, value_delimiter = ',', value_name = "HOST,...")]
    pub hosts: Vec<String>,
    /// Every registered host whose name starts with this
    #[arg(long)]
    pub prefix: Option<String>,
    /// Every registered host carrying these tags, key=value[,key=value]
    #[arg(long, value_name = "KEY=VALUE")]
    pub tag: Option<String>,
}

#[derive(Debug, Args)]
pub struct JobsArgs {
    #[command(subcommand)]
    pub command: JobsCommand,
}

#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    /// Restart an agent on the selected hosts
    Restart(AgentJob),
    /// Stop an agent (and hold it stopped) on the selected hosts
    Stop(AgentJob),
    /// Uninstall an agent from the selected hosts that report it
    Uninstall(AgentJob),
    /// Clear an agent's failure count (a fatal agent may start again)
    Reset(AgentJob),
    /// Change the host daemon's server list and/or report step
    Config(ConfigJob),
    /// Show where each job of a batch stands
    Status {
        /// The batch id `opsctl jobs ...` printed
        batch: String,
        /// Poll every second until no job is pending; exit 1 when any failed or was lost
        #[arg(long)]
        wait: bool,
    },
}

#[derive(Debug, Clone, Args)]
pub struct AgentJob {
    /// The agent
    pub agent: String,
    #[command(flatten)]
    pub select: Selector,
}

#[derive(Debug, Clone, Args)]
#[command(group(ArgGroup::new("change").required(true).multiple(true).args(["svrlist", "step"])))]
pub struct ConfigJob {
    /// Extra servers, HOST:PORT,HOST:PORT
    #[arg(long)]
    pub svrlist: Option<String>,
    /// New report step in seconds
    #[arg(long)]
    pub step: Option<u64>,
    #[command(flatten)]
    pub select: Selector,
}

#[derive(Debug, Clone, Args)]
pub struct RetryArgs {
    /// Only this agent (every agent when left out)
    pub agent: Option<String>,
    #[command(flatten)]
    pub select: Selector,
}

#[derive(Debug, Args)]
pub struct RolloutArgs {
    #[command(subcommand)]
    pub command: RolloutCommand,
}

#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// Show what a rollout would do (dry run: nothing is stored)
    Plan(SpecArgs),
    /// Create a rollout (planned; running with --start)
    Create {
        #[command(flatten)]
        spec: SpecArgs,
        /// Start it at once
        #[arg(long)]
        start: bool,
    },
    /// Start a planned rollout
    Start { id: String },
    /// Pause a running rollout
    Pause {
        id: String,
        /// Why, as status shows it
        #[arg(long)]
        reason: Option<String>,
    },
    /// Resume a paused rollout
    Resume { id: String },
    /// Let a rollout that waits for approval go on to its next wave
    Approve { id: String },
    /// Abort a rollout: no more hosts are admitted, those upgraded stay
    Abort { id: String },
    /// Take the hosts of a rollout back to the version before it (a new rollout)
    Rollback { id: String },
    /// Show a rollout: waves, what holds it, failures
    Status {
        id: String,
        /// Exit 0 completed, 10 paused, 11 aborted/rolled back, 12 planned/running
        #[arg(long)]
        exit_status: bool,
    },
    /// Follow a rollout live until it completes or ends
    Watch {
        id: String,
        /// Seconds between polls
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
        /// Return (exit 10) as soon as it is paused
        #[arg(long)]
        until_paused: bool,
    },
    /// List rollouts, newest first
    List {
        /// Only rollouts of this agent
        #[arg(long)]
        agent: Option<String>,
    },
}

/// A rollout spec as flags, or `--file` with its JSON.
#[derive(Debug, Clone, Default, Args)]
pub struct SpecArgs {
    /// Read the spec (RolloutSpec JSON) from this file (`-`: standard input)
    #[arg(long, value_name = "FILE", conflicts_with_all = [
        "agent", "version", "tarball", "sha256", "waves", "max_in_flight", "min_healthy",
        "healthy_deadline", "missing_after", "max_failures", "max_failure_percent",
        "approval", "window",
    ])]
    pub file: Option<PathBuf>,
    /// The agent, as cfg.json names it
    #[arg(long, required_unless_present = "file")]
    pub agent: Option<String>,
    /// The target version
    #[arg(long, required_unless_present = "file")]
    pub version: Option<String>,
    /// Base URL of the tarball (default: the agent's cfg.json default tarball)
    #[arg(long, value_name = "URL")]
    pub tarball: Option<String>,
    /// The tarball's SHA-256 (hex), when known
    #[arg(long, value_name = "HEX")]
    pub sha256: Option<String>,
    /// A wave, in order: NAME:prefix=web-0,web-1 | NAME:tag=role=canary | NAME:percent=10
    /// (NAME: optional)
    #[arg(
        long = "wave",
        value_name = "NAME:SELECTOR",
        required_unless_present = "file"
    )]
    pub waves: Vec<String>,
    /// Most admitted hosts not healthy yet, at once
    #[arg(long, value_name = "N")]
    pub max_in_flight: Option<u32>,
    /// Seconds a host must run the new version without a restart to count as healthy
    #[arg(long, value_name = "SECS")]
    pub min_healthy: Option<u64>,
    /// Seconds from admission by which a host must be healthy
    #[arg(long, value_name = "SECS")]
    pub healthy_deadline: Option<u64>,
    /// Seconds without a report after which a host is missing
    #[arg(long, value_name = "SECS")]
    pub missing_after: Option<u64>,
    /// Pause when this many hosts of one wave failed
    #[arg(long, value_name = "N")]
    pub max_failures: Option<u32>,
    /// Pause when this share (0-100) of one wave's hosts failed
    #[arg(long, value_name = "P")]
    pub max_failure_percent: Option<f64>,
    /// Wait for `opsctl rollout approve` before each wave after the first
    #[arg(long)]
    pub approval: bool,
    /// Admit hosts only in this window (UTC): [mon,tue,...@]HH:MM-HH:MM
    #[arg(long, value_name = "WINDOW")]
    pub window: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct PublishArgs {
    /// The release: <agent>-<version>.tar.gz
    pub file: PathBuf,
    /// ops-meta's tarballDir
    #[arg(long, value_name = "TARBALL_DIR")]
    pub dir: PathBuf,
    /// A folder under it (created when missing), e.g. falcon/agent
    #[arg(long, value_name = "S")]
    pub subdir: Option<String>,
    /// The agent's name, when the file name alone cannot tell it from the version
    #[arg(long)]
    pub agent: Option<String>,
    /// Sign with this minisign secret key (runs `minisign -S`; asks for its password)
    #[arg(long, value_name = "minisign.key")]
    pub key: Option<PathBuf>,
    /// Replace a different release of the same name
    #[arg(long)]
    pub force: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn selectors_are_exactly_one() {
        let p = |args: &[&str]| Cli::try_parse_from(args.iter().copied());
        assert!(p(&["opsctl", "jobs", "restart", "a", "--hosts", "x,y"]).is_ok());
        assert!(p(&["opsctl", "jobs", "restart", "a"]).is_err());
        assert!(p(&["opsctl", "jobs", "restart", "a", "--prefix", "w", "--tag", "a=b"]).is_err());
        assert!(p(&["opsctl", "jobs", "config", "--prefix", "w"]).is_err());
        assert!(p(&["opsctl", "jobs", "config", "--step", "60", "--prefix", "w"]).is_ok());
        let Command::Jobs(j) = p(&["opsctl", "jobs", "stop", "a", "--hosts", "x,y"])
            .unwrap()
            .command
        else {
            panic!("not jobs")
        };
        let JobsCommand::Stop(job) = j.command else {
            panic!("not stop")
        };
        assert_eq!(job.select.hosts, ["x", "y"]);
    }

    #[test]
    fn a_spec_comes_from_flags_or_a_file_not_both() {
        let p = |args: &[&str]| Cli::try_parse_from(args.iter().copied());
        assert!(p(&["opsctl", "rollout", "plan", "--file", "s.json"]).is_ok());
        assert!(p(&["opsctl", "rollout", "plan", "--file", "s.json", "--agent", "a"]).is_err());
        assert!(p(&[
            "opsctl",
            "rollout",
            "plan",
            "--agent",
            "a",
            "--version",
            "1"
        ])
        .is_err());
        assert!(p(&[
            "opsctl",
            "rollout",
            "create",
            "--agent",
            "a",
            "--version",
            "1",
            "--wave",
            "all:percent=100",
            "--start"
        ])
        .is_ok());
    }
}
