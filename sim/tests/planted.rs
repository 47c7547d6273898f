//! The checkers can fail: each bug the shard core can plant (`ShardConfig.planted`) is found
//! within a fixed range of seeds, by the checker meant to find it, and the same seeds pass
//! without it. Each test also reruns the seeds with the fault the bug needs switched off and
//! expects silence, which shows the detection comes from that fault meeting that checker (and
//! not from some other difference).

use fabric_shard::PlantedBugs;
use fabric_sim::check::ViolationKind;
use fabric_sim::{run, swarm, SimOptions};
use std::collections::BTreeMap;

/// Seeds each test runs: fast in a debug build (well under a second per hundred), and enough
/// that every planted bug is found many times over (see the counts each failure prints).
const SEEDS: u64 = 200;

/// Violation counts by kind over the seeds, with `tweak` applied to each seed's options.
fn sweep(tweak: impl Fn(&mut SimOptions)) -> (BTreeMap<ViolationKind, u64>, Option<String>) {
    let mut kinds = BTreeMap::new();
    let mut first = None;
    for seed in 0..SEEDS {
        let mut options = swarm(seed);
        tweak(&mut options);
        if let Err(v) = run(seed, &options) {
            *kinds.entry(v.kind).or_insert(0) += 1;
            first.get_or_insert_with(|| v.to_string());
        }
    }
    (kinds, first)
}

fn planted(bug: impl Fn(&mut PlantedBugs)) -> impl Fn(&mut SimOptions) {
    move |o| bug(&mut o.planted)
}

/// Runs the seeds with `tweak` and prints what they found under `name` (with the first
/// violation in full); returns the counts by kind.
fn found(name: &str, tweak: impl Fn(&mut SimOptions)) -> BTreeMap<ViolationKind, u64> {
    let (kinds, first) = sweep(tweak);
    println!("{name}: {kinds:?}\n{}", first.unwrap_or_default());
    kinds
}

/// How many seeds failed with any of `which`.
fn count(kinds: &BTreeMap<ViolationKind, u64>, which: &[ViolationKind]) -> u64 {
    which.iter().filter_map(|k| kinds.get(k)).sum()
}

/// The control run: with `tweak` (the bug planted, the fault it needs off) no seed fails.
fn silent(tweak: impl Fn(&mut SimOptions)) {
    let (control, first) = sweep(tweak);
    assert!(
        control.is_empty(),
        "{control:?}\n{}",
        first.unwrap_or_default()
    );
}

#[test]
fn planted_nothing_every_seed_passes() {
    // Proves the checkers are sound: the real core, under every fault, breaks no promise.
    silent(|_| {});
}

#[test]
fn planted_ack_before_fsync_is_caught_as_an_ok_before_durable() {
    // Proves checker 7 catches acks released before fsync at the moment they are sent: the
    // durability oracle (the bytes of completed WAL writes, scanned with the WAL's own
    // scanner) does not yet hold the position or seq the `ok` names. No crash or failed write
    // is needed, so nearly every seed finds it; before this checker, a power loss had to take
    // the record and the post-recovery audit (checker 1) had to notice.
    let kinds = found("ack_before_fsync", planted(|p| p.ack_before_fsync = true));
    let caught = count(&kinds, &[ViolationKind::NotDurable]);
    assert!(caught >= SEEDS * 3 / 4, "found only {kinds:?}");
}

#[test]
fn planted_skip_crc_on_recovery_is_caught_as_an_invented_record() {
    // Proves checkers 2 and 5 catch a recovery that skips record checksums: read corruption
    // of synced data (a sealed segment, or the newest before its final write) is accepted
    // (checker 5); and a crash that tears the in-flight write and flips a bit inside a message
    // body of a frame that otherwise survived whole leaves a record only its checksum could
    // refuse, so the audit or a delivery shows a body no client ever wrote (checker 2; rarer
    // now that a torn frame's header usually gives the tear away). Without tears and bit
    // flips, skipping checksums changes nothing, so the control run passes.
    let bug = |p: &mut PlantedBugs| p.skip_crc_on_recovery = true;
    let kinds = found("skip_crc_on_recovery", planted(bug));
    let caught = count(
        &kinds,
        &[
            ViolationKind::WrongRecord,
            ViolationKind::CorruptionAccepted,
        ],
    );
    assert!(caught >= 5, "found only {kinds:?}");
    // Torn tails with a flipped body in every crash: the invented record itself.
    let tails = found("skip_crc_on_recovery, torn tails", |o| {
        bug(&mut o.planted);
        o.read_corruption_probability = 0.0;
        o.torn_write_probability = 1.0;
        o.tail_corruption_probability = 1.0;
        o.crash_interval_ms_mean = o.crash_interval_ms_mean.clamp(1, 1_000);
    });
    let invented = count(
        &tails,
        &[ViolationKind::WrongRecord, ViolationKind::NotDurable],
    );
    assert!(invented >= 1, "torn tails: found only {tails:?}");
    silent(|o| {
        bug(&mut o.planted);
        o.torn_write_probability = 0.0;
        o.tail_corruption_probability = 0.0;
        o.read_corruption_probability = 0.0;
    });
}

#[test]
fn planted_lose_cursor_update_is_caught_by_the_cursor_checker() {
    // Proves checker 6 catches unlogged inbox acks: after a restart a peer's welcome cursor is
    // below an ack that a completed WAL write should have carried. Checkers 1-3 cannot see it
    // (a lost ack only redelivers, which at-least-once allows), and without restarts the
    // in-memory cursor hides it, so the control run passes.
    let bug = |p: &mut PlantedBugs| p.lose_cursor_update = true;
    let kinds = found("lose_cursor_update", planted(bug));
    assert!(
        count(&kinds, &[ViolationKind::CursorLost]) >= SEEDS / 10,
        "found only {kinds:?}"
    );
    silent(|o| {
        bug(&mut o.planted);
        o.crash_interval_ms_mean = 0;
        o.enospc_probability = 0.0;
        o.disk_full_interval_ms_mean = 0;
        // A disk read that fails three times restarts the shard too.
        o.log_read_fault_probability = 0.0;
    });
}

#[test]
fn planted_glue_without_recovery_fsync_is_caught() {
    // Proves the node's file steps must sync what recovery read: after a process crash (the
    // page cache survives), a restart serves records that exist only in the page cache; a
    // later power loss takes them, and an ok, a delivery or a read named a record that was
    // never durable (checker 7), or their positions are reused (checker 2).
    let kinds = found("no_sync_after_recovery", |o| {
        o.planted.no_sync_after_recovery = true;
        o.crash_interval_ms_mean = o.crash_interval_ms_mean.clamp(1, 2_000);
    });
    assert!(!kinds.is_empty(), "not found in {SEEDS} seeds");
}

#[test]
fn planted_cut_any_damage_in_newest_segment_is_caught_by_a_bit_flip_in_synced_data() {
    // Proves the simulator sees the audit's truncation bug: rot (a flipped bit) in synced,
    // acknowledged data of the newest segment must refuse to start, and a recovery that cuts
    // any damage in the newest segment as a torn tail accepts it (checker 5). Without read
    // corruption the bug has nothing to cut wrongly, so the control run passes.
    let bug = |p: &mut PlantedBugs| p.cut_any_damage_in_newest_segment = true;
    let kinds = found("cut_any_damage_in_newest_segment", |o| {
        bug(&mut o.planted);
        o.read_corruption_probability = o.read_corruption_probability.max(0.5);
        o.crash_interval_ms_mean = o.crash_interval_ms_mean.clamp(1, 5_000);
    });
    let accepted = count(&kinds, &[ViolationKind::CorruptionAccepted]);
    assert!(accepted >= SEEDS / 10, "found only {kinds:?}");
    silent(|o| {
        bug(&mut o.planted);
        o.read_corruption_probability = 0.0;
        o.tail_corruption_probability = 0.0;
    });
}

#[test]
fn planted_trust_page_cache_after_failed_sync_is_caught_when_pages_are_dropped() {
    // Proves the fsyncgate rule matters: a node that keeps what a failed fdatasync left in the
    // page cache (instead of cutting the write back) reads it back after its restart and
    // serves it; when the kernel had dropped those pages, a later power loss turns them into
    // zeros under acknowledged data, and recovery refuses or an acknowledged write is lost.
    // Without failed writes the bug does nothing, so the control run passes.
    let bug = |p: &mut PlantedBugs| p.trust_page_cache_after_failed_sync = true;
    let kinds = found("trust_page_cache_after_failed_sync", |o| {
        bug(&mut o.planted);
        o.enospc_probability = o.enospc_probability.max(0.05);
        o.crash_interval_ms_mean = o.crash_interval_ms_mean.clamp(1, 2_000);
    });
    assert!(!kinds.is_empty(), "not found in {SEEDS} seeds");
    silent(|o| {
        bug(&mut o.planted);
        o.enospc_probability = 0.0;
        o.disk_full_interval_ms_mean = 0;
    });
}

#[test]
fn planted_no_dir_fsync_on_segment_create_is_caught() {
    // Proves the directory fsync that makes a new segment (and the manifest listing it)
    // durable matters: without it a power loss takes a segment holding acknowledged records.
    let kinds = found("no_dir_fsync_on_segment_create", |o| {
        o.planted.no_dir_fsync_on_segment_create = true;
        o.crash_interval_ms_mean = o.crash_interval_ms_mean.clamp(1, 2_000);
    });
    assert!(!kinds.is_empty(), "not found in {SEEDS} seeds");
}

fn glue(bug: impl Fn(&mut fabric_router::host::PlantedGlueBugs)) -> impl Fn(&mut SimOptions) {
    move |o| bug(&mut o.planted_glue)
}

#[test]
fn planted_glue_drop_reply_on_full_queue_is_caught_as_replies_gone_missing() {
    // Proves the host's overflow rule is checked: a session whose reply queue is full must be
    // closed (`overloaded`); a host that drops its replies in silence leaves a client with a
    // gap in its answers or an inbox message it never gets. The control run keeps the node's
    // queue rule (no queue can overflow), and nothing fails.
    let kinds = found(
        "glue_drop_reply_on_full_queue",
        glue(|g| g.glue_drop_reply_on_full_queue = true),
    );
    let k = count(
        &kinds,
        &[
            ViolationKind::OutOfOrder,
            ViolationKind::NotDelivered,
            ViolationKind::Liveness,
        ],
    );
    assert!(k > 0, "not found in {SEEDS} seeds: {kinds:?}");
    silent(|o| {
        o.planted_glue.glue_drop_reply_on_full_queue = true;
        o.reply_queue_batches_max = 0;
    });
}

#[test]
fn planted_glue_restart_without_recovery_is_caught_after_a_failed_write() {
    // Proves the host's restart policy is checked: an incarnation that goes on serving after
    // a failed write serves memory the disk does not hold. Without failed writes, silence.
    let kinds = found(
        "glue_restart_without_recovery",
        glue(|g| g.glue_restart_without_recovery = true),
    );
    assert!(!kinds.is_empty(), "not found in {SEEDS} seeds");
    silent(|o| {
        o.planted_glue.glue_restart_without_recovery = true;
        o.enospc_probability = 0.0;
        o.disk_full_interval_ms_mean = 0;
    });
}

#[test]
fn planted_glue_no_dir_fsync_on_segment_create_is_caught_by_a_power_loss() {
    // Proves the host's write job is what the simulator runs: when it skips the directory
    // fsync of a new segment, a power loss takes acknowledged records. Without power losses,
    // silence.
    let kinds = found(
        "glue_no_dir_fsync_on_segment_create",
        glue(|g| g.glue_no_dir_fsync_on_segment_create = true),
    );
    let k = count(
        &kinds,
        &[
            ViolationKind::LostWrite,
            ViolationKind::RecoveryRefused,
            ViolationKind::CursorLost,
        ],
    );
    assert!(k > 0, "not found in {SEEDS} seeds: {kinds:?}");
    silent(|o| {
        o.planted_glue.glue_no_dir_fsync_on_segment_create = true;
        o.crash_interval_ms_mean = 0;
    });
}

#[test]
fn planted_glue_batch_drops_rest_under_backpressure_is_caught() {
    // Proves the host's feeding rule (a batch is taken whole, whatever the shard's backpressure
    // says halfway) is checked: a host that drops the rest loses requests a client waits for.
    let kinds = found(
        "glue_batch_drops_rest_under_backpressure",
        glue(|g| g.glue_batch_drops_rest_under_backpressure = true),
    );
    assert!(!kinds.is_empty(), "not found in {SEEDS} seeds");
}

#[test]
fn planted_skip_crc_on_log_reads_is_caught_as_a_body_nobody_wrote() {
    // Proves checker 7 sees what a disk read of the log serves: with checksums skipped, a
    // flipped bit in a read's bytes reaches a subscriber, an HTTP page or an audit as an
    // entry with a body its append never had (or a record that does not decode is taken for
    // another). Without read faults the bug changes nothing, so the control run passes.
    let bug = |p: &mut PlantedBugs| p.skip_crc_on_log_reads = true;
    let kinds = found("skip_crc_on_log_reads", |o| {
        bug(&mut o.planted);
        o.log_read_fault_probability = 0.2;
        o.log_cache_bytes_max = 0;
    });
    assert!(!kinds.is_empty(), "not found in {SEEDS} seeds");
    silent(|o| {
        bug(&mut o.planted);
        o.log_read_fault_probability = 0.0;
    });
}

#[test]
fn planted_forget_sealed_send_keys_is_caught_as_a_send_at_two_positions() {
    // Proves checker 2 follows keyed sends: when a retry's original is in a sealed segment and
    // the shard does not look there, the message is stored twice while a recipient still
    // needs the first copy (DuplicatePos).
    let kinds = found("forget_sealed_send_keys", |o| {
        o.planted.forget_sealed_send_keys = true;
    });
    assert!(
        kinds.contains_key(&ViolationKind::DuplicatePos),
        "not found in {SEEDS} seeds: {kinds:?}"
    );
}
