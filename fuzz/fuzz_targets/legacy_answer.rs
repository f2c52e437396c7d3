//! The legacy heartbeat answer as ops-updater reads it: `updater::heartbeat::decode`
//! (entry by entry when the whole does not decode), then the validation of each desired
//! agent and the tarball and `.md5` URLs built from it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proto::legacy::{DesiredAgent, HeartbeatResponse};
use updater::engine::Desired;

fuzz_target!(|data: &[u8]| {
    let Ok(answer) = updater::heartbeat::decode(data) else {
        return;
    };
    let text = serde_json::to_vec(&answer.response).unwrap();
    let back: HeartbeatResponse = serde_json::from_slice(&text).unwrap();
    assert_eq!(
        back, answer.response,
        "an answer does not survive a round trip"
    );
    for d in &answer.response.desired_agents {
        check(d);
    }
});

fn check(d: &DesiredAgent) {
    let Ok(w) = Desired::from_wire(d) else {
        return;
    };
    let file = format!("/{}-{}.tar.gz", d.name, d.version);
    assert!(w.tarball_url.ends_with(&file), "{}", w.tarball_url);
    assert!(w.md5_url.ends_with(&format!("{file}.md5")), "{}", w.md5_url);
    for u in [&w.tarball_url, &w.md5_url] {
        assert!(
            u.starts_with("http://") || u.starts_with("https://"),
            "not an http URL: {u:?}"
        );
        assert!(
            !u.bytes()
                .any(|b| b.is_ascii_whitespace() || b.is_ascii_control()),
            "{u:?}"
        );
    }
    if let Some(sha) = &w.sha256 {
        assert!(sha.len() == 64 && sha.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')));
    }
}
