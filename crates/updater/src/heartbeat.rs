//! Client for the legacy heartbeat: one `POST` of the host's real agents, answered with the
//! desired ones. Every way the server can misbehave (refused connection, 500, garbage,
//! a body without end, silence) becomes a [`HeartbeatError`], never a panic.

use std::time::Duration;

use futures_util::StreamExt;
use proto::legacy::{HeartbeatRequest, HeartbeatResponse};

/// Why a heartbeat failed. Display names the URL.
#[derive(Debug, thiserror::Error)]
pub enum HeartbeatError {
    #[error("heartbeat to {url}: {source}")]
    Transport {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("heartbeat to {url}: server answered {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    #[error("heartbeat to {url}: response larger than {limit} bytes")]
    TooLarge { url: String, limit: u64 },
    #[error("heartbeat to {url}: response is not heartbeat JSON: {source}")]
    Decode {
        url: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot build the HTTP client: {0}")]
    Client(#[source] reqwest::Error),
}

/// Sends heartbeats to one URL.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    url: String,
    max_response_bytes: u64,
}

impl Client {
    /// `timeout` bounds the whole exchange; `max_response_bytes` caps the body read.
    pub fn new(
        url: &str,
        timeout: Duration,
        max_response_bytes: u64,
        tls_insecure: bool,
    ) -> Result<Client, HeartbeatError> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .danger_accept_invalid_certs(tls_insecure)
            .user_agent(concat!("ops-updater/", env!("CARGO_PKG_VERSION")))
            // The server is named by the operator; following redirects elsewhere is never wanted.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(HeartbeatError::Client)?;
        Ok(Client {
            http,
            url: url.to_string(),
            max_response_bytes,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// One heartbeat.
    pub async fn send(&self, req: &HeartbeatRequest) -> Result<HeartbeatResponse, HeartbeatError> {
        let transport = |source| HeartbeatError::Transport {
            url: self.url.clone(),
            source,
        };
        let resp = self
            .http
            .post(&self.url)
            .json(req)
            .send()
            .await
            .map_err(transport)?;
        let status = resp.status();
        let body = self.read_capped(resp).await?;
        if !status.is_success() {
            // Echo a little of the body: the original answers errors in plain text.
            let text: String = String::from_utf8_lossy(&body).chars().take(200).collect();
            return Err(HeartbeatError::Status {
                url: self.url.clone(),
                status: status.as_u16(),
                body: text.trim().to_string(),
            });
        }
        serde_json::from_slice(&body).map_err(|source| HeartbeatError::Decode {
            url: self.url.clone(),
            source,
        })
    }

    /// Reads the body, failing as soon as it passes the cap rather than buffering it all.
    async fn read_capped(&self, resp: reqwest::Response) -> Result<Vec<u8>, HeartbeatError> {
        let limit = self.max_response_bytes;
        let too_large = || HeartbeatError::TooLarge {
            url: self.url.clone(),
            limit,
        };
        if resp.content_length().is_some_and(|n| n > limit) {
            return Err(too_large());
        }
        let mut body = Vec::new();
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|source| HeartbeatError::Transport {
                url: self.url.clone(),
                source,
            })?;
            if body.len() as u64 + chunk.len() as u64 > limit {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }
}
