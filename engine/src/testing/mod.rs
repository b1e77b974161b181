//! Test-only code: the store's deterministic simulation. Compiled only with the `testing`
//! feature, which the crate's own tests and examples enable (a dev-dependency of the crate on
//! itself) and `torusd-testing` enables; a release `torusd` holds none of it. The store's one
//! fault switch, `TORUS_TESTING_ACK_FLUSH_EARLY`, is read in `store/recovery.rs` under the same
//! feature, so that the store does not depend on this module.

pub mod sim;
