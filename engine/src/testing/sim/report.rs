//! What runs did (`SimReport`, added up over many seeds) and the first failure of one
//! (`SimFailure`), whose message holds the command that replays it.

use super::SimConfig;

/// What one run (or many, added up) did.
#[derive(Debug, Default, Clone)]
pub struct SimReport {
    pub runs: u64,
    pub steps: u64,
    pub crashes: u64,
    pub clean_restarts: u64,
    pub torn_writes: u64,
    pub misdirected_writes: u64,
    pub read_errors: u64,
    pub bit_flips: u64,
    pub write_errors: u64,
    pub sync_errors: u64,
    pub device_full: u64,
    pub writes_acked: u64,
    pub bytes_acked: u64,
    pub flushes_acked: u64,
    /// Snapshots (clone of volume 1 onto its family member) and deletions acknowledged.
    pub volume_ops_acked: u64,
    /// Checkpoints made durable: in the background (`Build`) and all kinds.
    pub checkpoints_background: u64,
    pub checkpoints: u64,
    /// Flushes answered EIO (a write or fdatasync had failed: never acknowledged).
    pub flushes_failed: u64,
    pub reads_checked: u64,
    pub bytes_verified: u64,
    /// Reads answered EIO because injected damage hit their data (detected, not served).
    pub reads_eio: u64,
    /// Writes refused for lack of free slots.
    pub writes_enospc: u64,
    /// Opens refused after injected damage (the store named the damage).
    pub refused_opens: u64,
    pub disk_ops: u64,
}

impl SimReport {
    pub fn add(&mut self, o: &SimReport) {
        self.runs += o.runs;
        self.steps += o.steps;
        self.crashes += o.crashes;
        self.clean_restarts += o.clean_restarts;
        self.torn_writes += o.torn_writes;
        self.misdirected_writes += o.misdirected_writes;
        self.read_errors += o.read_errors;
        self.bit_flips += o.bit_flips;
        self.write_errors += o.write_errors;
        self.sync_errors += o.sync_errors;
        self.device_full += o.device_full;
        self.writes_acked += o.writes_acked;
        self.bytes_acked += o.bytes_acked;
        self.flushes_acked += o.flushes_acked;
        self.flushes_failed += o.flushes_failed;
        self.volume_ops_acked += o.volume_ops_acked;
        self.checkpoints_background += o.checkpoints_background;
        self.checkpoints += o.checkpoints;
        self.reads_checked += o.reads_checked;
        self.bytes_verified += o.bytes_verified;
        self.reads_eio += o.reads_eio;
        self.writes_enospc += o.writes_enospc;
        self.refused_opens += o.refused_opens;
        self.disk_ops += o.disk_ops;
    }
}

#[derive(Debug)]
pub struct SimFailure {
    pub config: SimConfig,
    pub step: u64,
    pub what: String,
}

impl std::fmt::Display for SimFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "seed {} failed at step {}: {}\nreplay: {}",
            self.config.seed,
            self.step,
            self.what,
            self.config.replay_command()
        )
    }
}
