//! `ops-meta`: flags, logging, then the library does the work.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

// The heartbeat path allocates a few small buffers per request; the profile showed the
// system allocator at about a tenth of ops-meta's CPU (docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// EX_CONFIG from sysexits.h: the config file is unusable.
const EX_CONFIG: u8 = 78;

/// The server of the agent updater: desired state, fleet status and agent tarballs.
#[derive(Debug, Parser)]
#[command(name = "ops-meta", disable_version_flag = true)]
struct Args {
    /// Config file.
    #[arg(short = 'c', long = "config", default_value = "cfg.json")]
    config: PathBuf,
    /// Print the version and exit.
    #[arg(short = 'v', long = "version")]
    version: bool,
    /// Check the config file, print every problem, and exit (non-zero on error).
    #[arg(short = 'T', long = "test-config")]
    test: bool,
    /// Runtime worker threads (default: one per CPU). Fewer leaves cores to whatever
    /// shares the machine; one thread avoids cross-core wake-ups when it is shared.
    #[arg(long = "threads", value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    threads: Option<u16>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.version {
        println!("{}", meta::VERSION);
        return ExitCode::SUCCESS;
    }
    if args.test {
        return check(&args.config);
    }
    // Colours only on a terminal: log files and journald get plain text.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = args.threads {
        builder.worker_threads(n.into());
    }
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ops-meta: start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(meta::run(&args.config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let e = anyhow::Error::from(e);
            tracing::error!("{e:#}");
            eprintln!("ops-meta: {e:#}");
            let config = e
                .downcast_ref::<meta::RunError>()
                .is_some_and(|r| r.is_config());
            if config {
                ExitCode::from(EX_CONFIG)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// `-T`: every warning and error, one per line with its field, then a verdict.
fn check(path: &std::path::Path) -> ExitCode {
    match meta::config::load(path) {
        Ok(l) => {
            for w in &l.warnings {
                println!("warning: {w}");
            }
            println!("config {}: ok", path.display());
            ExitCode::SUCCESS
        }
        Err(meta::config::ConfigError::Invalid {
            errors, warnings, ..
        }) => {
            for w in &warnings {
                println!("warning: {w}");
            }
            for e in &errors {
                println!("error: {e}");
            }
            eprintln!("config {}: {} error(s)", path.display(), errors.len());
            ExitCode::from(EX_CONFIG)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(EX_CONFIG)
        }
    }
}
