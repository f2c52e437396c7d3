//! Shared server state: the current desired-state snapshot, the fleet store, and the
//! reloader that swaps in a new config (from `GET /config/reload`, SIGHUP or a test).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;

use crate::config::{self, ConfigError, Problem};
use crate::desired::Desired;
use crate::digests::{DigestCache, PassConfig};
use crate::persist::behind::{self, WriteBehind, Writer};
use crate::persist::{memory::Memory, Durable};
use crate::store::{FleetStore, MemStore};

/// The snapshot heartbeats answer from. Readers clone the `Arc` under a read lock held for
/// a few nanoseconds, so a reload never blocks heartbeats for longer than a pointer swap.
/// A generation number counts the swaps, so a connection can keep its own copy of the
/// `Arc` and check with one shared read per request that it is still the current one.
#[derive(Debug)]
pub struct Current {
    desired: RwLock<Arc<Desired>>,
    generation: AtomicU64,
}

impl Current {
    pub fn new(d: Desired) -> Current {
        Current {
            desired: RwLock::new(Arc::new(d)),
            generation: AtomicU64::new(0),
        }
    }
    pub fn load(&self) -> Arc<Desired> {
        self.desired.read().clone()
    }
    /// Changes whenever a new snapshot is stored. Read it before [`Current::load`]: an
    /// unchanged generation then means the loaded snapshot is still (at least) current.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
    fn store(&self, d: Desired) {
        *self.desired.write() = Arc::new(d);
        self.generation.fetch_add(1, Ordering::Release);
    }
}

/// What a successful reload reports.
#[derive(Debug, Clone)]
pub struct Reloaded {
    pub agents: usize,
    pub warnings: Vec<Problem>,
}

/// Reloads the config file and keeps the tarballs' digests current; one reload or digest
/// update at a time.
#[derive(Debug)]
pub struct Reloader {
    path: PathBuf,
    current: Arc<Current>,
    /// What is known of every tarball's digests (local and remote caches).
    pub digests: Arc<DigestCache>,
    lock: tokio::sync::Mutex<()>,
    /// Wakes the digest task after a reload.
    pub sha_wanted: tokio::sync::Notify,
    /// The `tls` listener's certificate and key, read again at every reload.
    pub certs: Arc<crate::tls::Certs>,
}

impl Reloader {
    /// The config file this server reads.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the config file again. A config with any error is refused and the running
    /// one stays.
    pub async fn reload(&self) -> Result<Reloaded, ConfigError> {
        let _g = self.lock.lock().await;
        let path = self.path.clone();
        let loaded = tokio::task::spawn_blocking(move || config::load(&path))
            .await
            .expect("config load does not panic");
        let loaded = match loaded {
            Ok(l) => l,
            Err(e) => {
                for line in e.errors() {
                    tracing::error!(config = %self.path.display(), problem = %line, "config reload refused");
                }
                return Err(e);
            }
        };
        for w in &loaded.warnings {
            tracing::warn!(config = %self.path.display(), problem = %w, "config warning");
        }
        let old = self.current.load();
        if let (Some(pair), Some(tls)) = (&loaded.tls_pair, &loaded.config.tls) {
            let before = self.certs.current().map(|p| crate::tls::fingerprint(&p));
            let now = crate::tls::fingerprint(pair);
            self.certs.set(pair.clone());
            tracing::info!(
                cert = %tls.cert_file.display(),
                sha256 = %now,
                changed = before.as_deref() != Some(now.as_str()),
                "tls certificate loaded; new connections get it"
            );
        }
        if old.config.tls.as_ref().map(|t| &t.listen)
            != loaded.config.tls.as_ref().map(|t| &t.listen)
        {
            tracing::warn!("tls.listen changed: it takes effect at the next restart");
        }
        if old.config.http != loaded.config.http
            || old.config.header_read_timeout_secs != loaded.config.header_read_timeout_secs
        {
            tracing::warn!(
                "http settings and headerReadTimeoutSecs changed: they take effect at the next restart"
            );
        }
        match (
            old.config.api_tokens.is_empty(),
            loaded.config.api_tokens.is_empty(),
        ) {
            (true, false) => tracing::info!(
                tokens = loaded.config.api_tokens.len(),
                "apiTokens configured: operator calls now need a token, from any address"
            ),
            (false, true) => warn_no_tokens(),
            _ => {}
        }
        if old.config.store != loaded.config.store {
            tracing::warn!("store changed: it takes effect at the next restart");
        }
        let agents = loaded
            .config
            .agents
            .iter()
            .filter(|a| a.default.is_some())
            .count();
        // Keep the digests known so far; the digest task fills in new tarballs.
        self.current.store(Desired::compile_with(
            Arc::new(loaded.config),
            old.digests.clone(),
            old.pins.clone(),
        ));
        self.sha_wanted.notify_one();
        tracing::info!(config = %self.path.display(), agents, "config reloaded");
        Ok(Reloaded {
            agents,
            warnings: loaded.warnings,
        })
    }

    /// Looks at every tarball the desired state can hand out (see [`DigestCache::pass`])
    /// and, when anything learned changed, swaps in a snapshot that carries it.
    pub async fn refresh_shas(&self) {
        let d = self.current.load();
        let cfg = PassConfig::new(&d.config);
        let found = self.digests.pass(&cfg, &d.artifacts()).await;
        let _g = self.lock.lock().await;
        let now = self.current.load();
        // A reload in the meantime already asked for another round.
        if Arc::ptr_eq(&now.config, &d.config) && *now.digests != found {
            self.current.store(Desired::compile_with(
                now.config.clone(),
                Arc::new(found),
                now.pins.clone(),
            ));
        }
    }

    /// Swaps in a snapshot that answers with the rollouts' `pins` (config and digests as
    /// they are), and asks for the digests of the tarballs they name.
    pub async fn set_pins(&self, pins: Arc<crate::desired::Pins>) {
        let _g = self.lock.lock().await;
        let now = self.current.load();
        self.current.store(Desired::compile_with(
            now.config.clone(),
            now.digests.clone(),
            pins,
        ));
        self.sha_wanted.notify_one();
    }
}

/// Said at start and when a reload removes the last token.
fn warn_no_tokens() {
    tracing::warn!(
        "no apiTokens configured: the operator API (/api/*) and /config/reload answer \
         loopback callers without authentication (any local user or process); configure \
         apiTokens to require tokens"
    );
}

/// Everything request handlers share: one `Arc`, so a request clones and drops a single
/// reference count. Fields are reached through `Deref` (`state.store`, `state.current`).
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

/// What [`AppState`] points to.
pub struct Shared {
    pub current: Arc<Current>,
    pub store: Arc<dyn FleetStore>,
    pub reloader: Arc<Reloader>,
    /// BootAgent hosts, their jobs and operator batches.
    pub boot: Arc<crate::boot::Boot>,
    /// The agent events hosts reported, per host.
    pub events: Arc<crate::events::EventStore>,
    /// The durable store behind the caches (`store` of the config).
    pub durable: Arc<dyn Durable>,
    /// The write-behind queue of legacy reports into `durable`.
    pub behind: WriteBehind,
    /// Its writer, taken by the server that runs it.
    pub(crate) writer: parking_lot::Mutex<Option<Writer>>,
    /// The cap on open connections (`maxConnections`, read at start), shared by every
    /// listener of the server.
    pub connections: crate::guard::ConnectionCap,
    /// Staged rollouts ([`crate::rollout`]).
    pub rollouts: Arc<crate::rollout::Rollouts>,
}

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

impl AppState {
    /// Loads the config at `path` with an empty in-memory store, whatever its `store`
    /// says: the in-process entry point of tests. The binary opens the configured store
    /// ([`crate::server::run`]).
    pub fn load(path: &Path) -> Result<(AppState, Vec<Problem>), ConfigError> {
        let loaded = config::load(path)?;
        Ok((
            AppState::new(path, loaded.config, Arc::new(MemStore::new())),
            loaded.warnings,
        ))
    }

    /// State for an already loaded config and a given store, kept in memory only.
    pub fn new(path: &Path, config: config::Config, store: Arc<dyn FleetStore>) -> AppState {
        AppState::with_durable(path, config, store, Arc::new(Memory::default()))
    }

    /// State for an already loaded config, a given cache and a durable store behind it
    /// (empty caches: fill them with [`crate::server::load`]).
    pub fn with_durable(
        path: &Path,
        config: config::Config,
        store: Arc<dyn FleetStore>,
        durable: Arc<dyn Durable>,
    ) -> AppState {
        let connections = crate::guard::ConnectionCap::new(config.max_connections as usize);
        if config.api_tokens.is_empty() {
            warn_no_tokens();
        }
        let current = Arc::new(Current::new(Desired::compile(
            Arc::new(config),
            Default::default(),
        )));
        let reloader = Arc::new(Reloader {
            path: path.to_path_buf(),
            current: current.clone(),
            digests: Arc::new(DigestCache::new()),
            lock: tokio::sync::Mutex::new(()),
            sha_wanted: tokio::sync::Notify::new(),
            certs: Arc::new(crate::tls::Certs::default()),
        });
        let (behind, writer) = if durable.kind() == "memory" {
            (WriteBehind::disabled(), None)
        } else {
            let (q, w) = behind::queue();
            (q, Some(w))
        };
        AppState(Arc::new(Shared {
            current,
            store,
            reloader,
            boot: Arc::new(crate::boot::Boot::with_store(durable.clone())),
            rollouts: Arc::new(crate::rollout::Rollouts::new(durable.clone())),
            events: Arc::new(crate::events::EventStore::new()),
            durable,
            behind,
            writer: parking_lot::Mutex::new(writer),
            connections,
        }))
    }
}
