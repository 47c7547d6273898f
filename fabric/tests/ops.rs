//! The node's operational surface against a real node: the files it writes (modes, a
//! half-written generated certificate), the HTTP port's timeouts and connection caps, QUIC's
//! caps, and what the client port reveals when a metrics port exists.

mod common;
use common::*;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_dir_is_private_and_secrets_are_0600() {
    // Proves a fresh start makes the data dir and tls/ 0700, the admin token and TLS key 0600,
    // node.json and the certificate 0644, and leaves no temp files behind.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("nested").join("data");
    let node = fabric::node::start(fabric::config::Config {
        data_dir: data.clone(),
        admin_token: None,
        ..config(dir.path())
    })
    .await
    .unwrap();
    assert_eq!(mode_of(&dir.path().join("nested")), 0o700);
    assert_eq!(mode_of(&data), 0o700);
    assert_eq!(mode_of(&data.join("admin-token")), 0o600);
    assert_eq!(
        std::fs::read_to_string(data.join("admin-token")).unwrap(),
        node.admin_token()
    );
    assert_eq!(mode_of(&data.join("node.json")), 0o644);
    assert_eq!(mode_of(&data.join("tls")), 0o700);
    assert_eq!(mode_of(&data.join("tls").join("key.pem")), 0o600);
    assert_eq!(mode_of(&data.join("tls").join("cert.pem")), 0o644);
    for d in [data.clone(), data.join("tls")] {
        for e in std::fs::read_dir(&d).unwrap() {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            assert!(!name.ends_with(".tmp"), "temp file {name} left in {d:?}");
        }
    }
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_written_generated_certificate_is_made_anew_and_an_empty_token_too() {
    // Proves a generated cert.pem emptied by a power loss (as older versions could leave it),
    // or a key that does not match it, no longer stops every later start: the node makes a
    // new pair. An empty admin-token file gets a new token.
    let dir = tempfile::tempdir().unwrap();
    let cfg = || fabric::config::Config {
        admin_token: None,
        ..config(dir.path())
    };
    let node = fabric::node::start(cfg()).await.unwrap();
    let first = node.tls_fingerprint().unwrap();
    node.shutdown().await;
    let tls = dir.path().join("tls");
    std::fs::write(tls.join("cert.pem"), b"").unwrap();
    std::fs::write(dir.path().join("admin-token"), b"").unwrap();
    let node = fabric::node::start(cfg()).await.expect("starts again");
    let second = node.tls_fingerprint().unwrap();
    assert_ne!(first, second, "a new certificate");
    assert_eq!(node.admin_token().len(), 64, "a new token");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("admin-token")).unwrap(),
        node.admin_token()
    );
    node.shutdown().await;

    // The key of another pair: refused by the check, made anew.
    let other = tempfile::tempdir().unwrap();
    fabric::tls::load_or_generate(None, None, other.path(), &[]).unwrap();
    std::fs::copy(other.path().join("tls/key.pem"), tls.join("key.pem")).unwrap();
    let node = fabric::node::start(cfg())
        .await
        .expect("starts with a mismatched key");
    assert_ne!(node.tls_fingerprint().unwrap(), second);
    node.shutdown().await;
    // And an unchanged pair is kept.
    let node = fabric::node::start(cfg()).await.unwrap();
    let kept = node.tls_fingerprint().unwrap();
    node.shutdown().await;
    let node = fabric::node::start(cfg()).await.unwrap();
    assert_eq!(node.tls_fingerprint().unwrap(), kept);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_configured_certificate_stays_fatal_with_a_clear_error() {
    // Proves --tls-cert/--tls-key that cannot be used are refused at start, naming the file
    // and what is wrong, and never replaced.
    let dir = tempfile::tempdir().unwrap();
    let gen = tempfile::tempdir().unwrap();
    fabric::tls::load_or_generate(None, None, gen.path(), &[]).unwrap();
    let other = tempfile::tempdir().unwrap();
    fabric::tls::load_or_generate(None, None, other.path(), &[]).unwrap();
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, b"").unwrap();
    let start = |cert: &Path, key: &Path| {
        fabric::node::start(fabric::config::Config {
            tls_cert: Some(cert.to_path_buf()),
            tls_key: Some(key.to_path_buf()),
            ..config(dir.path())
        })
    };
    let e = start(&empty, &gen.path().join("tls/key.pem"))
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(
        e.contains("empty.pem") && e.contains("no CERTIFICATE section"),
        "{e}"
    );
    assert_eq!(std::fs::read(&empty).unwrap(), b"", "never replaced");
    let e = start(
        &gen.path().join("tls/cert.pem"),
        &other.path().join("tls/key.pem"),
    )
    .await
    .err()
    .expect("refused")
    .to_string();
    assert!(e.contains("cert.pem") && e.contains("key"), "{e}");
}

/// A TCP connection to `to` from the loopback address `from` (127.0.0.x: distinct client
/// addresses on one host).
async fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let s = tokio::net::TcpSocket::new_v4().unwrap();
    s.bind(format!("{from}:0").parse().unwrap()).unwrap();
    s.connect(to).await.unwrap()
}

/// Everything the server sends until it closes (or `within` passes: then `None`).
async fn read_until_closed(s: &mut TcpStream, within: Duration) -> Option<String> {
    let mut out = Vec::new();
    let r = tokio::time::timeout(within, async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    r.ok().map(|()| String::from_utf8_lossy(&out).into_owned())
}

/// GET `path` on a raw connection; the whole answer (the server closes after it).
async fn get_once(s: &mut TcpStream, path: &str) -> String {
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    read_until_closed(s, WAIT).await.expect("an answer")
}

/// The value of series `name` whose labels include each of `labels` (`k="v"` strings).
async fn metric(base: &str, name: &str, labels: &[&str]) -> f64 {
    let text = metrics_text(base).await;
    text.lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_headers_and_bodies_that_do_not_arrive_in_time_are_cut_off() {
    // Proves a half-sent header is closed after http_header_timeout_ms and a stalled body is
    // answered 408 after http_body_timeout_ms, both counted, while prompt requests are served.
    let dir = tempfile::tempdir().unwrap();
    let node = fabric::node::start(fabric::config::Config {
        http_header_timeout_ms: 300,
        http_body_timeout_ms: 300,
        metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
        ..config(dir.path())
    })
    .await
    .unwrap();
    let ops = format!("http://{}", node.metrics_addr().unwrap());
    let mut ok = TcpStream::connect(node.addr()).await.unwrap();
    assert!(get_once(&mut ok, "/healthz")
        .await
        .starts_with("HTTP/1.1 200"));

    let started = Instant::now();
    let mut half = TcpStream::connect(node.addr()).await.unwrap();
    half.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let got = read_until_closed(&mut half, Duration::from_secs(5))
        .await
        .expect("closed, not left open");
    assert!(got.is_empty(), "no answer to half a request: {got}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(3),
        "{took:?}"
    );

    let started = Instant::now();
    let mut slow = TcpStream::connect(node.addr()).await.unwrap();
    slow.write_all(
        b"POST /v1/meshes HTTP/1.1\r\nhost: x\r\nauthorization: Bearer admin-secret\r\n\
          content-length: 100\r\n\r\n{\"id\":",
    )
    .await
    .unwrap();
    let got = read_until_closed(&mut slow, Duration::from_secs(5))
        .await
        .expect("answered and closed");
    assert!(got.starts_with("HTTP/1.1 408"), "{got}");
    assert!(got.contains("http_body_timeout_ms"), "{got}");
    assert!(started.elapsed() < Duration::from_secs(3));

    let header = metric(
        &ops,
        "fabric_http_timeouts_total",
        &["phase=\"header\"", "listener=\"http\""],
    )
    .await;
    let body = metric(&ops, "fabric_http_timeouts_total", &["phase=\"body\""]).await;
    assert!(header >= 1.0 && body >= 1.0, "header {header}, body {body}");
    node.shutdown().await;
}

// Over 70 lines: one end-to-end scenario whose steps depend on each other, read top to bottom.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_caps_are_answered_503_overloaded() {
    // Proves connections_per_ip_max and connections_max refuse at accept with a 503
    // `overloaded` JSON answer naming the cap, count the refusals, count an upgraded
    // WebSocket as its connection, and free a place when a connection closes.
    let dir = tempfile::tempdir().unwrap();
    let node = fabric::node::start(fabric::config::Config {
        connections_max: 4,
        connections_per_ip_max: 2,
        metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
        ..config(dir.path())
    })
    .await
    .unwrap();
    let ops = format!("http://{}", node.metrics_addr().unwrap());
    let addr = node.addr();
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/v1/ws"))
        .await
        .unwrap();
    let idle = connect_from("127.0.0.1", addr).await;
    let mut refused = connect_from("127.0.0.1", addr).await;
    let answer = read_until_closed(&mut refused, WAIT).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("retry-after: 1"), "{answer}");
    let body: serde_json::Value =
        serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(body["code"], "overloaded");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("connections_per_ip_max (2)"),
        "{body}"
    );
    // Other addresses still get in, up to the total.
    let mut other = connect_from("127.0.0.2", addr).await;
    let _third = connect_from("127.0.0.3", addr).await;
    let mut over = connect_from("127.0.0.4", addr).await;
    let answer = read_until_closed(&mut over, WAIT).await.unwrap();
    assert!(answer.contains("connections_max (4)"), "{answer}");
    assert_eq!(
        metric(
            &ops,
            "fabric_connections_refused_total",
            &["reason=\"connections_per_ip_max\"", "listener=\"http\""]
        )
        .await,
        1.0
    );
    assert_eq!(
        metric(
            &ops,
            "fabric_connections_refused_total",
            &["reason=\"connections_max\"", "listener=\"http\""]
        )
        .await,
        1.0
    );
    assert_eq!(
        metric(&ops, "fabric_connections_open", &["listener=\"http\""]).await,
        4.0
    );
    assert!(get_once(&mut other, "/healthz")
        .await
        .starts_with("HTTP/1.1 200"));
    // Closing the WebSocket frees its place for 127.0.0.1.
    ws.close(None).await.unwrap();
    drop(ws);
    drop(idle);
    let deadline = Instant::now() + WAIT;
    loop {
        let mut s = connect_from("127.0.0.1", addr).await;
        if get_once(&mut s, "/healthz")
            .await
            .starts_with("HTTP/1.1 200")
        {
            break;
        }
        assert!(Instant::now() < deadline, "no place was freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    node.shutdown().await;
}

/// A TLS client for the node's HTTPS port, trusting its certificate by pin.
fn tls_connector(node: &fabric::node::RunningNode) -> tokio_rustls::TlsConnector {
    let trust = fabric::tls::Trust::Pin(node.tls_fingerprint().unwrap());
    let config = fabric::tls::client_config(&trust, fabric::tls::ALPN_HTTP1).unwrap();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
}

// Over 70 lines: one end-to-end scenario whose steps depend on each other, read top to bottom.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_tls_handshakes_time_out_and_one_address_cannot_hold_every_slot() {
    // Proves a TLS handshake that never starts is cut after tls_handshake_timeout_ms, and
    // that 300 stalled handshakes from one address (more than the 256 slots) do not delay
    // another address's handshake and request.
    let dir = tempfile::tempdir().unwrap();
    let node = fabric::node::start(fabric::config::Config {
        ws_tls: true,
        tls_handshake_timeout_ms: 400,
        metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
        ..config(dir.path())
    })
    .await
    .unwrap();
    let started = Instant::now();
    let mut silent = TcpStream::connect(node.addr()).await.unwrap();
    read_until_closed(&mut silent, Duration::from_secs(5))
        .await
        .expect("closed, not left open");
    assert!(started.elapsed() < Duration::from_secs(3));
    let ops = format!("http://{}", node.metrics_addr().unwrap());
    assert!(
        metric(
            &ops,
            "fabric_http_timeouts_total",
            &["phase=\"tls_handshake\""]
        )
        .await
            >= 1.0
    );
    node.shutdown().await;

    // The default handshake time (10 s): stalled handshakes would hold their slots that long.
    let dir = tempfile::tempdir().unwrap();
    let node = fabric::node::start(fabric::config::Config {
        ws_tls: true,
        metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
        ..config(dir.path())
    })
    .await
    .unwrap();
    let mut stalled = Vec::new();
    for _ in 0..300 {
        stalled.push(connect_from("127.0.0.2", node.addr()).await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let tcp = connect_from("127.0.0.1", node.addr()).await;
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = tokio::time::timeout(WAIT, tls_connector(&node).connect(name, tcp))
        .await
        .expect("handshake in time")
        .unwrap();
    tls.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    let _ = tls.read_to_string(&mut answer).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // Stalled slots would be held for the full 10 s; 5 s leaves room for a loaded machine.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "handshake and request took {:?}",
        started.elapsed()
    );
    let ops = format!("http://{}", node.metrics_addr().unwrap());
    assert!(
        metric(
            &ops,
            "fabric_connections_refused_total",
            &["reason=\"tls_handshakes_per_ip\""]
        )
        .await
            >= 268.0
    );
    drop(stalled);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_connections_over_the_cap_are_closed_with_1013_and_the_reason() {
    // Proves connections_max applies to QUIC: the connection over it is closed with
    // application code 1013 and a reason naming the cap, counted; a closed connection frees
    // its place.
    let dir = tempfile::tempdir().unwrap();
    let node = fabric::node::start(fabric::config::Config {
        connections_max: 2,
        metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
        ..config(dir.path())
    })
    .await
    .unwrap();
    let q = node.quic_addr().unwrap();
    let trust = fabric::tls::Trust::Pin(node.tls_fingerprint().unwrap());
    let dial = || fabric::quic::dial("127.0.0.1", q.port(), &trust, fabric::tls::ALPN);
    let first = dial().await.unwrap();
    let _second = dial().await.unwrap();
    let why = match dial().await {
        Ok(third) => {
            let e = tokio::time::timeout(WAIT, third.conn.closed())
                .await
                .unwrap();
            match e {
                quinn::ConnectionError::ApplicationClosed(c) => {
                    assert_eq!(c.error_code, quinn::VarInt::from_u32(1013));
                    String::from_utf8_lossy(&c.reason).into_owned()
                }
                other => panic!("closed otherwise: {other}"),
            }
        }
        Err(e) => e.to_string(),
    };
    assert!(why.contains("connections_max (2)"), "{why}");
    let ops = format!("http://{}", node.metrics_addr().unwrap());
    assert_eq!(
        metric(
            &ops,
            "fabric_connections_refused_total",
            &["listener=\"quic\"", "reason=\"connections_max\""]
        )
        .await,
        1.0
    );
    first.conn.close(quinn::VarInt::from_u32(0), b"bye");
    let deadline = Instant::now() + WAIT;
    loop {
        // Refused (an error or a close) until the server has seen the first one go.
        if let Ok(d) = dial().await {
            let closed = tokio::time::timeout(Duration::from_millis(300), d.conn.closed()).await;
            if closed.is_err() {
                break;
            }
        }
        assert!(Instant::now() < deadline, "no place was freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    node.shutdown().await;
}
