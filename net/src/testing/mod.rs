//! Test-only code: the cluster's deterministic simulation (its own code on a simulated etcd,
//! network and process). (The fault switches torusd-testing reads are the cluster's own:
//! `cluster/faults.rs`.) Compiled only with the `testing` feature, which the crate's own tests
//! and examples enable (a dev-dependency of the crate on itself) and `torusd-testing`
//! enables; a release `torusd` holds none of it.

pub mod sim;
