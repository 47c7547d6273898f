//! Fabric's benchmarks, as library functions so that tests can run them in-process (the
//! `fabric-bench` binary is a thin command line over them).
//!
//! Shared parts: [`setup`] (transport, node under test, fsync probe, mesh and peers),
//! [`wire`] (a raw protocol connection), [`stats`] (histograms, stamps, `/proc` sampling),
//! [`report`] (figures, tables, JSON, baselines, ratios), [`progress`], [`chart`], [`nats`].
//! Scenarios: [`pipelined`] (also `fire-and-wait`), [`mesh`], [`fanout`], [`replay`],
//! [`connections`], [`recovery`], [`failover`], [`catchup`].

pub mod catchup;
pub mod chart;
pub mod connections;
pub mod error;
pub mod failover;
pub mod fanout;
pub mod fsync_probe;
pub mod inbox;
pub mod mesh;
pub mod nats;
pub mod pipelined;
pub mod progress;
pub mod recovery;
pub mod replay;
pub mod report;
pub mod setup;
pub mod stats;
pub mod wire;
