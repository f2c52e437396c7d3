//! `GET /config/reload`: re-reads the config file; an operator mutation (see `auth`: an
//! admin token, or loopback callers only when no token is configured, as the original).
//! `GET /metrics`: a few gauges in the Prometheus text format (the store's backend and how
//! far its write-behind queue lags, host counts).

use axum::extract::State;
use axum::routing::get;
use axum::Router;

use super::auth::AuditNote;
use super::{AppError, AppState};

pub(super) fn router() -> Router<AppState> {
    Router::new()
        .route("/config/reload", get(reload))
        .route("/metrics", get(metrics))
}

async fn metrics(State(st): State<AppState>) -> String {
    use std::sync::atomic::Ordering::Relaxed;
    let lag = &st.behind.lag;
    let seen = st.boot.seen_lag();
    format!(
        "# TYPE ops_meta_store_info gauge\n\
         ops_meta_store_info{{backend=\"{}\"}} 1\n\
         # TYPE ops_meta_store_queue_hosts gauge\n\
         ops_meta_store_queue_hosts {}\n\
         # TYPE ops_meta_store_write_lag_seconds gauge\n\
         ops_meta_store_write_lag_seconds {:.3}\n\
         # TYPE ops_meta_store_rows_written_total counter\n\
         ops_meta_store_rows_written_total {}\n\
         # TYPE ops_meta_store_write_failures_total counter\n\
         ops_meta_store_write_failures_total {}\n\
         # TYPE ops_meta_store_seen_queue_hosts gauge\n\
         ops_meta_store_seen_queue_hosts {}\n\
         # TYPE ops_meta_store_seen_written_total counter\n\
         ops_meta_store_seen_written_total {}\n\
         # TYPE ops_meta_bootagent_reports_total counter\n\
         ops_meta_bootagent_reports_total{{path=\"memory\"}} {}\n\
         ops_meta_bootagent_reports_total{{path=\"store\"}} {}\n\
         # TYPE ops_meta_hosts gauge\n\
         ops_meta_hosts {}\n\
         # TYPE ops_meta_bootagent_hosts gauge\n\
         ops_meta_bootagent_hosts {}\n\
         # TYPE ops_meta_connections_open gauge\n\
         ops_meta_connections_open {}\n\
         # TYPE ops_meta_connections_max gauge\n\
         ops_meta_connections_max {}\n\
         # TYPE ops_meta_connections_saturated_total counter\n\
         ops_meta_connections_saturated_total {}\n",
        st.durable.kind(),
        lag.queued.load(Relaxed).max(0),
        lag.last_lag_ms.load(Relaxed) as f64 / 1000.0,
        lag.written.load(Relaxed),
        lag.failures.load(Relaxed) + seen.failures.load(Relaxed),
        seen.queued.load(Relaxed).max(0),
        seen.written.load(Relaxed),
        st.boot.reports_in_memory.load(Relaxed),
        st.boot.reports_in_store.load(Relaxed),
        st.store.host_count(),
        st.boot.registry.len(),
        st.connections.open(),
        st.connections.max(),
        st.connections.saturated.load(Relaxed),
    )
}

async fn reload(State(st): State<AppState>, note: AuditNote) -> Result<String, AppError> {
    match st.reloader.reload().await {
        Ok(r) => {
            note.detail(format!(
                "config reloaded: {} agent(s), {} warning(s)",
                r.agents,
                r.warnings.len()
            ));
            let mut out = format!(
                "config reloaded from {}: {} agent(s)\n",
                st.reloader.path().display(),
                r.agents
            );
            for w in &r.warnings {
                out.push_str(&format!("warning: {w}\n"));
            }
            Ok(out)
        }
        Err(e) => Err(AppError::ReloadRefused(e.errors())),
    }
}
