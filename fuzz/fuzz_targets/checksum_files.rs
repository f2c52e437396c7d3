//! `.md5` files (`md5sum` output or a bare digest) and BootAgent `SHA256:<hex>` checksums:
//! whatever is accepted is a lowercase digest of the right length, and what we write reads
//! back.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proto::bootagent::{format_checksum, parse_checksum};
use proto::legacy::{format_md5_file, parse_md5_file};

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
    if let Some(h) = parse_checksum(&text) {
        assert!(lower_hex(&h, 64), "{h:?}");
        assert_eq!(parse_checksum(&format_checksum(&h)), Some(h));
    }
});
