//! `ops-loadgen` command line: parses flags, runs the library, prints the report.

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};

use loadgen::client::Target;
use loadgen::failure::{FailMode, FailSpec};
use loadgen::fleet::Fleet;
use loadgen::wire::Protocol;
use loadgen::{ConvergeSpec, Mode, RunError, Settings};

/// Exit code for bad flags or settings (EX_USAGE).
const EXIT_USAGE: u8 = 64;

/// Simulate a fleet of hosts against an ops-meta and report throughput, latency, errors
/// and rollout times.
#[derive(Debug, Parser)]
#[command(name = "ops-loadgen", version)]
struct Cli {
    #[command(subcommand)]
    mode: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Closed loop: every connection sends its next request as soon as the answer came.
    Closed {
        #[command(flatten)]
        common: Common,
        /// Seconds to run (default 10 when --requests is not given either).
        #[arg(long)]
        duration: Option<f64>,
        /// Stop after this many requests in all; --requests equal to --hosts reports every
        /// host exactly once (to fill a server).
        #[arg(long)]
        requests: Option<u64>,
    },
    /// Open loop: a fixed aggregate rate; latency counts from when a request was due.
    Open {
        #[command(flatten)]
        common: Common,
        /// Requests per second, in all.
        #[arg(long)]
        rate: f64,
        /// Seconds to run.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
    },
    /// Converge: hosts heartbeat every --interval on a random phase and install what they
    /// are told; reports how long until 50/99/100 % run --expect-version.
    Converge {
        #[command(flatten)]
        common: Common,
        /// Heartbeat interval of every host, in seconds.
        #[arg(long)]
        interval: f64,
        /// The version the rollout installs; a host is converged when all its agents run it.
        #[arg(long)]
        expect_version: String,
        /// Make the change this many seconds after the start: install --new-config over
        /// --meta-config (when given) and GET /config/reload. Without it, the clock starts
        /// at the first answer naming --expect-version.
        #[arg(long)]
        reload_after: Option<f64>,
        /// Config file to install as the server's config at --reload-after.
        #[arg(long, requires = "meta_config")]
        new_config: Option<PathBuf>,
        /// The server's config file, replaced by --new-config.
        #[arg(long, requires = "new_config")]
        meta_config: Option<PathBuf>,
        /// Give up after this many seconds (default: reload time + 3 intervals + settle).
        #[arg(long)]
        max_duration: Option<f64>,
        /// Keep heartbeating this many seconds after the last host converged, so the
        /// server hears every host's new version.
        #[arg(long, default_value_t = 0.0)]
        settle: f64,
        /// Seed of the random heartbeat phases.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Share (0 to 1) of the hosts that fail --fail-version, picked by a stable hash
        /// of the hostname (SHA-256 of "loadgen-fail:" + hostname, not ops-meta's
        /// percentage buckets). They never converge and are counted apart.
        #[arg(long)]
        fail_share: Option<f64>,
        /// The version the failing hosts fail (default: --expect-version); every other
        /// version installs as usual.
        #[arg(long, requires = "fail_share")]
        fail_version: Option<String>,
        /// How they fail: never-start (the old version keeps running, one rolled_back
        /// event), crash-after=SECS (exited + restarted events, fatal after 3 crashes) or
        /// oom-after=SECS (the same with killed events).
        #[arg(long, default_value = "never-start", requires = "fail_share")]
        fail_mode: String,
        /// Run to --max-duration even when every host converged or failed, following
        /// whatever version the server hands out (a rollback, say).
        #[arg(long)]
        keep_going: bool,
    },
}

#[derive(Debug, Args)]
struct Common {
    /// Base URL of the server.
    #[arg(long, default_value = "http://127.0.0.1:2000")]
    url: String,
    /// Protocol the hosts speak.
    #[arg(long, value_enum, default_value_t = ProtocolArg::Legacy)]
    protocol: ProtocolArg,
    /// Distinct simulated hosts.
    #[arg(long, default_value_t = 10_000)]
    hosts: u64,
    /// Agents per host.
    #[arg(long, default_value_t = 3)]
    agents: usize,
    /// Agent names are this prefix and a number.
    #[arg(long, default_value = "agent-")]
    agent_prefix: String,
    /// Hostnames are this prefix and a 9-digit number.
    #[arg(long, default_value = "sim-")]
    host_prefix: String,
    /// Version the agents run at the start.
    #[arg(long = "agent-version", default_value = "1.0.0")]
    agent_version: String,
    /// Concurrent connections (one worker each).
    #[arg(long, short = 'c', default_value_t = 64)]
    connections: usize,
    /// Runtime threads (default: one per CPU).
    #[arg(long)]
    threads: Option<usize>,
    /// Deadline of one request, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// Print a progress line on stderr every second even when it is not a terminal.
    #[arg(long)]
    progress: bool,
    /// BootAgent: the hosts registered in an earlier run (with the same --hosts and
    /// --host-prefix), so they report at once, as a fleet does after its server
    /// restarted; a host the server refuses registers again.
    #[arg(long)]
    registered: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ProtocolArg {
    Legacy,
    Bootagent,
}

fn secs(what: &str, v: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(v)
        .map_err(|_| anyhow::anyhow!("{what} must be a non-negative number of seconds, got {v}"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let common = match &cli.mode {
        Cmd::Closed { common, .. } | Cmd::Open { common, .. } | Cmd::Converge { common, .. } => {
            common
        }
    };
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if let Some(t) = common.threads {
        rt.worker_threads(t.max(1));
    }
    let rt = match rt.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ops-loadgen: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(real_main(&cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ops-loadgen: {e:#}");
            let usage = e
                .downcast_ref::<RunError>()
                .is_some_and(|r| matches!(r, RunError::Config(_)))
                || e.downcast_ref::<loadgen::ConfigError>().is_some()
                || e.downcast_ref::<Usage>().is_some();
            ExitCode::from(if usage { EXIT_USAGE } else { 1 })
        }
    }
}

/// A flag that makes no sense; exits with EX_USAGE.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Usage(String);

async fn real_main(cli: &Cli) -> anyhow::Result<()> {
    let (common, mode) = match &cli.mode {
        Cmd::Closed {
            common,
            duration,
            requests,
        } => (
            common,
            Mode::Closed {
                duration: duration
                    .map(|d| secs("--duration", d))
                    .transpose()
                    .map_err(usage)?,
                requests: *requests,
            },
        ),
        Cmd::Open {
            common,
            rate,
            duration,
        } => (
            common,
            Mode::Open {
                rate: *rate,
                duration: secs("--duration", *duration).map_err(usage)?,
            },
        ),
        Cmd::Converge {
            common,
            interval,
            expect_version,
            reload_after,
            new_config,
            meta_config,
            max_duration,
            settle,
            seed,
            fail_share,
            fail_version,
            fail_mode,
            keep_going,
        } => {
            let interval = secs("--interval", *interval).map_err(usage)?;
            let reload_after = reload_after
                .map(|r| secs("--reload-after", r))
                .transpose()
                .map_err(usage)?;
            let max_duration = match max_duration {
                Some(m) => secs("--max-duration", *m).map_err(usage)?,
                None => {
                    reload_after.unwrap_or_default()
                        + interval * 3
                        + secs("--settle", *settle).map_err(usage)?
                }
            };
            let failure = match fail_share {
                Some(share) => Some(FailSpec {
                    share: *share,
                    version: fail_version
                        .clone()
                        .unwrap_or_else(|| expect_version.clone()),
                    mode: fail_mode
                        .parse::<FailMode>()
                        .map_err(|e| Usage(format!("--fail-mode: {e}")))?,
                }),
                None => None,
            };
            (
                common,
                Mode::Converge(ConvergeSpec {
                    interval,
                    expect_version: expect_version.clone(),
                    reload_after,
                    new_config: new_config.clone(),
                    meta_config: meta_config.clone(),
                    max_duration,
                    settle: secs("--settle", *settle).map_err(usage)?,
                    seed: *seed,
                    failure,
                    keep_going: *keep_going,
                }),
            )
        }
    };
    let fleet = Fleet::new(
        common.hosts,
        common.agents,
        &common.agent_prefix,
        &common.host_prefix,
        &common.agent_version,
    )?;
    let settings = Settings {
        target: Target::resolve(&common.url).await?,
        protocol: match common.protocol {
            ProtocolArg::Legacy => Protocol::Legacy,
            ProtocolArg::Bootagent => Protocol::BootAgent,
        },
        fleet,
        connections: common.connections,
        timeout: Duration::from_millis(common.timeout_ms),
        progress: common.progress || std::io::stderr().is_terminal(),
        registered: common.registered,
    };
    let report = loadgen::run(settings, mode).await?;
    let stdout = std::io::stdout();
    if common.json {
        serde_json::to_writer_pretty(stdout.lock(), &report).context("write report")?;
        println!();
    } else {
        report.write_text(stdout.lock()).context("write report")?;
    }
    Ok(())
}

fn usage(e: anyhow::Error) -> anyhow::Error {
    anyhow::Error::new(Usage(format!("{e:#}")))
}
