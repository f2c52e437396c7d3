//! Client for the legacy heartbeat: one `POST` of the host's real agents, answered with the
//! desired ones. Every way the server can misbehave (refused connection, 500, garbage,
//! a body without end, silence) becomes a [`HeartbeatError`], never a panic.

use std::time::Duration;

use futures_util::StreamExt;
use proto::events::MAX_EVENTS_PER_REPORT;
use proto::legacy::{HeartbeatReport, HeartbeatRequest, HeartbeatResponse};

use crate::events::Journal;

/// Why a heartbeat failed. Display names the URL.
#[derive(Debug, thiserror::Error)]
pub enum HeartbeatError {
    // The whole cause chain in the message: reqwest's own Display stops at "error sending
    // request", which hides a refused certificate or connection from the operator.
    #[error("heartbeat to {url}: {}", crate::error_chain(error))]
    Transport { url: String, error: reqwest::Error },
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

/// A decoded heartbeat answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Answer {
    pub response: HeartbeatResponse,
    /// Entries of `desiredAgents` that were not agent objects, with why.
    pub skipped: Vec<String>,
}

/// Decodes an answer. A well-formed one decodes in one go; otherwise the entries of
/// `desiredAgents` are decoded one by one, so that one malformed entry (a number for a
/// name, say) costs only that agent, not the whole round.
pub fn decode(body: &[u8]) -> Result<Answer, serde_json::Error> {
    if let Ok(response) = serde_json::from_slice::<HeartbeatResponse>(body) {
        return Ok(Answer {
            response,
            skipped: Vec::new(),
        });
    }
    let v: serde_json::Value = serde_json::from_slice(body)?;
    let serde_json::Value::Object(mut obj) = v else {
        // Not an object: let the typed decoder produce its own message.
        return serde_json::from_slice::<HeartbeatResponse>(body).map(|response| Answer {
            response,
            skipped: Vec::new(),
        });
    };
    let list = obj.remove("desiredAgents");
    // With the list out of the way, the rest must decode as usual.
    let mut response: HeartbeatResponse = serde_json::from_value(serde_json::Value::Object(obj))?;
    let mut skipped = Vec::new();
    match list {
        None | Some(serde_json::Value::Null) => {}
        Some(serde_json::Value::Array(items)) => {
            for (i, item) in items.into_iter().enumerate() {
                match serde_json::from_value(item) {
                    Ok(d) => response.desired_agents.push(d),
                    Err(e) => skipped.push(format!("desiredAgents[{i}]: {e}")),
                }
            }
        }
        Some(other) => {
            // Re-decode to get serde's own description of the type error.
            let e = serde_json::from_value::<Vec<proto::legacy::DesiredAgent>>(other)
                .err()
                .map_or_else(|| "not a list".to_string(), |e| e.to_string());
            skipped.push(format!("desiredAgents: {e}"));
        }
    }
    Ok(Answer { response, skipped })
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
        tls: Tls<'_>,
    ) -> Result<Client, HeartbeatError> {
        let http = http_client(timeout, tls).map_err(HeartbeatError::Client)?;
        Ok(Client {
            http,
            url: url.to_string(),
            max_response_bytes,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// One heartbeat. Entries of `desiredAgents` that do not decode are left out and
    /// described in [`Answer::skipped`]; the rest of the answer is still used.
    pub async fn send(&self, req: &HeartbeatRequest) -> Result<Answer, HeartbeatError> {
        let body = self.exchange(req).await?;
        self.decode(&body)
    }

    /// [`Client::send`] carrying the events of `journal` that no server took yet (the
    /// `events` extension, at most `MAX_EVENTS_PER_REPORT`, oldest first). Any 2xx answer
    /// takes them, whatever its body: a server that does not know the field ignored it, and
    /// the events are not sent again. Without events the request is the original one.
    pub async fn send_with_events(
        &self,
        req: &HeartbeatRequest,
        journal: &Journal,
    ) -> Result<Answer, HeartbeatError> {
        let events = journal.unsent(MAX_EVENTS_PER_REPORT);
        let report = HeartbeatReport {
            request: req,
            events: &events,
        };
        let body = self.exchange(&report).await?;
        if let Some(last) = events.last() {
            journal.acked(last.seq).await;
        }
        self.decode(&body)
    }

    fn decode(&self, body: &[u8]) -> Result<Answer, HeartbeatError> {
        decode(body).map_err(|source| HeartbeatError::Decode {
            url: self.url.clone(),
            source,
        })
    }

    /// Posts `req` as JSON; the answer's body when its status is 2xx.
    async fn exchange(&self, req: &impl serde::Serialize) -> Result<Vec<u8>, HeartbeatError> {
        let transport = |error| HeartbeatError::Transport {
            url: self.url.clone(),
            error,
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
        Ok(body)
    }

    async fn read_capped(&self, resp: reqwest::Response) -> Result<Vec<u8>, HeartbeatError> {
        read_capped(resp, self.max_response_bytes)
            .await
            .map_err(|e| match e {
                Capped::TooLarge => HeartbeatError::TooLarge {
                    url: self.url.clone(),
                    limit: self.max_response_bytes,
                },
                Capped::Transport(error) => HeartbeatError::Transport {
                    url: self.url.clone(),
                    error,
                },
            })
    }
}

/// Why [`read_capped`] stopped.
pub(crate) enum Capped {
    TooLarge,
    Transport(reqwest::Error),
}

/// Reads a response body of at most `limit` bytes, failing as soon as it passes the cap
/// rather than buffering it all. Shared by the legacy heartbeat and the BootAgent client.
pub(crate) async fn read_capped(resp: reqwest::Response, limit: u64) -> Result<Vec<u8>, Capped> {
    if resp.content_length().is_some_and(|n| n > limit) {
        return Err(Capped::TooLarge);
    }
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(Capped::Transport)?;
        if body.len() as u64 + chunk.len() as u64 > limit {
            return Err(Capped::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// How an HTTPS client checks servers: `tlsCaFile`'s certificates (DER; empty for the
/// system's roots) and `tlsInsecure` (see [`crate::tls`]).
#[derive(Debug, Clone, Copy)]
pub struct Tls<'a> {
    pub ca: &'a [Vec<u8>],
    pub insecure: bool,
}

impl<'a> Tls<'a> {
    /// The settings of `c`.
    pub fn of(c: &'a crate::config::Config) -> Tls<'a> {
        Tls {
            ca: &c.tls_ca,
            insecure: c.tls_insecure,
        }
    }
}

/// The HTTP client for every call to a server, legacy heartbeat and BootAgent alike:
/// `timeout` bounds a whole exchange.
pub(crate) fn http_client(timeout: Duration, tls: Tls<'_>) -> reqwest::Result<reqwest::Client> {
    let b = reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)));
    crate::tls::configure(b, tls.ca, tls.insecure)
        .user_agent(format!("ops-updater/{}", crate::selfup::VERSION))
        // Servers are named by the operator; following redirects elsewhere is never wanted.
        .redirect(reqwest::redirect::Policy::none())
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_keeps_good_entries_next_to_bad_ones() {
        let a = decode(
            br#"{"errorMessage":"","desiredAgents":[
                {"name":"a","version":"1","tarball":"http://m","cmd":"start"},
                {"name":5,"version":[],"cmd":{}},
                "text"
            ]}"#,
        )
        .unwrap();
        assert_eq!(a.response.desired_agents.len(), 1);
        assert_eq!(a.response.desired_agents[0].name, "a");
        assert_eq!(a.skipped.len(), 2, "{:?}", a.skipped);
        assert!(
            a.skipped[0].starts_with("desiredAgents[1]"),
            "{:?}",
            a.skipped
        );
    }

    /// A heartbeat server in the test: answers the statuses of `script` in turn (then
    /// 200) with a body that is not a heartbeat answer, and keeps every request body.
    async fn server(script: Vec<u16>) -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
        use std::sync::{Arc, Mutex};
        let bodies: Arc<Mutex<Vec<String>>> = Arc::default();
        let script = Arc::new(Mutex::new(std::collections::VecDeque::from(script)));
        let seen = bodies.clone();
        let app = axum::Router::new().route(
            "/heartbeat",
            axum::routing::post(move |body: String| {
                let seen = seen.clone();
                let script = script.clone();
                async move {
                    seen.lock().unwrap().push(body);
                    let code = script.lock().unwrap().pop_front().unwrap_or(200);
                    (axum::http::StatusCode::from_u16(code).unwrap(), "not json")
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (format!("http://{addr}/heartbeat"), bodies)
    }

    #[tokio::test]
    async fn events_ride_on_heartbeats_until_a_2xx_answer_takes_them() {
        use crate::events::{EventInput, Journal};
        let journal = Journal::in_memory(10);
        let mut seqs = Vec::new();
        for cause in ["exit code 1", "exit code 2"] {
            seqs.push(
                journal
                    .push(EventInput {
                        agent: "a".into(),
                        kind: proto::events::KIND_EXITED.into(),
                        cause: cause.into(),
                        ..EventInput::default()
                    })
                    .await,
            );
        }
        let (url, bodies) = server(vec![500]).await;
        let c = Client::new(
            &url,
            Duration::from_secs(5),
            1 << 20,
            Tls {
                ca: &[],
                insecure: false,
            },
        )
        .unwrap();
        let req = HeartbeatRequest {
            hostname: "h1".into(),
            real_agents: vec![],
        };
        let plain = serde_json::to_string(&req).unwrap();
        // A 500: the events stay unsent.
        let e = c.send_with_events(&req, &journal).await.unwrap_err();
        assert!(
            matches!(e, HeartbeatError::Status { status: 500, .. }),
            "{e}"
        );
        assert_eq!(journal.unsent(10).len(), 2);
        // A 200, even one whose body is no answer (a server of another kind), takes them.
        let e = c.send_with_events(&req, &journal).await.unwrap_err();
        assert!(matches!(e, HeartbeatError::Decode { .. }), "{e}");
        assert!(journal.unsent(10).is_empty());
        assert_eq!(journal.acked_seq(), seqs[1]);
        // Nothing left to send: the original request, byte for byte.
        let _ = c.send_with_events(&req, &journal).await;
        let b = bodies.lock().unwrap().clone();
        assert_eq!(b.len(), 3);
        for sent in &b[..2] {
            let v: serde_json::Value = serde_json::from_str(sent).unwrap();
            assert_eq!(v["hostname"], "h1");
            let got: Vec<u64> = v["events"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["seq"].as_u64().unwrap())
                .collect();
            assert_eq!(got, seqs);
        }
        assert_eq!(b[2], plain);
    }

    #[test]
    fn decode_refuses_what_is_not_an_answer() {
        assert!(decode(b"").is_err());
        assert!(decode(b"{\"desiredAgents\": [").is_err());
        assert!(decode(b"[1,2]").is_err());
        assert!(decode(br#"{"errorMessage": 5}"#).is_err());
        let a = decode(br#"{"desiredAgents": {"name": "a"}}"#).unwrap();
        assert!(a.response.desired_agents.is_empty());
        assert_eq!(a.skipped.len(), 1);
        let a = decode(br#"{"errorMessage": null, "desiredAgents": null}"#).unwrap();
        assert_eq!(a, Answer::default());
    }
}
