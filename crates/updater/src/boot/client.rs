//! Client for `POST /agent/register` and `POST /agent/status` on one server at a time.
//!
//! A server that answers 404 or 405 does not speak BootAgent (an original ops-meta, or one
//! of ours from before BootAgent): that is [`CallError::NotSupported`], which `auto` mode
//! takes as the cue to fall back to the legacy heartbeat.

use std::time::Duration;

use proto::bootagent::{
    Job, RegisterRequest, RegisterResponse, StatusRequest, StatusResponse, Waiting, MAX_WAITING,
    MAX_WAITING_REASON_LEN,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Most jobs taken from one status answer; more are left for the next answer.
pub const MAX_JOBS_PER_ANSWER: usize = 256;

/// Why a call failed. Display names the URL.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("{url}: server does not speak BootAgent (answered {status})")]
    NotSupported { url: String, status: u16 },
    #[error("{url}: {}", crate::error_chain(error))]
    Transport { url: String, error: reqwest::Error },
    /// 401 or 403: the server refuses this host (no or a wrong credential, an enrolled
    /// hostname, the enrollment secret). The body is the server's reason.
    #[error("{url}: the server refuses this host ({status}): {body}")]
    Refused {
        url: String,
        status: u16,
        body: String,
    },
    #[error("{url}: server answered {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    #[error("{url}: response larger than {limit} bytes")]
    TooLarge { url: String, limit: u64 },
    #[error("{url}: response is not BootAgent JSON: {source}")]
    Decode {
        url: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot build the HTTP client: {0}")]
    Client(#[source] reqwest::Error),
}

/// A job entry of a status answer that could not be used, with its id when it had one (so
/// that a failed result can be reported for it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadJob {
    pub id: Option<String>,
    pub error: String,
}

/// A decoded status answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatusAnswer {
    pub response: StatusResponse,
    pub bad_jobs: Vec<BadJob>,
}

/// Decodes a status answer job by job, so that one job with an unknown action or a wrong
/// type costs only that job.
pub fn decode_status(body: &[u8]) -> Result<StatusAnswer, serde_json::Error> {
    let v: serde_json::Value = serde_json::from_slice(body)?;
    let serde_json::Value::Object(mut obj) = v else {
        return Err(serde::de::Error::custom(
            "a status answer must be a JSON object",
        ));
    };
    let list = obj.remove("jobs");
    // `waiting` is our extension and only informs the log: a malformed one is dropped, never
    // a reason to refuse the answer.
    let waiting = obj.remove("waiting");
    let mut response: StatusResponse = serde_json::from_value(serde_json::Value::Object(obj))?;
    response.waiting = waiting
        .and_then(|w| serde_json::from_value::<Vec<Waiting>>(w).ok())
        .unwrap_or_default()
        .into_iter()
        .take(MAX_WAITING)
        .map(|w| Waiting {
            name: proto::clean_text(&w.name, 128),
            version: proto::clean_text(&w.version, 128),
            reason: proto::clean_text(&w.reason, MAX_WAITING_REASON_LEN),
        })
        .collect();
    let mut bad_jobs = Vec::new();
    match list {
        None | Some(serde_json::Value::Null) => {}
        Some(serde_json::Value::Array(items)) => {
            for (i, item) in items.into_iter().enumerate() {
                if response.jobs.len() + bad_jobs.len() >= MAX_JOBS_PER_ANSWER {
                    break;
                }
                let id = item
                    .get("id")
                    .and_then(|v| v.as_str())
                    .map(|s| s.chars().take(128).collect::<String>());
                match serde_json::from_value::<Job>(item) {
                    Ok(j) => response.jobs.push(j),
                    Err(e) => bad_jobs.push(BadJob {
                        id,
                        error: format!("jobs[{i}]: {e}"),
                    }),
                }
            }
        }
        Some(_) => bad_jobs.push(BadJob {
            id: None,
            error: "jobs: not a list".into(),
        }),
    }
    Ok(StatusAnswer { response, bad_jobs })
}

/// Talks BootAgent to any server of the list.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    max_response_bytes: u64,
}

impl Client {
    pub fn new(
        timeout: Duration,
        max_response_bytes: u64,
        tls: crate::heartbeat::Tls<'_>,
    ) -> Result<Client, CallError> {
        let http = crate::heartbeat::http_client(timeout, tls).map_err(CallError::Client)?;
        Ok(Client {
            http,
            max_response_bytes,
        })
    }

    /// `POST <base>/agent/register`, with the host's credential when it holds one.
    pub async fn register(
        &self,
        base: &str,
        req: &RegisterRequest,
        credential: &str,
    ) -> Result<RegisterResponse, CallError> {
        let url = format!("{base}/agent/register");
        let body = self.post(&url, req, credential).await?;
        decode(&url, &body)
    }

    /// `POST <base>/agent/status`, with the host's credential when it holds one.
    pub async fn status(
        &self,
        base: &str,
        req: &StatusRequest,
        credential: &str,
    ) -> Result<StatusAnswer, CallError> {
        let url = format!("{base}/agent/status");
        let body = self.post(&url, req, credential).await?;
        decode_status(&body).map_err(|source| CallError::Decode { url, source })
    }

    async fn post(
        &self,
        url: &str,
        req: &impl Serialize,
        credential: &str,
    ) -> Result<Vec<u8>, CallError> {
        let transport = |error| CallError::Transport {
            url: url.to_string(),
            error,
        };
        let mut post = self.http.post(url).json(req);
        if !credential.is_empty() {
            // `Authorization: Bearer <credential>` (proto::bootagent::AUTH_SCHEME).
            post = post.bearer_auth(credential);
        }
        let resp = post.send().await.map_err(transport)?;
        let status = resp.status().as_u16();
        if status == 404 || status == 405 {
            return Err(CallError::NotSupported {
                url: url.to_string(),
                status,
            });
        }
        let body = self.read_capped(url, resp).await?;
        if status == 401 || status == 403 {
            let text: String = String::from_utf8_lossy(&body).chars().take(300).collect();
            return Err(CallError::Refused {
                url: url.to_string(),
                status,
                body: proto::clean_text(text.trim(), 300),
            });
        }
        if !(200..300).contains(&status) {
            let text: String = String::from_utf8_lossy(&body).chars().take(200).collect();
            return Err(CallError::Status {
                url: url.to_string(),
                status,
                body: text.trim().to_string(),
            });
        }
        Ok(body)
    }

    async fn read_capped(&self, url: &str, resp: reqwest::Response) -> Result<Vec<u8>, CallError> {
        use crate::heartbeat::Capped;
        crate::heartbeat::read_capped(resp, self.max_response_bytes)
            .await
            .map_err(|e| match e {
                Capped::TooLarge => CallError::TooLarge {
                    url: url.to_string(),
                    limit: self.max_response_bytes,
                },
                Capped::Transport(error) => CallError::Transport {
                    url: url.to_string(),
                    error,
                },
            })
    }
}

fn decode<T: DeserializeOwned>(url: &str, body: &[u8]) -> Result<T, CallError> {
    serde_json::from_slice(body).map_err(|source| CallError::Decode {
        url: url.to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::bootagent::Action;

    #[test]
    fn one_bad_job_costs_only_itself() {
        let a = decode_status(
            br#"{"status":0,"jobs":[
                {"id":"1","action":"stop","name":"a"},
                {"id":"2","action":"reboot","name":"a"},
                {"action":5},
                {"id":"3","action":"config","step":20}
            ]}"#,
        )
        .unwrap();
        let ids: Vec<_> = a.response.jobs.iter().map(|j| j.id.as_str()).collect();
        assert_eq!(ids, ["1", "3"]);
        assert_eq!(a.response.jobs[1].action, Action::Config);
        assert_eq!(a.bad_jobs.len(), 2);
        assert_eq!(a.bad_jobs[0].id.as_deref(), Some("2"));
        assert_eq!(a.bad_jobs[1].id, None);
    }

    #[test]
    fn answers_that_are_not_status_answers() {
        assert!(decode_status(b"").is_err());
        assert!(decode_status(b"[1]").is_err());
        assert!(decode_status(br#"{"status":"x"}"#).is_err());
        let a = decode_status(br#"{"status":1,"jobs":null}"#).unwrap();
        assert_eq!(a.response.status, 1);
        let a = decode_status(br#"{"jobs":{"id":"1"}}"#).unwrap();
        assert_eq!(a.bad_jobs.len(), 1);
    }

    #[test]
    fn waiting_is_read_cleaned_and_never_fatal() {
        let a = decode_status(
            br#"{"status":0,"jobs":[],"waiting":[{"name":"falcon","version":"3.1.3",
                "reason":"waiting: no checksum\nFORGED LINE"}]}"#,
        )
        .unwrap();
        assert_eq!(a.response.waiting.len(), 1);
        assert_eq!(
            a.response.waiting[0].reason,
            "waiting: no checksum FORGED LINE"
        );
        for junk in [r#""yes""#, "7", r#"[{"name": 1}]"#, "null"] {
            let body = format!(r#"{{"status":0,"waiting":{junk}}}"#);
            let a = decode_status(body.as_bytes()).unwrap();
            assert!(a.response.waiting.is_empty(), "{junk}");
        }
        let many: Vec<String> = (0..1000)
            .map(|i| format!(r#"{{"name":"a{i}","reason":"{}"}}"#, "x".repeat(2000)))
            .collect();
        let body = format!(r#"{{"status":0,"waiting":[{}]}}"#, many.join(","));
        let a = decode_status(body.as_bytes()).unwrap();
        assert_eq!(a.response.waiting.len(), MAX_WAITING);
        assert!(a.response.waiting[0].reason.len() <= MAX_WAITING_REASON_LEN);
    }
}
