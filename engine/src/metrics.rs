//! Per-core statistics, collected by asking each core through its mailbox: a core never
//! shares its counters or histograms, it sends a copy.

use hdrhistogram::Histogram;

#[derive(Clone)]
pub struct CoreStats {
    pub core: usize,
    pub reads: u64,
    pub writes: u64,
    pub zeroes: u64,
    pub flushes: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub commits: u64,
    pub checkpoints: u64,
    pub checksum_errors: u64,
    pub io_errors: u64,
    /// Data write operations sent to the disk (fewer than pieces: consecutive slots merge).
    pub disk_write_ops: u64,
    /// Of those, written with `pwrite` by an otherwise idle core rather than through io_uring.
    pub sync_write_ops: u64,
    pub pieces_in_flight: u64,
    pub slots_total: u64,
    pub slots_free: u64,
    pub mapped_blocks: u64,
    /// (volume id, blocks mapped on this core)
    pub volumes: Vec<(u32, u64)>,
    pub latency_read_us: Histogram<u64>,
    pub latency_write_us: Histogram<u64>,
    pub poisoned: bool,
}
