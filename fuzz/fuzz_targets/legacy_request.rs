//! The legacy heartbeat request as ops-meta reads it. The borrowed fast-path parser
//! (`HeartbeatRequestRef`) must accept exactly what the owned type accepts and read the
//! same content; what it reads must write back to itself; and a request that passes the
//! server's checks must come back from the fleet store as it was reported.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meta::store::{FleetStore, MemStore};
use proto::legacy::{HeartbeatRequest, HeartbeatRequestRef, RealAgentRef};

fuzz_target!(|data: &[u8]| {
    let owned = serde_json::from_slice::<HeartbeatRequest>(data).ok();
    let borrowed = serde_json::from_slice::<HeartbeatRequestRef>(data).ok();
    assert_eq!(
        borrowed.as_ref().map(HeartbeatRequestRef::to_owned_request),
        owned,
        "the fast-path parser disagrees with the owned one"
    );
    let (Some(owned), Some(borrowed)) = (owned, borrowed) else {
        return;
    };

    let text = serde_json::to_vec(&owned).unwrap();
    let back: HeartbeatRequest = serde_json::from_slice(&text).unwrap();
    assert_eq!(back, owned, "a request does not survive a round trip");
    for a in &owned.real_agents {
        assert_eq!(
            serde_json::to_vec(&RealAgentRef::from(a)).unwrap(),
            serde_json::to_vec(a).unwrap(),
            "the borrowed agent serializes differently"
        );
    }

    // The checks of ops-meta's heartbeat handler, then the store, as the handler does.
    // Tiny interner caps, so that the overflow path is taken too.
    if proto::validate_hostname(&borrowed.hostname).is_err()
        || borrowed.real_agents.iter().any(|a| {
            proto::validate_agent_name(&a.name).is_err()
                || proto::validate_version(&a.version).is_err()
        })
    {
        return;
    }
    // The store keeps a status as documented (docs/ops-meta.md, Limits): cut to 256 bytes
    // at a character boundary, control characters replaced by spaces.
    let mut want = owned.real_agents.clone();
    for a in &mut want {
        let mut end = a.status.len().min(meta::store::MAX_STATUS_LEN);
        while !a.status.is_char_boundary(end) {
            end -= 1;
        }
        a.status = a.status[..end]
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
    }
    let store = MemStore::with_caps(4, 2);
    for now in [1, 2] {
        store.record(&borrowed.hostname, &borrowed.real_agents, now);
        assert_eq!(
            store.host(&borrowed.hostname),
            Some(want.clone()),
            "the store does not give back what was reported"
        );
    }
    for a in &owned.real_agents {
        let st = store.agent_status(&a.name);
        assert_eq!(st.len(), 1);
        let e = st.get(0).unwrap();
        assert_eq!(e.hostname, owned.hostname);
        assert!(
            e.agent.is_some(),
            "a reported agent is missing from its status"
        );
    }
});
