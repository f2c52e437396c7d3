//! ops-updater's `cfg.json` reader (`updater::config::Config::parse`), and the heartbeat
//! and BootAgent server URLs derived from an accepted config.
#![no_main]

use libfuzzer_sys::fuzz_target;
use updater::config::{heartbeat_url, Config};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = match Config::parse(text) {
        Ok(p) => p,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    let cfg = parsed.config;
    let url = cfg.heartbeat_url();
    assert!(
        url.starts_with("http://") || url.starts_with("https://"),
        "{url:?}"
    );
    assert_eq!(heartbeat_url(&cfg.server).as_deref(), Ok(url.as_str()));
    let _ = updater::boot::servers::base_url(&cfg.server);
    let _ = cfg.interval();
});
