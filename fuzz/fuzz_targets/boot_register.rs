//! BootAgent `POST /agent/register`: the request body as ops-meta reads it and the answer
//! as ops-updater reads it, with the serial check.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proto::bootagent::{validate_agentsn, RegisterRequest, RegisterResponse};

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = serde_json::from_slice::<RegisterRequest>(data) {
        let back: RegisterRequest =
            serde_json::from_slice(&serde_json::to_vec(&r).unwrap()).unwrap();
        assert_eq!(back, r);
        let _ = proto::validate_hostname(&r.hostname);
        if validate_agentsn(&r.agentsn).is_ok() {
            assert!(r.agentsn.len() <= proto::bootagent::MAX_AGENTSN_LEN);
            assert!(r
                .agentsn
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-'));
        }
    }
    if let Ok(r) = serde_json::from_slice::<RegisterResponse>(data) {
        let back: RegisterResponse =
            serde_json::from_slice(&serde_json::to_vec(&r).unwrap()).unwrap();
        assert_eq!(back, r);
        if let Err(e) = validate_agentsn(&r.agentsn) {
            // The message quotes at most 64 characters of the value, escaped.
            assert!(!e.to_string().contains('\n'));
        }
    }
});
