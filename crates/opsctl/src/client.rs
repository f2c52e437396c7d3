//! The one HTTP client of `opsctl`: ops-meta's base URL, the bearer token, a request
//! timeout and the trust roots (`--tls-ca`, else the system's), over reqwest with rustls
//! as ops-updater uses it. Answers come back as text so that `--json` can print them as
//! the server sent them.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::config::Settings;
use crate::error::chain;
use crate::Error;

/// Largest answer read (a `GET /api/hosts` of a large fleet is big, but not this big).
const MAX_ANSWER_BYTES: usize = 256 * 1024 * 1024;

pub struct Client {
    http: reqwest::Client,
    rt: tokio::runtime::Runtime,
    base: String,
    token: Option<String>,
}

impl Client {
    pub fn new(s: &Settings) -> Result<Client, Error> {
        let mut b = reqwest::Client::builder()
            .timeout(s.timeout)
            .connect_timeout(s.timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("opsctl/", env!("CARGO_PKG_VERSION")))
            // The operator named the server; a redirect elsewhere would take the token along.
            .redirect(reqwest::redirect::Policy::none());
        let roots = match &s.tls_ca {
            Some(path) => {
                let pem = std::fs::read(path)
                    .map_err(|e| Error::Other(format!("--tls-ca {}: {e}", path.display())))?;
                let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                    Error::Other(format!("--tls-ca {}: {}", path.display(), chain(&e)))
                })?;
                if certs.is_empty() {
                    return Err(Error::Other(format!(
                        "--tls-ca {}: no PEM certificate (-----BEGIN CERTIFICATE-----) in it",
                        path.display()
                    )));
                }
                certs
            }
            None => system_roots(),
        };
        // Without a CA file and without system roots, reqwest's built-in Mozilla roots.
        if !roots.is_empty() {
            b = b.tls_built_in_root_certs(false);
            for c in roots {
                b = b.add_root_certificate(c);
            }
        }
        let http = b
            .build()
            .map_err(|e| Error::Other(format!("making the HTTP client: {}", chain(&e))))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::Other(format!("starting the runtime: {e}")))?;
        Ok(Client {
            http,
            rt,
            base: s.server.clone(),
            token: s.token.clone(),
        })
    }

    /// `GET path` (with its query), the body of a 2xx answer.
    pub fn get(&self, path: &str) -> Result<String, Error> {
        self.send(reqwest::Method::GET, path, None)
    }

    /// `POST path` with `body` as JSON (or no body), the body of a 2xx answer.
    pub fn post(&self, path: &str, body: Option<&dyn ErasedJson>) -> Result<String, Error> {
        let body = body
            .map(|b| b.to_json())
            .transpose()
            .map_err(|e| Error::Other(format!("encoding the request: {e}")))?;
        self.send(reqwest::Method::POST, path, body)
    }

    fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<String, Error> {
        let url = format!("{}{path}", self.base);
        let what = format!("{method} {}", path.split('?').next().unwrap_or(path));
        let mut req = self.http.request(method, &url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(b);
        }
        self.rt.block_on(async {
            let resp = req.send().await.map_err(|e| Error::Unreachable {
                url: self.base.clone(),
                cause: chain(&e),
            })?;
            let status = resp.status();
            let text = read_capped(resp).await.map_err(|e| Error::Unreachable {
                url: self.base.clone(),
                cause: e,
            })?;
            if status.is_success() {
                Ok(text)
            } else {
                Err(Error::Api {
                    what,
                    status: status.as_u16(),
                    text,
                })
            }
        })
    }

    /// Sleeps between polls (the watch loop); nothing runs on the runtime meanwhile.
    pub fn sleep(&self, d: Duration) {
        std::thread::sleep(d);
    }
}

async fn read_capped(mut resp: reqwest::Response) -> Result<String, String> {
    let mut buf = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| chain(&e))? {
        if buf.len() + chunk.len() > MAX_ANSWER_BYTES {
            return Err(format!(
                "the answer is larger than {MAX_ANSWER_BYTES} bytes"
            ));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// A request body: anything `Serialize`, behind a trait object.
pub trait ErasedJson {
    fn to_json(&self) -> serde_json::Result<Vec<u8>>;
}

impl<T: Serialize> ErasedJson for T {
    fn to_json(&self) -> serde_json::Result<Vec<u8>> {
        serde_json::to_vec(self)
    }
}

/// Reads a 2xx answer as `T`; `what` names the request in the message.
pub fn decode<T: DeserializeOwned>(body: &str, what: &str) -> Result<T, Error> {
    serde_json::from_str(body).map_err(|e| {
        Error::Other(format!(
            "{what}: the server's answer is not what opsctl expects ({e}); is the server ops-meta, and of a matching version?"
        ))
    })
}

/// A name that goes into a URL path: checked so that it stays one path segment.
pub fn segment<'a>(what: &str, s: &'a str) -> Result<&'a str, Error> {
    let ok = !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && !s.starts_with('.');
    if ok {
        Ok(s)
    } else {
        Err(Error::Usage(format!(
            "{what} {:?}: may only hold ASCII letters, digits, '.', '_' and '-'",
            proto::clean_text(s, 64)
        )))
    }
}

/// Builds `path?k=v&...` with the values percent-encoded; pairs with `None` are left out.
pub fn with_query(path: &str, pairs: &[(&str, Option<&str>)]) -> String {
    let mut q = reqwest::Url::parse("http://x/").expect("a constant URL");
    {
        let mut qp = q.query_pairs_mut();
        for (k, v) in pairs {
            if let Some(v) = v {
                qp.append_pair(k, v);
            }
        }
    }
    match q.query() {
        Some(s) if !s.is_empty() => format!("{path}?{s}"),
        _ => path.to_string(),
    }
}

/// The OS trust store's certificates that parse; empty when there is none.
fn system_roots() -> Vec<reqwest::Certificate> {
    rustls_native_certs::load_native_certs()
        .certs
        .iter()
        .filter_map(|c| reqwest::Certificate::from_der(c.as_ref()).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_encoded_and_empty_ones_left_out() {
        assert_eq!(with_query("/api/hosts", &[("prefix", None)]), "/api/hosts");
        assert_eq!(
            with_query(
                "/api/hosts",
                &[("prefix", Some("web")), ("tag", Some("a=b,c=d"))]
            ),
            "/api/hosts?prefix=web&tag=a%3Db%2Cc%3Dd"
        );
    }

    #[test]
    fn path_segments_stay_segments() {
        assert!(segment("host", "web-01.example").is_ok());
        for bad in ["", "../x", "a/b", "a?b", ".hidden", "a b", "a%2fb"] {
            let e = segment("host", bad).unwrap_err();
            assert_eq!(e.exit_code(), crate::exit::USAGE, "{bad}");
        }
    }
}
