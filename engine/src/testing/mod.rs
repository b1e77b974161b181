//! Test-only code: the store's deterministic simulation and the fault switches the tests turn
//! on. Compiled only with the `testing` feature, which the crate's own tests and examples
//! enable (a dev-dependency of the crate on itself) and `torusd-testing` enables; a release
//! `torusd` holds none of it.

pub mod faults;
pub mod sim;
