//! Fault switches read from the environment by `torusd-testing`, so that process-level tests
//! can show their checks catch what the switch breaks.

/// `TORUS_TESTING_ACK_FLUSH_EARLY=1`: answer FLUSH before committing, so the durability
/// test's canary can prove that it detects lost writes.
pub fn ack_flush_early() -> bool {
    std::env::var_os("TORUS_TESTING_ACK_FLUSH_EARLY").is_some()
}
