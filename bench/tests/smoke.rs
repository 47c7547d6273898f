//! Every scenario end to end, tiny and bounded in time, so the harness cannot rot: each must
//! run, measure something nonzero and pass its own correctness checks.

use fabric_bench::nats::{NatsServer, Policy};
use fabric_bench::pipelined::{self, Driver, Options};
use fabric_bench::report::Report;
use fabric_bench::setup::Transport;
use fabric_bench::{connections, fanout, mesh, replay};

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
    assert!(report.server.is_some_and(|s| s.rss_peak_bytes > 0));
}

fn value(r: &Report, key: &str) -> f64 {
    r.get(key)
        .unwrap_or_else(|| panic!("{key} missing:\n{}", r.table()))
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
        transport: Transport::WsBinary,
        ..Options::smoke()
    });
}

#[test]
fn smoke_pipelined_over_quic_wss_and_without_batch_frames() {
    // Proves the raw driver over QUIC (own and shared client endpoints), over TLS WebSocket
    // (the bench's node with --ws-tls, a pinned certificate), and with one op per server frame.
    for (transport, shared, batch_in) in [
        (Transport::Quic, false, 256),
        (Transport::Quic, true, 256),
        (Transport::WssJson, false, 256),
        (Transport::WssBinary, false, 0),
    ] {
        let mut o = Options {
            transport,
            ..Options::smoke()
        };
        o.node.quic_shared_endpoint = shared;
        o.node.ws_tls = transport.wss();
        o.node.batch_in = batch_in;
        check(o);
    }
}

#[test]
fn smoke_pipelined_batch_of_four_per_frame() {
    // Proves --batch splits the window into frames of N and stays dense.
    check(Options {
        batch: 4,
        ..Options::smoke()
    });
}

#[test]
fn smoke_fire_and_wait_both_transports() {
    // Proves fire-and-wait completes whole batches with dense seqs, JSON and binary.
    for transport in [Transport::WsJson, Transport::WsBinary] {
        check(Options {
            mode: pipelined::Mode::FireAndWait,
            depth: 10,
            batch: 5,
            transport,
            ..Options::smoke()
        });
    }
}

#[test]
fn smoke_fire_and_wait_paced_stays_under_its_offered_load() {
    // Proves --interval-ms paces each connection: with pauses of at least half the mean, two
    // connections of 10 appends cannot be acked faster than 2 x 10 per 25 ms (plus the one
    // batch each may have in flight as the window closes).
    let o = Options {
        mode: pipelined::Mode::FireAndWait,
        depth: 10,
        batch: 10,
        interval: std::time::Duration::from_millis(50),
        ..Options::smoke()
    };
    let secs = o.duration.as_secs_f64();
    let report = pipelined::run(&o).expect("the scenario runs");
    let ceiling = 2.0 * 10.0 * (secs / 0.025 + 1.0);
    assert!(report.acked > 0);
    assert!(
        (report.acked as f64) <= ceiling,
        "{} acked in {secs} s, more than paced connections can send ({ceiling})",
        report.acked
    );
}

#[test]
fn smoke_mesh_delivers_everything_acked() {
    // Proves mesh delivers every acked direct message exactly to its recipient, over binary.
    for transport in [Transport::WsBinary, Transport::Quic, Transport::WssBinary] {
        let mut o = mesh::Options {
            transport,
            ..mesh::Options::smoke()
        };
        o.node.ws_tls = transport.wss();
        let r = mesh::run(&o).expect("mesh runs");
        assert_eq!(value(&r, "acked"), (o.peers * o.messages) as f64);
        assert_eq!(value(&r, "delivered_ratio"), 1.0, "{}", r.table());
        assert!(value(&r, "send_deliver_p99_us") > 0.0);
        assert!(value(&r, "server_rss_peak_bytes") > 0.0 && value(&r, "server_fds_peak") > 0.0);
    }
}

#[test]
fn smoke_fanout_group_and_all() {
    // Proves every subscriber gets every message, to a group and to `*`.
    for to in [fanout::FanTo::Group, fanout::FanTo::All] {
        let r = fanout::run(&fanout::Options {
            to,
            ..fanout::Options::smoke()
        })
        .expect("fanout runs");
        assert_eq!(value(&r, "delivered_ratio"), 1.0, "{}", r.table());
        assert!(value(&r, "deliveries_per_sec") > 0.0);
    }
}

#[test]
fn smoke_replay_reads_while_writes_continue() {
    // Proves readers complete whole replays (dense seqs from 1) while writers are acked.
    let r = replay::run(&replay::Options::smoke()).expect("replay runs");
    assert!(value(&r, "replay_passes") >= 1.0, "{}", r.table());
    assert!(value(&r, "replay_events_per_sec") > 0.0);
    assert!(value(&r, "write_during_replay_per_sec") > 0.0);
}

#[test]
fn smoke_connections_hold_idle_sessions() {
    // Proves the connections scenario opens every session and measures its memory.
    let r = connections::run(&connections::Options::smoke()).expect("connections run");
    assert_eq!(value(&r, "sessions"), 50.0);
    assert!(value(&r, "connect_all_secs") > 0.0);
    assert!(value(&r, "fds_per_session") >= 1.0, "{}", r.table());
}

#[test]
fn recovery_scenario_recovers_every_record() {
    // Proves the recovery benchmark writes real segments and recovers exactly what it wrote.
    let dir = tempfile::tempdir().unwrap();
    let f = fabric_bench::recovery::run(dir.path(), 5_000, 64, 10).unwrap();
    assert_eq!(f.records, 5_000);
    assert!(f.wal_bytes > 5_000 * 64);
}

#[test]
fn smoke_nats_pipelined_and_fanout_under_both_policies() {
    // Proves the NATS side (installed by .ci/run into .venv-bench) runs pipelined and fanout
    // against a server started by the bench, under both durability policies.
    let bin = fabric_bench::nats::find_server(None).expect("nats-server installed (.ci/run)");
    let rt = tokio::runtime::Runtime::new().unwrap();
    for policy in [Policy::Default, Policy::Always] {
        let server = NatsServer::start(&bin, policy, &None, 1).expect("nats-server starts");
        let p = rt
            .block_on(fabric_bench::nats::pipelined(&server, &Options::smoke()))
            .expect("nats pipelined runs");
        assert!(value(&p, "msgs_per_sec") > 0.0);
        assert!(value(&p, "ack_p99_us") > 0.0);
        let f = rt
            .block_on(fabric_bench::nats::fanout(
                &server,
                &fanout::Options::smoke(),
            ))
            .expect("nats fanout runs");
        assert_eq!(value(&f, "delivered_ratio"), 1.0, "{}", f.table());
        assert_eq!(f.system, policy.system());
    }
}

#[test]
fn smoke_nats_cluster_pipelined_r3() {
    // Proves the bench starts a 3-server JetStream cluster, creates an R3 stream on it and
    // runs pipelined publishes spread over the three servers.
    let bin = fabric_bench::nats::find_server(None).expect("nats-server installed (.ci/run)");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = NatsServer::start(&bin, Policy::Always, &None, 3).expect("nats cluster starts");
    assert_eq!(server.urls.len(), 3);
    let p = rt
        .block_on(fabric_bench::nats::pipelined(&server, &Options::smoke()))
        .expect("nats pipelined runs on the cluster");
    assert!(value(&p, "msgs_per_sec") > 0.0);
    assert!(p.policy.contains("streams R3"), "{}", p.policy);
}
