//! `.md5` and `.sha256` files (`md5sum`/`sha256sum` output or a bare digest) and BootAgent
//! `SHA256:<hex>` / `MD5:<hex>` checksums: whatever is accepted is a lowercase digest of the
//! right length, and what we write reads back.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proto::bootagent::{
    format_checksum, format_md5_checksum, parse_any_checksum, parse_checksum, Checksum,
};
use proto::legacy::{format_md5_file, parse_md5_file, parse_sha256_file};

fn lower_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Some(h) = parse_md5_file(&text) {
        assert!(lower_hex(&h, 32), "{h:?}");
        assert_eq!(
            parse_md5_file(&format_md5_file(&h, "a-1.tar.gz")),
            Some(h.clone())
        );
        assert_eq!(parse_md5_file(&format_md5_file(&h, &text)), Some(h));
    }
    if let Some(h) = parse_sha256_file(&text) {
        assert!(lower_hex(&h, 64), "{h:?}");
        assert_eq!(
            parse_sha256_file(&format!("{h}  a-1.tar.gz\n")),
            Some(h.clone())
        );
    }
    if let Some(h) = parse_checksum(&text) {
        assert!(lower_hex(&h, 64), "{h:?}");
        assert_eq!(parse_checksum(&format_checksum(&h)), Some(h));
    }
    match parse_any_checksum(&text) {
        Some(Checksum::Sha256(h)) => {
            assert_eq!(parse_checksum(&text).as_ref(), Some(&h));
        }
        Some(Checksum::Md5(h)) => {
            assert!(lower_hex(&h, 32), "{h:?}");
            assert!(matches!(
                parse_any_checksum(&format_md5_checksum(&h)),
                Some(Checksum::Md5(back)) if back == h
            ));
        }
        None => assert_eq!(parse_checksum(&text), None),
    }
});
