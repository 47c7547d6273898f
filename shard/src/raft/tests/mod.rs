//! Tests of the Raft core: one per rule (`rules`), and a randomized safety and liveness run
//! over many seeds with each planted bug shown caught (`random`).

mod harness;
mod random;
mod rules;
mod rules_leader;
mod rules_repair;
mod rules_replication;
