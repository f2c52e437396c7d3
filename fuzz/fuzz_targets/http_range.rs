//! ops-meta's file server: `Range` header parsing (`parse_range`) and the mapping of a
//! request path below `tarballDir` (`meta::tarfs::safe_relative`, which the hasher uses too). A range is always inside the file; an accepted path
//! holds plain, visible names only.
#![no_main]

use std::path::Component;

use libfuzzer_sys::fuzz_target;
use meta::http::fuzzing::{parse_range, RangeReq};

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    // First byte: how the file length is chosen (small lengths matter most).
    let (len, rest) = match data[0] % 4 {
        0 => (0, &data[1..]),
        1 => (u64::from(data[1]), &data[2..]),
        2 if data.len() >= 9 => (
            u64::from_le_bytes(data[1..9].try_into().unwrap()),
            &data[9..],
        ),
        _ => (u64::MAX, &data[1..]),
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    match parse_range(text, len) {
        RangeReq::One(s, e) => {
            assert!(s <= e && e < len, "{text:?} of {len}: {s}-{e}");
        }
        RangeReq::Unsatisfiable | RangeReq::Full => {}
    }

    if let Ok(p) = meta::tarfs::safe_relative(text) {
        assert!(!p.as_os_str().is_empty());
        for c in p.components() {
            let Component::Normal(n) = c else {
                panic!("{text:?} became {p:?}");
            };
            let n = n.to_string_lossy();
            assert!(
                !n.starts_with('.') && !n.contains('\\') && !n.contains('\0'),
                "{p:?}"
            );
        }
    }
});
