//! `ops-updater`: flags, logging and signals; everything else is in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use updater::config::{Config, Severity, EXIT_BAD_CONFIG};
use updater::state::Shared;

/// Keeps every agent on this host at the version ops-meta wants.
#[derive(Debug, Parser)]
#[command(name = "ops-updater", disable_version_flag = true)]
struct Args {
    /// Config file.
    #[arg(short = 'c', default_value = "cfg.json")]
    config: PathBuf,
    /// Print the version and exit.
    #[arg(short = 'v')]
    version: bool,
    /// Check the config, print every problem, and exit (78 when it is not usable).
    #[arg(short = 'T')]
    test: bool,
    /// BootAgent servers for the first start, `host:port,host:port` (kept in the metafile;
    /// ignored once a metafile exists).
    #[arg(short = 'S', value_name = "SERVERS")]
    servers: Option<String>,
    /// Log to FILE (appended) instead of stderr.
    #[arg(short = 'L', value_name = "FILE")]
    log: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.version {
        println!("{}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    let parsed = Config::load(&args.config).and_then(|p| {
        // Resolving (OS hostname, workdir) can fail too; -T checks it as well.
        let resolved = p.config.resolve()?;
        Ok((p, resolved))
    });
    let (parsed, mut resolved) = match parsed {
        Ok(v) => v,
        Err(e) => {
            eprintln!("ops-updater: bad config {}", args.config.display());
            for p in &e.problems {
                eprintln!("  {p}");
            }
            return ExitCode::from(EXIT_BAD_CONFIG as u8);
        }
    };
    let servers = match args
        .servers
        .as_deref()
        .map(updater::boot::parse_servers_flag)
    {
        None => None,
        Some(Ok(s)) => Some(s),
        Some(Err(e)) => {
            eprintln!("ops-updater: {e}");
            return ExitCode::from(EXIT_BAD_CONFIG as u8);
        }
    };
    if args.test {
        for w in &parsed.warnings {
            println!("  {w}");
        }
        if parsed.config.protocol != updater::config::Protocol::Legacy {
            match updater::boot::check_metafile(&resolved) {
                Ok(m) => println!("  {m}"),
                Err(e) => {
                    eprintln!("ops-updater: {e}");
                    return ExitCode::from(EXIT_BAD_CONFIG as u8);
                }
            }
        }
        println!("config {} is ok", args.config.display());
        return ExitCode::SUCCESS;
    }
    // Never removed or renamed by any action, whatever a server asks (workdir::Own).
    resolved.own_files.push(args.config.clone());
    resolved.own_files.extend(args.log.clone());
    // One updater per workdir: taken before anything acts, released by the kernel when the
    // process ends (a crash cannot leave it stuck).
    let _lock = match updater::workdir::lock(&resolved.workdir) {
        Ok(l) => l,
        Err(e @ updater::workdir::LockError::Held { .. }) => {
            eprintln!("ops-updater: {e}");
            return ExitCode::from(updater::workdir::EXIT_LOCKED);
        }
        Err(e) => {
            eprintln!("ops-updater: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = init_logging(parsed.config.debug, args.log.as_deref()) {
        eprintln!("ops-updater: {e:#}");
        return ExitCode::FAILURE;
    }
    for w in parsed
        .warnings
        .iter()
        .filter(|w| w.severity == Severity::Warning)
    {
        tracing::warn!(field = %w.field, "config: {}", w.message);
    }
    match run(resolved, updater::boot::Options { servers }) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("ops-updater: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(debug: bool, file: Option<&std::path::Path>) -> anyhow::Result<()> {
    // `Targets` ("info", "updater=debug,warn") rather than `EnvFilter`: the latter compiles
    // regular expressions and links a regex engine, a few hundred KiB of resident code in a
    // daemon that runs on every host (docs/benchmarks.md, figure 4).
    let default = if debug { "debug" } else { "info" };
    let mut bad_env = None;
    let filter: Targets = match std::env::var("RUST_LOG") {
        Ok(v) if !v.trim().is_empty() => v.parse().unwrap_or_else(|e| {
            bad_env = Some(format!("RUST_LOG={v:?} ignored: {e}"));
            default.parse().expect("a level is a valid filter")
        }),
        _ => default.parse().expect("a level is a valid filter"),
    };
    let fmt = tracing_subscriber::fmt().with_max_level(tracing::Level::TRACE);
    match file {
        // -L: append, so that an earlier log is never overwritten.
        Some(path) => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("-L {}", path.display()))?;
            fmt.with_ansi(false)
                .with_writer(std::sync::Mutex::new(f))
                .finish()
                .with(filter)
                .init();
        }
        // Colours only on a terminal: stderr is often a file (systemd, `2>log`).
        None => fmt
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(std::io::stderr)
            .finish()
            .with(filter)
            .init(),
    }
    if let Some(w) = bad_env {
        tracing::warn!("{w}");
    }
    Ok(())
}

fn run(cfg: updater::config::Resolved, opts: updater::boot::Options) -> anyhow::Result<()> {
    // One thread: the daemon waits on the network and on child processes, and anything that
    // blocks (unpacking, hashing a file) goes to the blocking pool, whose threads exit when
    // idle. Every extra worker thread is a stack and an allocator arena resident for good.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async move {
        // Handlers first: a SIGTERM that arrives as soon as the local endpoint listens must
        // already mean "stop cleanly", not the default action.
        let stop = shutdown_signal();
        let journal = updater::events::Journal::open(
            &cfg.workdir.join(updater::workdir::EVENTS_FILE),
            updater::events::DEFAULT_CAP,
        )
        .await;
        let shared = Shared::new(&cfg.hostname, &cfg.heartbeat_url).with_journal(journal);
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let http = if cfg.config.http_enabled {
            let addr = cfg.config.http_listen;
            let listener = updater::http::bind(addr)
                .await
                .with_context(|| format!("http.listen {addr}"))?;
            tracing::info!(listen = %listener.local_addr()?, "local endpoint up");
            let state = updater::http::AppState::new(shared.clone(), &cfg.hostname);
            let mut rx = stop_rx.clone();
            Some(tokio::spawn(updater::http::serve(
                listener,
                state,
                async move {
                    let _ = rx.wait_for(|s| *s).await;
                },
            )))
        } else {
            None
        };
        updater::boot::run(cfg, shared, opts, stop)
            .await
            .context("starting the daemon")?;
        let _ = stop_tx.send(true);
        if let Some(h) = http {
            h.await
                .context("local endpoint task")?
                .context("local endpoint")?;
        }
        Ok(())
    })
}

/// Installs the SIGTERM and SIGINT handlers now; the future resolves on either.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut t), Ok(mut i)) => {
                tokio::select! {
                    _ = t.recv() => tracing::info!("SIGTERM"),
                    _ = i.recv() => tracing::info!("SIGINT"),
                }
            }
            // Without signal handlers the process still dies by the default action.
            _ => std::future::pending::<()>().await,
        }
    }
}
