//! URL building: the tarball and `.md5` URLs made from a desired agent by the original
//! rule (`{base}/{name}-{version}.tar.gz`), and the heartbeat and BootAgent server URLs
//! made from the updater's `server` value. Checked against an independent URL parser: a
//! validated name and version can only ever add one last path segment, never change the
//! host a download goes to.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proto::legacy::DesiredAgent;
use updater::engine::Desired;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.split('\n');
    let mut next = || parts.next().unwrap_or("").to_string();
    let d = DesiredAgent {
        name: next(),
        version: next(),
        tarball: next(),
        md5: next(),
        cmd: "start".into(),
        sha256: None,
        envs: None,
        limits: None,
    };
    let server = next();

    let file = d.tarball_file();
    assert!(d.tarball_url().ends_with(&format!("/{file}")));
    assert!(d.md5_url().ends_with(&format!("/{file}.md5")));
    if let Ok(w) = Desired::from_wire(&d) {
        for (base, built, last) in [
            (&d.tarball, &w.tarball_url, file.clone()),
            (
                if d.md5.is_empty() { &d.tarball } else { &d.md5 },
                &w.md5_url,
                format!("{file}.md5"),
            ),
        ] {
            same_host(base, built, &last);
        }
    }

    if let Ok(hb) = updater::config::heartbeat_url(&server) {
        assert!(
            hb.starts_with("http://") || hb.starts_with("https://"),
            "{hb:?}"
        );
        let base = updater::boot::servers::base_url(&server).expect("heartbeat_url accepted it");
        assert!(hb.starts_with(&base), "{hb:?} does not start with {base:?}");
    }
});

/// When `base` is a URL without query or fragment, `built` is that URL with `last` as one
/// more path segment, on the same host and port.
fn same_host(base: &str, built: &str, last: &str) {
    let Ok(b) = url::Url::parse(base) else {
        return;
    };
    if b.query().is_some() || b.fragment().is_some() || b.cannot_be_a_base() {
        return;
    }
    let u = url::Url::parse(built).unwrap_or_else(|e| panic!("{built:?} from {base:?}: {e}"));
    assert_eq!(u.host_str(), b.host_str(), "{built:?} from {base:?}");
    assert_eq!(u.port_or_known_default(), b.port_or_known_default());
    assert_eq!(u.query(), None, "{built:?}");
    assert_eq!(
        u.path_segments().and_then(|mut s| s.next_back()),
        Some(last),
        "{built:?}"
    );
}
