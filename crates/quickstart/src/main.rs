//! `ops-quickstart`: the README's first command. Starts one `ops-meta` and three
//! `ops-updater`s in a temporary folder, publishes a demo agent, and walks through a canary
//! rollout driven by `opsctl` (1.0.0 everywhere; 1.1.0 published and rolled out to the
//! canary host; approved, then 1.1.0 everywhere), printing the fleet status at each step. Everything it started is stopped and removed on exit,
//! including on Ctrl-C.

mod demo;
mod fleet;

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

/// Local demo of a canary rollout with real ops-meta and ops-updater processes.
#[derive(Debug, Parser)]
#[command(name = "ops-quickstart", version)]
struct Args {
    /// How long to wait for each step to converge.
    #[arg(long, default_value_t = 60)]
    step_timeout_secs: u64,
    /// Heartbeat interval of the demo updaters, in seconds.
    #[arg(long, default_value_t = 2)]
    interval: u64,
    /// Keep the temporary folder (its path is printed) instead of removing it.
    #[arg(long)]
    keep: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match fleet::run(&fleet::Options {
        step_timeout: Duration::from_secs(args.step_timeout_secs),
        interval: args.interval,
        keep: args.keep,
    }) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ops-quickstart: {e:#}");
            ExitCode::FAILURE
        }
    }
}
