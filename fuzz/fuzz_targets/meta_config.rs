//! ops-meta's `cfg.json` reader (`meta::config::parse`), then the desired state compiled
//! from an accepted config: the answer written for a host must be the bytes serde writes
//! for the same answer.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use meta::desired::Desired;
use meta::digests::Digests;
use proto::legacy::HeartbeatResponse;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let loaded = match meta::config::parse(text) {
        Ok(l) => l,
        Err((errors, _warnings)) => {
            assert!(!errors.is_empty(), "refused without a reason");
            for e in &errors {
                let _ = e.to_string();
            }
            return;
        }
    };
    let _ = meta::config::listen_addr(&loaded.config.http.listen);
    let mut hosts = vec![String::new(), "web-01".to_string()];
    for a in &loaded.config.agents {
        for o in &a.others {
            hosts.push(format!("{}x", o.prefix));
        }
    }
    for r in &loaded.config.tag_rules {
        hosts.push(r.prefix.clone());
    }
    let desired = Desired::compile(Arc::new(loaded.config), Arc::new(Digests::new()));
    let _ = desired.artifacts();
    for h in hosts.iter().take(16) {
        let mut out = Vec::new();
        desired.write_response(h, &mut out);
        let want = serde_json::to_vec(&HeartbeatResponse {
            error_message: String::new(),
            desired_agents: desired.for_host(h),
        })
        .unwrap();
        assert_eq!(out, want, "prebuilt answer differs for host {h:?}");
        assert_eq!(&desired.response_bytes(h)[..], &want[..]);
        let _ = desired.extras_for(h);
    }
});
