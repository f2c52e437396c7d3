//! Errors of the load generator's library: bad settings, and failures of a run as a whole
//! (a single failed request is not an error here, it is counted in the report).

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Invalid(String),
    #[error("url {url:?}: {reason}")]
    Url { url: String, reason: String },
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("new config {path}: {source}")]
    NewConfig {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config reload at {url}: {reason}")]
    Reload { url: String, reason: String },
}
