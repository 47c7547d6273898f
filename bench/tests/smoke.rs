//! The pipelined scenario end to end, tiny: it must run, ack, and keep every conversation dense.

use fabric_bench::pipelined::{self, Driver, Options};

fn check(opts: Options) {
    let report = pipelined::run(&opts).expect("the scenario runs");
    assert!(report.msgs_per_sec > 0.0, "{}", report.table());
    assert!(report.acked > 0 && report.acked_total >= report.acked);
    assert!(
        report.seqs_dense,
        "acked seqs are exactly 1..=n per conversation"
    );
    assert!(report.p50_us > 0 && report.p50_us <= report.max_us);
    assert!(
        report.wal_fsyncs.is_some_and(|n| n > 0),
        "the in-process node reports its fsyncs"
    );
    let probe = report.fsync_probe.as_ref().expect("probe ran");
    assert!(probe.syncs > 0);
    let json = report.to_json();
    assert_eq!(json["acked"], report.acked);
}

#[test]
fn smoke_raw_driver_json_frames() {
    // Proves the protocol-level driver measures nonzero durable throughput with dense seqs.
    check(Options::smoke());
}

#[test]
fn smoke_client_driver_binary_frames() {
    // Proves the same through fabric::client::Client with binary frames.
    check(Options {
        driver: Driver::Client,
        binary: true,
        ..Options::smoke()
    });
}

#[test]
fn recovery_scenario_recovers_every_record() {
    // Proves the recovery benchmark writes real segments and recovers exactly what it wrote.
    let dir = tempfile::tempdir().unwrap();
    let f = fabric_bench::recovery::run(dir.path(), 5_000, 64, 10).unwrap();
    assert_eq!(f.records, 5_000);
    assert!(f.wal_bytes > 5_000 * 64);
}
