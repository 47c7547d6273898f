use super::*;

/// `limits` with one change.
fn with(f: impl FnOnce(&mut Limits)) -> Limits {
    let mut l = Limits::default();
    f(&mut l);
    l
}

/// The error text of `limits.validate()`, which must fail.
fn refused(limits: Limits) -> String {
    limits.validate().expect_err("refused").to_string()
}

#[test]
fn defaults_validate_and_are_the_cores_defaults() {
    // Proves the embedded defaults pass their own rules and that the cores' own `Default`s
    // (kept for the cores' tests, which cannot depend on this crate) are these limits.
    let l = Limits::default();
    l.validate().expect("defaults are valid");
    assert_eq!(l.session_config(), SessionConfig::default());
    assert_eq!(
        format!("{:?}", l.shard_config(0)),
        format!("{:?}", ShardConfig::default())
    );
    assert_eq!(l.restart_policy(), RestartPolicy::default());
    assert_eq!(l.body_bytes_max(), 1_047_552);
    assert_eq!(Limits::shards_for_cores(0), 1);
    assert_eq!(Limits::shards_for_cores(500), SHARDS_DEFAULT_MAX);
}

#[test]
fn every_range_is_enforced_and_named() {
    // Proves each limit's range is checked: one below its minimum (when the type allows) and
    // one above its maximum are refused with the key, the value and the range in the message,
    // and `set` reaches every key `entries` lists.
    for e in Limits::default().entries() {
        let mut l = Limits::default();
        assert!(l.set(e.key, e.value), "{} is settable", e.key);
        let below = e.range.min.checked_sub(1).filter(|v| !e.range.contains(*v));
        let above = e.range.max.checked_add(1);
        for bad in below.into_iter().chain(above) {
            let mut l = Limits::default();
            if !l.set(e.key, bad) {
                continue; // the type itself cannot hold it
            }
            let msg = refused(l);
            assert!(msg.starts_with(&format!("{} {bad} ", e.key)), "{msg}");
            assert!(msg.contains(&e.range.to_string()), "{msg}");
        }
    }
    assert!(!Limits::default().set("no_such_key", 1));
    assert!(
        !Limits::default().set("shards", u64::MAX),
        "u32 cannot hold it"
    );
    assert_eq!(LIMIT_KEYS.len(), Limits::default().entries().len());
}

#[test]
fn ranges_print_as_the_docs_write_them() {
    // Proves the range text docs/OPERATIONS.md is checked against.
    assert_eq!(LimitRange::at_least(1).to_string(), "at least 1");
    assert_eq!(
        LimitRange::between(2048, 8388608).to_string(),
        "2048..=8388608"
    );
    assert_eq!(
        LimitRange::off_or_at_least(100).to_string(),
        "0 (off) or at least 100"
    );
    assert!(LimitRange::off_or_at_least(100).contains(0));
    assert!(!LimitRange::off_or_at_least(100).contains(99));
}

#[test]
fn broken_relations_name_both_limits_and_their_values() {
    // Proves each relation between settable limits is refused with both limits' names and
    // values in the message.
    let msg = refused(with(|l| {
        l.shards = 8;
        l.partitions = 4;
    }));
    assert!(
        msg.contains("partitions 4") && msg.contains("shards 8"),
        "{msg}"
    );
    let msg = refused(with(|l| l.inbox_backlog_bytes_max = 1000));
    assert!(
        msg.contains("inbox_backlog_bytes_max 1000") && msg.contains("frame_bytes_max 1048576"),
        "{msg}"
    );
    let msg = refused(with(|l| l.mesh_inbox_backlog_bytes_max = (64 << 20) - 1));
    assert!(
        msg.contains("mesh_inbox_backlog_bytes_max 67108863")
            && msg.contains("inbox_backlog_bytes_max 67108864"),
        "{msg}"
    );
    let msg = refused(with(|l| {
        l.push_credit_frames_max = u32::MAX;
        l.shards = 1024;
        l.partitions = 1024;
    }));
    assert!(
        msg.contains("push_credit_frames_max 4294967295 x shards 1024")
            && msg.contains("inflight_requests_max 1024")
            && msg.contains(&SESSION_REPLY_QUEUE_LIMIT.to_string()),
        "{msg}"
    );
}

#[test]
fn derived_capacities_are_checked_against_what_they_must_cover() {
    // Proves the reply channel, transmit cap and frame rules: a reply channel or transmit cap
    // below what a session can be owed, or a frame limit below the largest deliver frame, is
    // refused naming every limit involved; the derived values pass.
    let l = with(|l| {
        l.inflight_requests_max = 256;
        l.push_credit_frames_max = 128;
        l.shards = 4;
    });
    l.validate().expect("derived capacities cover their rules");
    let owed = 256 + fabric_proto::BATCH_OPS_MAX + 128 * 4;
    assert_eq!(l.session_replies_owed_max(), owed);
    assert!(l.session_reply_queue_max() > owed);
    let msg = l.check_reply_queue(64).expect_err("too small").to_string();
    assert!(
        msg.contains("session_reply_queue_max 64")
            && msg.contains("inflight_requests_max 256")
            && msg.contains("push_credit_frames_max 128 x shards 4"),
        "{msg}"
    );
    let small_cap = SessionConfig {
        pending_transmit_frames_max: owed - 1,
        ..l.session_config()
    };
    let msg = l.check_session_config(&small_cap).expect_err("too small");
    assert!(
        msg.to_string()
            .contains(&format!("pending_transmit_frames_max {}", owed - 1)),
        "{msg}"
    );
    let small_frame = SessionConfig {
        frame_bytes_max: l.body_bytes_max() + 1000,
        ..l.session_config()
    };
    let msg = l.check_session_config(&small_frame).expect_err("too small");
    assert!(
        msg.to_string().contains("body_bytes_max 1047552 + 1024")
            && msg.to_string().contains("frame_bytes_max 1048552"),
        "{msg}"
    );
}
