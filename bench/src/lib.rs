//! Fabric's benchmarks, as library functions so that tests can run them in-process (the
//! `fabric-bench` binary is a thin command line over them).

pub mod fsync_probe;
pub mod pipelined;
pub mod recovery;
