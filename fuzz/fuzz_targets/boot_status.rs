//! BootAgent `POST /agent/status`: the report as ops-meta reads it, the answer and its job
//! list as ops-updater reads them (job by job), and the check every job passes before it
//! runs on a host (an install carries a SHA-256 or an MD5, lowercase).
#![no_main]

use libfuzzer_sys::fuzz_target;
use proto::bootagent::{Action, StatusRequest, StatusResponse};
use updater::boot::client::{decode_status, MAX_JOBS_PER_ANSWER};

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = serde_json::from_slice::<StatusRequest>(data) {
        let back: StatusRequest = serde_json::from_slice(&serde_json::to_vec(&r).unwrap()).unwrap();
        assert_eq!(back, r);
    }
    let Ok(answer) = decode_status(data) else {
        return;
    };
    assert!(answer.response.jobs.len() + answer.bad_jobs.len() <= MAX_JOBS_PER_ANSWER);
    let text = serde_json::to_vec(&answer.response).unwrap();
    let back: StatusResponse = serde_json::from_slice(&text).unwrap();
    assert_eq!(
        back, answer.response,
        "a status answer does not survive a round trip"
    );
    for job in &answer.response.jobs {
        for only in ["", "falcon-agent"] {
            let Ok(checked) = updater::boot::exec::check(job, only) else {
                continue;
            };
            assert!(!job.id.is_empty());
            if job.action != Action::Config {
                let name = checked.agent.as_ref().expect("agent jobs name their agent");
                assert_eq!(name.as_str(), job.name);
            }
            if matches!(job.action, Action::Install | Action::Upgrade) {
                let v = checked.version.as_ref().expect("install carries a version");
                assert_eq!(v.as_str(), job.version);
                let d = checked.digests.expect("install and upgrade carry digests");
                assert!(d.sha256.is_some() || d.md5.is_some(), "{job:?}");
                if let Some(h) = &d.sha256 {
                    assert!(lower_hex(h, 64), "{h:?}");
                }
                if let Some(h) = &d.md5 {
                    assert!(lower_hex(h, 32), "{h:?}");
                }
            } else {
                assert!(checked.digests.is_none() && checked.version.is_none());
            }
        }
    }
});

fn lower_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}
