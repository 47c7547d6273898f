//! Sessions that outlive their shards' leader changes (`reattach.rs`).

use super::*;
use fabric_proto::internal::Placement;

fn subscribe(s: &mut Session, r: u64, conv: &str, from: u64) {
    text(
        s,
        &format!(r#"{{"op":"subscribe","ref":{r},"conv":"{conv}","from":{from}}}"#),
    );
}

fn event_in(conv: &str, seq: u64) -> Reply {
    Reply::Frame(ServerOp::Event(DeliveredEvent {
        conv: conv.into(),
        seq,
        from: "q".into(),
        body: Body::from_json_text("1").unwrap(),
        ts: 1,
    }))
}

/// (op, pos or seq) of each queued frame.
fn pushes(s: &mut Session) -> Vec<(String, u64)> {
    frames(s)
        .iter()
        .map(|v| {
            let n = v["pos"].as_u64().or(v["seq"].as_u64()).unwrap_or(0);
            (v["op"].as_str().unwrap_or("-").to_string(), n)
        })
        .collect()
}

/// An open session subscribed to `c` from 1 that handed its client deliveries 1 and 2 and
/// events 1 and 2, every queue drained.
fn open_with_history() -> Session {
    let mut s = session();
    welcome(&mut s);
    subscribe(&mut s, 1, "c", 1);
    requests(&mut s);
    s.handle_reply(NOW, 0, ok(1));
    for r in [deliver(1), deliver(2), event(1), event(2)] {
        s.handle_reply(NOW, 0, r);
    }
    assert_eq!(frames(&mut s).len(), 5);
    s
}

/// An attach request: its route, inbox mark and (conversation, next seq) pairs.
type AttachSeen = (Route, Option<u64>, Vec<(String, u64)>);

fn attaches(reqs: &[(Route, ShardOp)]) -> Vec<AttachSeen> {
    reqs.iter()
        .filter_map(|(route, op)| match op {
            ShardOp::Attach {
                inbox_after, subs, ..
            } => Some((
                *route,
                *inbox_after,
                subs.iter().map(|(c, n)| (c.to_string(), *n)).collect(),
            )),
            _ => None,
        })
        .collect()
}

#[test]
fn a_leader_change_attaches_again_from_what_the_client_has_and_drops_what_it_had() {
    // Proves the session is not closed by a leader change: it asks the shard to attach its
    // inbox from after the highest pos it handed out and its subscription from the next seq,
    // and once attached, pushes the client already has are dropped (credit returned) while
    // the rest pass, so each pos and each seq reaches the client once, in order.
    let mut s = open_with_history();
    s.handle_shard_detached(NOW, 0, &|_| Some(0));
    assert!(!s.is_closed());
    assert!(frames(&mut s).is_empty(), "the client hears nothing");
    let reqs = requests(&mut s);
    assert_eq!(
        attaches(&reqs),
        vec![(Route::Shard(0), Some(2), vec![("c".to_string(), 3)])]
    );
    s.handle_reply(
        NOW,
        0,
        Reply::Attached {
            attempt: 1,
            refused: None,
        },
    );
    assert_eq!(s.stats().reattached, 1);
    for r in [deliver(2), deliver(3), event(2), event(3), deliver(1)] {
        s.handle_reply(NOW, 0, r);
    }
    assert_eq!(
        pushes(&mut s),
        vec![("deliver".into(), 3), ("event".into(), 3)]
    );
    assert_eq!(s.stats().pushes_duplicate, 3);
    let credit: u32 = requests(&mut s)
        .iter()
        .map(|(route, op)| match (route, op) {
            (Route::Shard(0), ShardOp::Flushed { frames }) => *frames,
            _ => 0,
        })
        .sum();
    assert_eq!(credit, 3, "a dropped push's credit goes back at once");
}

#[test]
fn placement_decides_what_each_shard_attaches() {
    // Proves the attach names only what lives on the shard whose leader changed: the inbox
    // by the mesh's shard, each subscription by its conversation's; a shard holding nothing
    // of the session gets no attach.
    let mut s = open_with_history();
    subscribe(&mut s, 2, "d", 5);
    requests(&mut s);
    let place = |p: Placement<'_>| match p {
        Placement::Mesh(_) => Some(0),
        Placement::Conversation(_, "c") => Some(1),
        _ => Some(2),
    };
    s.handle_shard_detached(NOW, 1, &place);
    assert_eq!(
        attaches(&requests(&mut s)),
        vec![(Route::Shard(1), None, vec![("c".to_string(), 3)])]
    );
    s.handle_shard_detached(NOW, 2, &place);
    assert_eq!(
        attaches(&requests(&mut s)),
        vec![(Route::Shard(2), None, vec![("d".to_string(), 5)])]
    );
    s.handle_shard_detached(NOW, 3, &place);
    assert!(
        requests(&mut s).is_empty(),
        "nothing of the session on shard 3"
    );
}

#[test]
fn an_unavailable_attach_is_retried_until_request_timeout_then_the_session_closes() {
    // Proves an attach answered `unavailable` (no leader known yet) is sent again after
    // REATTACH_RETRY_MS, with the marks as they are then, and that a session whose attach is
    // not confirmed within request_timeout_ms closes with `unavailable` (the client resumes).
    let mut s = open_with_history();
    s.handle_shard_detached(NOW, 0, &|_| Some(0));
    requests(&mut s);
    let refused = Some((ErrorCode::Unavailable, "no leader yet".to_string()));
    s.handle_reply(
        NOW,
        0,
        Reply::Attached {
            attempt: 1,
            refused,
        },
    );
    assert!(!s.is_closed());
    assert_eq!(s.poll_timeout(), Some(NOW + REATTACH_RETRY_MS));
    s.handle_timeout(NOW + REATTACH_RETRY_MS);
    assert_eq!(attaches(&requests(&mut s)).len(), 1, "sent again");
    let deadline = NOW + SessionConfig::default().request_timeout_ms;
    s.handle_timeout(deadline - 1);
    assert!(!s.is_closed());
    s.handle_timeout(deadline);
    assert!(s.is_closed());
    assert_eq!(codes(&frames(&mut s)), vec!["unavailable"]);
    assert_eq!(closes(&requests(&mut s)), 1);
    assert_eq!(s.stats().reattach_failed, 1);
}

#[test]
fn an_attach_refused_for_a_peer_that_is_gone_closes_the_session() {
    // Proves a refusal other than `unavailable` is final: the client gets its code and the
    // session closes.
    let mut s = open_with_history();
    s.handle_shard_detached(NOW, 0, &|_| Some(0));
    requests(&mut s);
    let refused = Some((ErrorCode::Unauthorized, "peer gone".to_string()));
    s.handle_reply(
        NOW,
        0,
        Reply::Attached {
            attempt: 1,
            refused,
        },
    );
    assert!(s.is_closed());
    assert_eq!(codes(&frames(&mut s)), vec!["unauthorized"]);
}

#[test]
fn a_session_still_authenticating_closes_on_a_leader_change() {
    // Proves a hello whose shard's leader changed before it was answered ends the session
    // (its answer is lost with that leader): the client says hello again.
    let mut s = session();
    hello(&mut s);
    requests(&mut s);
    s.handle_shard_detached(NOW, 0, &|_| Some(0));
    assert!(s.is_closed());
    assert_eq!(codes(&frames(&mut s)), vec!["unavailable"]);
}

#[test]
fn a_client_subscribing_again_from_an_earlier_seq_gets_the_replay() {
    // Proves the duplicate filter is for attaches only: a client that subscribes again from
    // seq 1 on purpose gets events 1 and 2 again.
    let mut s = open_with_history();
    subscribe(&mut s, 2, "c", 1);
    requests(&mut s);
    s.handle_reply(NOW, 0, ok(2));
    s.handle_reply(NOW, 0, event_in("c", 1));
    s.handle_reply(NOW, 0, event_in("c", 2));
    assert_eq!(
        pushes(&mut s),
        vec![("ok".into(), 2), ("event".into(), 1), ("event".into(), 2)]
    );
}

#[test]
fn pushes_during_an_attach_and_answers_to_a_superseded_one_are_dropped() {
    // Proves what the attachment being replaced still pushes while an attach is under way
    // never reaches the client (taking it would move the marks past what the attach
    // replays), and that the answer to an earlier attach, superseded by a second leader
    // change, does not end the wait: only the latest attempt's answer does.
    let mut s = open_with_history();
    s.handle_shard_detached(NOW, 0, &|_| Some(0));
    s.handle_shard_detached(NOW, 0, &|_| Some(0));
    let sent = attaches(&requests(&mut s));
    assert_eq!(sent.len(), 2);
    s.handle_reply(NOW, 0, event(5));
    s.handle_reply(NOW, 0, deliver(9));
    let stale = Reply::Attached {
        attempt: 1,
        refused: None,
    };
    s.handle_reply(NOW, 0, stale);
    s.handle_reply(NOW, 0, event(6));
    assert!(
        frames(&mut s).is_empty(),
        "nothing while the latest attach is out"
    );
    assert_eq!(s.stats().reattached, 0);
    let latest = Reply::Attached {
        attempt: 2,
        refused: None,
    };
    s.handle_reply(NOW, 0, latest);
    for r in [event(3), deliver(3)] {
        s.handle_reply(NOW, 0, r);
    }
    assert_eq!(
        pushes(&mut s),
        vec![("event".into(), 3), ("deliver".into(), 3)]
    );
    assert_eq!(s.stats().reattached, 1);
}

#[test]
fn a_subscription_the_shard_takes_during_an_attach_is_named_by_the_attach() {
    // Proves a subscribe the shard confirms while the session's attach to it is being retried
    // is named by the retry (from the client's `from`), and one confirmed while an attach is
    // out sends a new attempt naming it, so no attach ends a subscription the client holds;
    // a refused subscribe is not named.
    let mut s = open_with_history();
    s.handle_shard_detached(NOW, 0, &|_| Some(0));
    requests(&mut s);
    let unavailable = Some((ErrorCode::Unavailable, "no leader yet".to_string()));
    let attached = |attempt, refused| Reply::Attached { attempt, refused };
    s.handle_reply(NOW, 0, attached(1, unavailable));
    // Waiting to retry: `d` is confirmed, `x` refused.
    subscribe(&mut s, 2, "d", 5);
    subscribe(&mut s, 3, "x", 1);
    requests(&mut s);
    s.handle_reply(NOW, 0, ok(2));
    let refusal = ServerOp::Error {
        r: Some(3),
        code: ErrorCode::NotFound,
        message: "no such conversation".into(),
    };
    s.handle_reply(NOW, 0, Reply::Frame(refusal));
    assert!(
        attaches(&requests(&mut s)).is_empty(),
        "the retry waits its turn"
    );
    s.handle_timeout(NOW + REATTACH_RETRY_MS);
    let named = vec![("c".to_string(), 3), ("d".to_string(), 5)];
    assert_eq!(
        attaches(&requests(&mut s)),
        vec![(Route::Shard(0), Some(2), named.clone())]
    );
    // Attempt 2 is out: `e` is confirmed before its answer, so attempt 3 names it.
    subscribe(&mut s, 4, "e", 1);
    requests(&mut s);
    s.handle_reply(NOW, 0, ok(4));
    let mut named3 = named;
    named3.push(("e".to_string(), 1));
    assert_eq!(
        attaches(&requests(&mut s)),
        vec![(Route::Shard(0), Some(2), named3)]
    );
    s.handle_reply(NOW, 0, attached(2, None));
    assert_eq!(s.stats().reattached, 0, "attempt 2's answer is superseded");
    s.handle_reply(NOW, 0, attached(3, None));
    assert_eq!(s.stats().reattached, 1);
    // Attached: a later subscribe's answer sends nothing more.
    subscribe(&mut s, 5, "f", 1);
    requests(&mut s);
    s.handle_reply(NOW, 0, ok(5));
    assert!(attaches(&requests(&mut s)).is_empty());
}

#[test]
fn events_below_the_latest_subscribes_from_are_dropped() {
    // Proves an event below the `from` of the client's latest subscribe never reaches it:
    // after a leader change, an earlier subscribe answered `unavailable` (outcome unknown) can
    // take effect late and replay from its own, lower `from`; those events are dropped and
    // their credit returned, while a client's own subscribe to an earlier seq still replays.
    let mut s = open_with_history();
    subscribe(&mut s, 2, "c", 194);
    requests(&mut s);
    for r in [event(157), event(193), event(194), event(195)] {
        s.handle_reply(NOW, 0, r);
    }
    assert_eq!(
        pushes(&mut s),
        vec![("event".into(), 194), ("event".into(), 195)]
    );
    assert_eq!(s.stats().pushes_duplicate, 2);
    // Asked again from an earlier seq: the replay passes.
    subscribe(&mut s, 3, "c", 1);
    requests(&mut s);
    s.handle_reply(NOW, 0, event(1));
    assert_eq!(pushes(&mut s), vec![("event".into(), 1)]);
}

#[test]
fn a_replay_the_client_did_not_ask_for_after_its_latest_subscribe_is_dropped() {
    // Proves that once the client's latest subscribe is confirmed, an event below what the
    // subscription then handed out is dropped (an earlier subscribe, answered `unavailable`,
    // that took effect after it and replays from its own `from`), while the confirmed
    // subscribe's own replay from its `from` passes, and a later subscribe to an earlier seq
    // replays again once confirmed.
    let mut s = session();
    welcome(&mut s);
    subscribe(&mut s, 1, "c", 1);
    requests(&mut s);
    s.handle_reply(NOW, 0, ok(1));
    for r in [event(146), event(147), event(148)] {
        s.handle_reply(NOW, 0, r);
    }
    // The earlier subscribe's late replay: 146 and 147 again.
    for r in [event(146), event(147), event(149)] {
        s.handle_reply(NOW, 0, r);
    }
    let seqs: Vec<u64> = pushes(&mut s)
        .into_iter()
        .filter(|(op, _)| op == "event")
        .map(|(_, n)| n)
        .collect();
    assert_eq!(seqs, vec![146, 147, 148, 149]);
    assert_eq!(s.stats().pushes_duplicate, 2);
    // Asked again from 1: once confirmed, the replay passes.
    subscribe(&mut s, 2, "c", 1);
    requests(&mut s);
    s.handle_reply(NOW, 0, ok(2));
    s.handle_reply(NOW, 0, event(146));
    assert_eq!(
        pushes(&mut s),
        vec![("ok".into(), 2), ("event".into(), 146)]
    );
}
