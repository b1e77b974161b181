//! torusd with the test-only fault switches (`torus_engine::testing::faults`,
//! `torus_net::testing::faults`) that a process-level test turns on through the environment,
//! to show that its checks catch what the fault breaks. Built only with `--features testing`;
//! everything else is `torusd` itself.

#[path = "torusd.rs"]
mod torusd;

fn main() {
    torusd::main()
}
