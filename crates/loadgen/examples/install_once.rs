//! Installs one agent version once with the updater's own artifact code (download with
//! MD5 + SHA-256 while streaming, verify, unpack safely, mark complete) and prints how long
//! it took. `bench/run` times it against `curl -o`, `md5sum -c`, `tar xzf`.
//!
//!   install_once --tarball-base http://127.0.0.1:2000/big --name bigagent --version 1.0.0 --agent-dir DIR

use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use updater::artifact::{install, Fetcher, Limits, Want};

#[derive(Debug, Parser)]
struct Args {
    /// Base URL of the tarball, as in a heartbeat answer's `tarball` field.
    #[arg(long)]
    tarball_base: String,
    #[arg(long)]
    name: proto::names::AgentName,
    #[arg(long)]
    version: proto::names::Version,
    /// `<workdir>/<agent>`: the version folder is made inside it.
    #[arg(long)]
    agent_dir: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let tarball_url = proto::names::tarball_url(&args.tarball_base, &args.name, &args.version);
    let md5_url = proto::names::md5_url(&args.tarball_base, &args.name, &args.version);
    std::fs::create_dir_all(&args.agent_dir)?;
    let fetcher = Fetcher::new(Limits::default())?;
    let started = Instant::now();
    let dir = install(
        &fetcher,
        &args.agent_dir,
        &args.name,
        &args.version,
        &tarball_url,
        Some(&md5_url),
        Want {
            md5: None,
            sha256: None,
        },
    )
    .await?;
    println!(
        "installed {} in {:.3}s",
        dir.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
