//! `ops-updater`: flags, logging and signals; everything else is in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use updater::config::{Config, Severity, EXIT_BAD_CONFIG};
use updater::selfup::supervisor;
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
    /// Run by `control start` when an original ops-updater installed ours as an agent:
    /// take its place (docs/ops-updater.md, "Moving a fleet from the original").
    #[arg(long, hide = true)]
    take_over: bool,
    /// The detached second half of `--take-over`.
    #[arg(long, hide = true)]
    take_over_wait: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.take_over || args.take_over_wait {
        let res = if args.take_over {
            updater::selfup::takeover::take_over().map(|line| println!("{line}"))
        } else {
            updater::selfup::takeover::wait_and_start()
        };
        return match res {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ops-updater: take-over: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if args.version {
        println!("{}", updater::selfup::VERSION);
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
    if std::env::var_os(supervisor::ENV_WORKER).is_some() {
        // A worker: the supervisor holds the workdir lock and the local endpoint's socket.
        if let Err(e) = init_logging(parsed.config.debug, args.log.as_deref()) {
            eprintln!("ops-updater: {e:#}");
            return ExitCode::FAILURE;
        }
        let opts = updater::boot::Options {
            servers,
            config: args.config.clone(),
        };
        return match run(resolved, opts) {
            Ok(updater::boot::Ended::Stopped) => ExitCode::SUCCESS,
            Ok(updater::boot::Ended::Upgrade) => ExitCode::from(supervisor::EXIT_UPGRADE as u8),
            Err(e) => {
                tracing::error!("{e:#}");
                eprintln!("ops-updater: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    // The supervisor. One updater per workdir: the lock is taken before anything acts,
    // and released by the kernel when the process ends (a crash cannot leave it stuck).
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
    let _ = servers; // Checked here; the worker reads -S from the same arguments.
    match supervise(&resolved) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("ops-updater: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Binds `addr`; a port in use is tried again for up to 2 s. The workdir lock is ours, so
/// no other updater of this workdir runs, but the worker of one that was just killed may
/// still be on its way out with the socket (it dies with its supervisor).
fn bind_patiently(addr: std::net::SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        match std::net::TcpListener::bind(addr) {
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            r => return r,
        }
    }
}

/// Runs the supervisor: binds the local endpoint (kept across workers), then runs the
/// daemon as its worker process until the service stops.
fn supervise(cfg: &updater::config::Resolved) -> anyhow::Result<i32> {
    let listener = if cfg.config.http_enabled {
        let addr = cfg.config.http_listen;
        let l = bind_patiently(addr).with_context(|| format!("http.listen {addr}"))?;
        tracing::info!(listen = %l.local_addr()?, "local endpoint up");
        Some(l)
    } else {
        None
    };
    let exe = std::env::current_exe().context("finding the executable")?;
    let s = supervisor::Supervisor {
        exe,
        args: std::env::args_os().skip(1).collect(),
        workdir: cfg.workdir.clone(),
        listener,
        commit_rounds: cfg.config.self_upgrade_commit_rounds,
        watch: std::time::Duration::from_secs(cfg.config.self_upgrade_watch_secs),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    Ok(rt.block_on(s.run()))
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

fn run(
    cfg: updater::config::Resolved,
    opts: updater::boot::Options,
) -> anyhow::Result<updater::boot::Ended> {
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
            let listener = match std::env::var_os(supervisor::ENV_LISTEN_FD) {
                // The supervisor's socket: the same one across workers, so a client is
                // never refused while one worker hands over to the next.
                Some(_) => updater::http::inherited(updater::process::WORKER_LISTEN_FD)
                    .context("the local endpoint's socket from the supervisor")?,
                None => {
                    let addr = cfg.config.http_listen;
                    updater::http::bind(addr)
                        .await
                        .with_context(|| format!("http.listen {addr}"))?
                }
            };
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
        notify_ready();
        let ended = updater::boot::run(cfg, shared, opts, stop)
            .await
            .context("starting the daemon")?;
        let _ = stop_tx.send(true);
        if let Some(h) = http {
            h.await
                .context("local endpoint task")?
                .context("local endpoint")?;
        }
        Ok(ended)
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

/// Tells systemd (`Type=notify`, `NotifyAccess=all`) the daemon runs: `READY=1` to
/// `$NOTIFY_SOCKET`, when it is set. Nothing else is ever sent.
fn notify_ready() {
    use std::os::linux::net::SocketAddrExt as _;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name),
        None => SocketAddr::from_pathname(std::path::Path::new(&path)),
    };
    let sent = addr.and_then(|a| UnixDatagram::unbound()?.send_to_addr(b"READY=1", &a));
    if let Err(e) = sent {
        tracing::warn!(error = %e, "cannot tell systemd that the daemon is ready");
    }
}
