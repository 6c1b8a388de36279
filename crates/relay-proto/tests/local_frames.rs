//! The local control-plane frames: every variant round-trips, today's frames keep parsing,
//! and the frame reader survives whatever bytes arrive.

use chrono::{TimeZone, Utc};
use relay_proto::local::*;
use relay_proto::{DeliveryState, Event, EventKind, MessageKind, MessageStatus, PeerInfo, PeerRef, Receipt, RecipientStatus, Sent};

fn agent() -> AgentInfo {
    AgentInfo {
        pid: 4242,
        messaging_socket: Some("/tmp/cc-socks/4242.sock".into()),
        session_id: Some("s-1".into()),
        claude_config_dir: Some("/home/me/.claude-work".into()),
        home: Some("/home/me".into()),
    }
}

fn at() -> chrono::DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 25, 12, 0, 0).unwrap()
}

fn peer_info(git_branch: Option<&str>) -> PeerInfo {
    PeerInfo {
        peer_id: "p_2".into(),
        display_name: "box:web".into(),
        kind: Default::default(),
        group_id: "g".into(),
        hostname: "box".into(),
        working_directory: "/web".into(),
        git_branch: git_branch.map(str::to_owned),
        online: git_branch.is_some(),
        last_seen: at(),
        joined_at: at(),
    }
}

fn message_status() -> MessageStatus {
    let peer = PeerRef { peer_id: "p_2".into(), name: "box:web".into() };
    MessageStatus {
        message_id: "m_1".into(),
        group_id: "g".into(),
        kind: MessageKind::Broadcast,
        sent_at: at(),
        recipients: vec![
            RecipientStatus { peer: peer.clone(), state: DeliveryState::Held, detail: Some("waiting".into()), updated_at: Some(at()) },
            RecipientStatus { peer, state: DeliveryState::Stored, detail: None, updated_at: None },
        ],
    }
}

fn sent(to: Option<PeerRef>, repeated: bool) -> Sent {
    let kind = if to.is_some() { MessageKind::Dm } else { MessageKind::Broadcast };
    let from = PeerRef { peer_id: "p_1".into(), name: "box:api".into() };
    Sent { message_id: "m_1".into(), seq: 7, group_id: "g".into(), kind, from, to, recipients: 1, sent_at: at(), repeated }
}

fn round_trip_request(r: Request) {
    let line = encode(&r);
    assert!(line.ends_with('\n') && !line[..line.len() - 1].contains('\n'));
    assert_eq!(decode::<Request>(line.trim_end().as_bytes()).unwrap(), r, "{line}");
}

fn round_trip_reply(r: Reply) {
    let line = encode(&r);
    assert_eq!(decode::<Reply>(line.trim_end().as_bytes()).unwrap(), r, "{line}");
}

fn attachment() -> Attachment {
    Attachment {
        pane: "%3".into(),
        server: "http://127.0.0.1:8765".into(),
        group: "g".into(),
        peer_id: "p_1".into(),
        display_name: "box:api".into(),
        working_directory: "/w".into(),
    }
}

fn upstream(state: ConnectionState) -> Upstream {
    let dropped = state == ConnectionState::Connected;
    Upstream {
        server: "http://s".into(),
        group: "g".into(),
        state,
        last_event_id: 9,
        panes: 2,
        error: None,
        reopened: u32::from(dropped),
        last_drop: dropped.then(|| "12:00:03: silent for 45 s".into()),
    }
}

#[test]
fn every_request_round_trips() {
    let full = AttachRequest {
        pane: "%3".into(),
        group: "g".into(),
        server: Some("http://s".into()),
        name: Some("n".into()),
        join_key: Some("k".repeat(8)),
        working_directory: "/w".into(),
        git_branch: Some("main".into()),
    };
    for r in [
        Request::Hello { version: PROTOCOL_VERSION, client: "test".into() },
        Request::Attach(full),
        Request::Attach(AttachRequest { pane: "%1".into(), group: "g".into(), working_directory: "/".into(), ..Default::default() }),
        Request::Detach { pane: "%3".into(), group: None },
        Request::Detach { pane: "%3".into(), group: Some("g".into()) },
        Request::Subscribe { pane: "%3".into(), since: Default::default() },
        Request::Subscribe { pane: "%3".into(), since: [("g".to_owned(), 41)].into() },
        Request::Status,
        Request::Credentials { pane: "%3".into() },
        Request::Agent { pane: "%3".into(), agent: agent() },
        Request::Agent { pane: "%3".into(), agent: AgentInfo { pid: 7, ..Default::default() } },
        Request::Report {
            pane: "%3".into(),
            receipts: vec![
                Receipt { message_id: "m_1".into(), group: "g".into(), state: DeliveryState::Notified, detail: None },
                Receipt { message_id: "m_2".into(), group: "g".into(), state: DeliveryState::Held, detail: Some("bypass mode".into()) },
            ],
        },
        Request::Delivery { pane: "%3".into(), path: DeliveryPath::Inbox, activity: Some("busy".into()) },
        Request::Delivery { pane: "%3".into(), path: DeliveryPath::Keys { why: "the agent is not Claude Code".into() }, activity: None },
        Request::Peers { pane: "%3".into() },
        Request::MessageStatus { pane: "%3".into(), group: "g".into(), message_id: "m_1".into() },
        Request::Send(SendRequest { pane: "%3".into(), group: "g".into(), text: "hi all".into(), ..Default::default() }),
        Request::Send(SendRequest {
            pane: "%3".into(),
            group: "g".into(),
            to: Some("p_2".into()),
            text: "hi".into(),
            idempotency_key: Some("k".into()),
        }),
        Request::Console { server: None, action: ConsoleAction::SignIn { name: None } },
        Request::Console { server: Some("https://relay.example".into()), action: ConsoleAction::SignIn { name: Some("Ann".into()) } },
        Request::Console { server: None, action: ConsoleAction::SignOutEverywhere },
        Request::Console { server: None, action: ConsoleAction::Pair { name: None } },
        Request::Console { server: None, action: ConsoleAction::Join { code: "ABCD-1234".into() } },
        Request::Shutdown,
    ] {
        round_trip_request(r);
    }
}

#[test]
fn every_reply_round_trips() {
    let event = Event {
        kind: EventKind::Message,
        id: "m_1".into(),
        seq: 1,
        group: "g".into(),
        sender: PeerRef { peer_id: "p_2".into(), name: "box:web".into() },
        sender_kind: Default::default(),
        recipient: None,
        preview: "hello".into(),
        time: Utc.with_ymd_and_hms(2026, 11, 25, 12, 0, 0).unwrap(),
        text: Some("hello, in full".into()),
        state: None,
        detail: None,
    };
    let status = Status {
        version: "0.1.0".into(),
        pid: 1,
        socket: "/tmp/s".into(),
        server: "https://relay.example".into(),
        attachments: vec![attachment()],
        upstreams: vec![upstream(ConnectionState::Connected)],
        subscribers: 3,
        held: [("%3".to_owned(), 2)].into(),
        delivery: [("%3".to_owned(), DeliveryPath::Keys { why: "no session".into() })].into(),
    };
    let mut replies = vec![
        Reply::Hello { version: PROTOCOL_VERSION, daemon: "0.1.0".into() },
        Reply::Attached { attachment: attachment(), already: true },
        Reply::Detached { pane: "%3".into(), groups: vec!["g".into()] },
        Reply::Subscribed { pane: "%3".into(), attachments: vec![attachment()] },
        Reply::Status { status },
        Reply::Noted { pane: "%3".into() },
        Reply::Credentials {
            pane: "%3".into(),
            credentials: vec![Credential { server: "s".into(), group: "g".into(), peer_id: "p".into(), token: "t".into() }],
        },
        Reply::Reported { pane: "%3".into(), queued: 2 },
        Reply::Agent { pane: "%3".into(), agent: agent() },
        Reply::Console {
            server: "s".into(),
            human: "Ann".into(),
            url: Some("s/console/sign-in/x".into()),
            code: None,
            expires_at: Some(at()),
        },
        Reply::Console { server: "s".into(), human: "Ann".into(), url: None, code: None, expires_at: None },
        Reply::ShuttingDown,
        Reply::Event { pane: "%3".into(), event },
        Reply::Peers { pane: "%3".into(), peers: vec![peer_info(None), peer_info(Some("main"))] },
        Reply::MessageStatus { status: message_status() },
        Reply::Sent { sent: sent(None, false) },
        Reply::Sent { sent: sent(Some(PeerRef { peer_id: "p_2".into(), name: "box:web".into() }), true) },
    ];
    for state in [ConnectionState::Connecting, ConnectionState::Connected, ConnectionState::Retrying] {
        let mut u = upstream(state);
        u.error = (state == ConnectionState::Retrying).then(|| "refused".into());
        replies.push(Reply::Connection { upstream: u });
    }
    for code in [
        ErrorCode::BadFrame,
        ErrorCode::TooLarge,
        ErrorCode::UnknownRequest,
        ErrorCode::VersionMismatch,
        ErrorCode::HelloFirst,
        ErrorCode::NotAttached,
        ErrorCode::Server,
        ErrorCode::Internal,
    ] {
        replies.push(Reply::Error { code, message: "m".into() });
    }
    for r in replies {
        round_trip_reply(r);
    }
}

#[test]
fn version_1_frames_keep_parsing() {
    for line in include_str!("fixtures/local-v1.jsonl").lines() {
        decode::<Request>(line.as_bytes()).unwrap_or_else(|e| panic!("{e}: {line}"));
    }
    let replies: Vec<Reply> = include_str!("fixtures/local-v1-replies.jsonl")
        .lines()
        .map(|l| decode(l.as_bytes()).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(matches!(replies.last(), Some(Reply::Error { code: ErrorCode::Other, .. })));
}

#[test]
fn decode_errors_say_what_is_wrong() {
    assert_eq!(decode::<Request>(b"{\"type\":\"teleport\"}"), Err(FrameError::UnknownType("teleport".into())));
    assert!(matches!(decode::<Request>(b"not json"), Err(FrameError::Malformed(_))));
    assert!(matches!(decode::<Request>(b"{\"type\":\"attach\"}"), Err(FrameError::Malformed(m)) if m.contains("missing field")));
    assert_eq!(decode::<Request>(b"{\"type\":\"status\"\xff}"), Err(FrameError::InvalidUtf8));
    assert_eq!(FrameError::UnknownType("x".into()).code(), ErrorCode::UnknownRequest);
}

fn lines(reader: &mut FrameReader) -> Vec<Result<Vec<u8>, FrameError>> {
    std::iter::from_fn(|| reader.next_line()).collect()
}

#[test]
fn frames_split_anywhere_reassemble() {
    let input = b"{\"type\":\"status\"}\r\n\n{\"type\":\"shutdown\"}\n{\"type\":\"sta";
    for chunk in 1..input.len() {
        let mut reader = FrameReader::default();
        let mut got = Vec::new();
        for piece in input.chunks(chunk) {
            reader.push(piece);
            got.extend(lines(&mut reader));
        }
        let got: Vec<Request> = got.into_iter().map(|l| decode(&l.unwrap()).unwrap()).collect();
        assert_eq!(got, [Request::Status, Request::Shutdown], "chunk size {chunk}");
        assert_eq!(reader.buffered(), "{\"type\":\"sta".len());
    }
}

#[test]
fn an_oversized_frame_is_reported_once_and_the_next_one_still_reads() {
    let max = 64;
    let mut reader = FrameReader::new(max);
    let huge = vec![b'x'; 10_000];
    for piece in huge.chunks(333) {
        reader.push(piece);
        assert!(lines(&mut reader).is_empty());
        assert!(reader.buffered() <= max + 333, "an oversized frame was buffered whole");
    }
    reader.push(b"\n{\"type\":\"status\"}\n");
    let got = lines(&mut reader);
    assert_eq!(got.len(), 2);
    assert_eq!(got[0], Err(FrameError::TooLarge { len: 10_000, max }));
    assert_eq!(decode::<Request>(got[1].as_ref().unwrap()).unwrap(), Request::Status);

    // a long line that arrives with its newline in one piece
    let mut reader = FrameReader::new(max);
    let mut line = vec![b'y'; 100];
    line.extend_from_slice(b"\n{\"type\":\"shutdown\"}\n");
    reader.push(&line);
    let got = lines(&mut reader);
    assert_eq!(got[0], Err(FrameError::TooLarge { len: 100, max }));
    assert_eq!(decode::<Request>(got[1].as_ref().unwrap()).unwrap(), Request::Shutdown);
}

/// Random bytes, random chunking: the reader never panics, never holds more than a frame,
/// and every line it yields is at most `max` bytes.
#[test]
fn garbage_never_breaks_the_reader() {
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rand = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let max = 200;
    for _ in 0..200 {
        let mut reader = FrameReader::new(max);
        for _ in 0..50 {
            let len = (rand() % 300) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| match rand() % 10 {
                    0 => b'\n',
                    1 => b'{',
                    2 => 0xff,
                    _ => (rand() % 256) as u8,
                })
                .collect();
            reader.push(&bytes);
            while let Some(line) = reader.next_line() {
                if let Ok(line) = line {
                    assert!(line.len() <= max);
                    let _ = decode::<Request>(&line);
                }
            }
            assert!(reader.buffered() <= max + 300);
        }
    }
}
