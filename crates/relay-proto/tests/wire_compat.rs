//! Every wire type round-trips, and what earlier versions sent keeps parsing.

use chrono::{TimeZone, Utc};
use relay_proto::{DeliveryState, Event, EventKind, MessageKind, PeerInfo, PeerKind, PeerRef, Receipt, RecipientStatus, StoredMessage};
use serde::Serialize;
use serde::de::DeserializeOwned;

fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(value: &T) {
    let json = serde_json::to_string(value).unwrap();
    let back: T = serde_json::from_str(&json).unwrap();
    assert_eq!(&back, value, "{json}");
}

fn peer(n: u8) -> PeerRef {
    PeerRef { peer_id: format!("p_{n}"), name: format!("host:{n}") }
}

#[test]
fn every_event_kind_round_trips() {
    for kind in [EventKind::Message, EventKind::Dm, EventKind::PeerJoined, EventKind::PeerLeft, EventKind::Receipt] {
        let receipt = kind == EventKind::Receipt;
        let event = Event {
            kind,
            id: "m_1".into(),
            seq: 7,
            group: "g".into(),
            sender: peer(1),
            sender_kind: if kind == EventKind::Dm { PeerKind::Human } else { PeerKind::Agent },
            recipient: (kind == EventKind::Dm || receipt).then(|| peer(2)),
            preview: "hi".into(),
            time: Utc.with_ymd_and_hms(2026, 11, 25, 12, 0, 0).unwrap(),
            text: (kind == EventKind::Message).then(|| "the whole text".into()),
            state: receipt.then_some(DeliveryState::Held),
            detail: receipt.then(|| "waiting for the human".into()),
        };
        round_trip(&event);
        let json = serde_json::to_value(&event).unwrap();
        assert_eq!(json["kind"], kind.as_str());
        assert_eq!(json.get("recipient").is_some(), kind == EventKind::Dm || receipt);
        assert_eq!(json.get("state").is_some(), receipt, "only receipts carry a state");
        assert_eq!(json.get("sender_kind").is_some(), kind == EventKind::Dm, "agents, the usual senders, go unsaid");
        if kind == EventKind::Message {
            let mut newer = json.clone();
            newer["sender_kind"] = "robot".into();
            let read: Event = serde_json::from_value(newer).unwrap();
            assert_eq!(read.sender_kind, PeerKind::Unknown, "a kind from a newer server");
        }
    }
}

#[test]
fn messages_and_peers_round_trip() {
    let at = Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap();
    for kind in [MessageKind::Broadcast, MessageKind::Dm] {
        round_trip(&StoredMessage {
            id: "m_1".into(),
            seq: 1,
            group_id: "g".into(),
            kind,
            sender: peer(1),
            recipient: (kind == MessageKind::Dm).then(|| peer(2)),
            text: "multi\nline ✓".into(),
            sent_at: at,
            delivery: (kind == MessageKind::Dm)
                .then(|| vec![RecipientStatus { peer: peer(2), state: DeliveryState::Read, detail: None, updated_at: Some(at) }]),
        });
        assert_eq!(serde_json::to_value(kind).unwrap(), kind.as_str());
    }
    for (git_branch, kind) in [(None, PeerKind::Human), (Some("main".to_owned()), PeerKind::Agent)] {
        round_trip(&PeerInfo {
            peer_id: "p_1".into(),
            display_name: "host:dir".into(),
            kind,
            group_id: "g".into(),
            hostname: "host".into(),
            working_directory: "/dir".into(),
            git_branch,
            online: true,
            last_seen: at,
            joined_at: at,
        });
    }
}

#[test]
fn receipts_and_statuses_round_trip() {
    for state in DeliveryState::ALL {
        round_trip(&Receipt { message_id: "m_1".into(), group: "g".into(), state, detail: None });
        round_trip(&RecipientStatus {
            peer: peer(3),
            state,
            detail: Some("why".into()),
            updated_at: Some(Utc.with_ymd_and_hms(2026, 11, 25, 12, 0, 0).unwrap()),
        });
    }
}

/// Events as version 1 servers sent them, a receipt written before receipts existed (as a
/// newer server's event), and one kind this version does not know: all must parse, the
/// unknown one as `Unknown`, so old clients survive new servers.
#[test]
fn the_v1_event_fixture_keeps_parsing() {
    let fixture = include_str!("fixtures/events-v1.jsonl");
    let events: Vec<Event> = fixture.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect();
    let kinds: Vec<EventKind> = events.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [EventKind::Message, EventKind::Dm, EventKind::PeerJoined, EventKind::PeerLeft, EventKind::Receipt, EventKind::Unknown]
    );
    assert_eq!(events[1].recipient.as_ref().unwrap().name, "box:web");
    assert_eq!(events[1].time.timestamp_subsec_millis(), 250);
    assert_eq!(events[4].preview, "", "a missing preview defaults to empty");
    assert_eq!(events[4].state, Some(DeliveryState::Read));
    assert!(events[..4].iter().all(|e| e.text.is_none() && e.state.is_none()), "fields added later default to none");
}
