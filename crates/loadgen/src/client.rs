//! One persistent HTTP/1.1 connection per worker (hyper's low-level client, keep-alive),
//! reconnected after any failure. Each request has a deadline; failures are classified the
//! way the report counts them.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::error::ConfigError;

/// Largest answer read; a heartbeat answer is a few hundred bytes, a config a few KiB.
pub const MAX_ANSWER_BYTES: usize = 1 << 20;

/// Where the server is: an `http://host:port[/base]` URL, resolved once.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    /// `host:port` as given, for the Host header.
    pub authority: String,
    /// Path prefix without a trailing `/` (often empty).
    pub base: String,
}

impl Target {
    /// Parses and resolves `url`. Only plain `http://` is spoken: benchmarks run on
    /// loopback, where TLS would measure the cipher rather than the server.
    pub async fn resolve(url: &str) -> Result<Target, ConfigError> {
        let bad = |reason: &str| ConfigError::Url {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| bad("must start with http://"))?;
        let (authority, base) = match rest.find('/') {
            Some(at) => (&rest[..at], rest[at..].trim_end_matches('/')),
            None => (rest, ""),
        };
        if authority.is_empty() {
            return Err(bad("has no host"));
        }
        let with_port = if authority
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            authority.to_string()
        } else {
            format!("{authority}:80")
        };
        let addr = tokio::net::lookup_host(with_port.as_str())
            .await
            .map_err(|e| bad(&format!("cannot resolve: {e}")))?
            .next()
            .ok_or_else(|| bad("resolves to no address"))?;
        Ok(Target {
            addr,
            authority: authority.to_string(),
            base: base.to_string(),
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}{}", self.authority, self.base, path)
    }
}

/// How one request failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// No connection could be made (refused, unreachable, connect timeout).
    Connect(String),
    /// No complete answer before the deadline.
    Timeout,
    /// A complete answer with a status other than 2xx.
    Status(u16),
    /// The connection broke mid-request, or the answer was malformed or too large.
    Io(String),
}

/// A keep-alive connection that reconnects on demand.
#[derive(Debug)]
pub struct Conn {
    target: Target,
    timeout: Duration,
    sender: Option<SendRequest<Full<Bytes>>>,
    /// Connections opened so far (1 when keep-alive held throughout).
    pub connects: u64,
}

impl Conn {
    pub fn new(target: Target, timeout: Duration) -> Conn {
        Conn {
            target,
            timeout,
            sender: None,
            connects: 0,
        }
    }

    async fn connect(&mut self) -> Result<SendRequest<Full<Bytes>>, Failure> {
        let stream = tokio::time::timeout(self.timeout, TcpStream::connect(self.target.addr))
            .await
            .map_err(|_| Failure::Connect("connect timed out".into()))?
            .map_err(|e| Failure::Connect(e.to_string()))?;
        // Requests are small and answered at once: Nagle would only add delay.
        let _ = stream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| Failure::Connect(e.to_string()))?;
        tokio::spawn(async move {
            // The connection ends when the server closes it or the sender is dropped;
            // either way the next request reconnects, so its error is not interesting.
            let _ = conn.await;
        });
        self.connects += 1;
        Ok(sender)
    }

    /// Opens the connection now rather than on the first request, so that a run's clock
    /// starts with every connection established (as wrk does).
    pub async fn warm(&mut self) -> Result<(), Failure> {
        if self.sender.is_none() {
            let s = tokio::time::timeout(self.timeout, self.connect())
                .await
                .map_err(|_| Failure::Timeout)??;
            self.sender = Some(s);
        }
        Ok(())
    }

    /// POSTs a JSON body to `path` and returns the answer's body.
    pub async fn post(&mut self, path: &str, body: Bytes) -> Result<Bytes, Failure> {
        self.request(Method::POST, path, body, None).await
    }

    /// [`Conn::post`] with a BootAgent host's credential (`Authorization: Bearer`), when
    /// it holds one.
    pub async fn post_as(
        &mut self,
        path: &str,
        body: Bytes,
        credential: Option<&str>,
    ) -> Result<Bytes, Failure> {
        self.request(Method::POST, path, body, credential).await
    }

    /// GETs `path` and returns the answer's body.
    pub async fn get(&mut self, path: &str) -> Result<Bytes, Failure> {
        self.request(Method::GET, path, Bytes::new(), None).await
    }

    async fn request(
        &mut self,
        method: Method,
        path: &str,
        body: Bytes,
        credential: Option<&str>,
    ) -> Result<Bytes, Failure> {
        // A connection the server closed while idle is replaced silently: that is keep-alive
        // housekeeping, not a failed request.
        if self.sender.as_ref().is_some_and(|s| s.is_closed()) {
            self.sender = None;
        }
        let deadline = tokio::time::Instant::now() + self.timeout;
        let result =
            tokio::time::timeout_at(deadline, self.exchange(method, path, body, credential)).await;
        match result {
            Ok(Ok(body)) => Ok(body),
            Ok(Err(f @ Failure::Status(_))) => Err(f),
            Ok(Err(f)) => {
                self.sender = None;
                Err(f)
            }
            Err(_) => {
                self.sender = None;
                Err(Failure::Timeout)
            }
        }
    }

    async fn exchange(
        &mut self,
        method: Method,
        path: &str,
        body: Bytes,
        credential: Option<&str>,
    ) -> Result<Bytes, Failure> {
        let mut sender = match self.sender.take() {
            Some(s) => s,
            None => self.connect().await?,
        };
        sender
            .ready()
            .await
            .map_err(|e| Failure::Io(e.to_string()))?;
        let mut builder = Request::builder()
            .method(method.clone())
            .uri(format!("{}{}", self.target.base, path))
            .header(hyper::header::HOST, self.target.authority.as_str());
        if method == Method::POST {
            builder = builder.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        if let Some(c) = credential {
            builder = builder.header(hyper::header::AUTHORIZATION, format!("Bearer {c}"));
        }
        let req = builder
            .body(Full::new(body))
            .map_err(|e| Failure::Io(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| Failure::Io(e.to_string()))?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|e| Failure::Io(e.to_string()))?
            .to_bytes();
        // The answer was read whole, so the connection can carry the next request.
        self.sender = Some(sender);
        if status.is_success() {
            Ok(body)
        } else {
            Err(Failure::Status(status.as_u16()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn urls_are_parsed_with_base_and_port() {
        let t = Target::resolve("http://127.0.0.1:2000/meta/")
            .await
            .unwrap();
        assert_eq!(t.addr, "127.0.0.1:2000".parse().unwrap());
        assert_eq!(t.base, "/meta");
        assert_eq!(t.url("/heartbeat"), "http://127.0.0.1:2000/meta/heartbeat");
        let t = Target::resolve("http://127.0.0.1").await.unwrap();
        assert_eq!(t.addr.port(), 80);
        for bad in ["https://127.0.0.1:1", "127.0.0.1:1", "http:///x"] {
            assert!(Target::resolve(bad).await.is_err(), "{bad}");
        }
    }
}
