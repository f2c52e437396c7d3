//! `opsctl`, the operator CLI of ops-meta: presentation only, over ops-meta's HTTP API
//! (`/api/...`), plus `publish`, which puts a release into a `tarballDir`.
//!
//! The binary (`main.rs`) parses flags and calls [`run`]; everything that decides or
//! draws something is a pure function here, tested beside its code.

pub mod cli;
pub mod client;
pub mod config;
pub mod error;
pub mod hosts;
pub mod jobs;
pub mod publish;
pub mod rollout;
pub mod table;

use std::io::Write;

use clap::CommandFactory;

pub use error::{exit, Error};

/// Runs one command; the exit code on success (rollout `watch` and `status --exit-status`
/// answer more than 0).
pub fn run(cli: cli::Cli) -> Result<u8, Error> {
    use cli::Command;
    let g = &cli.global;
    match cli.command {
        Command::Publish(p) => publish::run(&p),
        Command::Completions { shell } => {
            let mut cmd = cli::Cli::command();
            let mut out = std::io::stdout().lock();
            clap_complete::generate(shell, &mut cmd, "opsctl", &mut out);
            out.flush()
                .map_err(|e| Error::Other(format!("writing stdout: {e}")))?;
            Ok(exit::OK)
        }
        Command::Hosts(a) => hosts::list(&connect(g)?, g.json, &a),
        Command::Host { name } => hosts::show(&connect(g)?, g.json, &name),
        Command::Readmit { host } => hosts::readmit(&connect(g)?, g.json, &host),
        Command::Jobs(j) => jobs::run(&connect(g)?, g.json, &j.command),
        Command::Retry(r) => jobs::retry(&connect(g)?, g.json, &r),
        Command::Audit { limit, before } => jobs::audit(&connect(g)?, g.json, limit, before),
        Command::Rollout(r) => rollout::run(&connect(g)?, g.json, &r.command),
    }
}

fn connect(g: &cli::Global) -> Result<client::Client, Error> {
    let settings = config::resolve(g, &|k| std::env::var(k).ok())?;
    client::Client::new(&settings)
}

/// Writes `text` to stdout; a closed pipe (`opsctl hosts | head`) is not an error.
pub fn print(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    if !text.is_empty() && !text.ends_with('\n') {
        let _ = out.write_all(b"\n");
    }
    let _ = out.flush();
}
