//! torusd with the test-only fault switches (`torus_engine::testing::faults`,
//! `torus_net::cluster`'s `faults.rs`) that a process-level test turns on through the environment,
//! to show that its checks catch what the fault breaks. Built only with `--features testing`;
//! everything else is `torusd` itself.

/// With `--features counters`, every allocation is counted (`/metrics`).
#[cfg(feature = "counters")]
#[global_allocator]
static ALLOCATOR: torus_testkit::alloc::Counting = torus_testkit::alloc::Counting;

#[path = "torusd.rs"]
mod torusd;

fn main() {
    torusd::main()
}
