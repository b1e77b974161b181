//! What a run of the simulation is asked for (`SimConfig`) and what it reports: counts by
//! fault kind and outcome (`SimReport`), or the first failure with the command that replays
//! it (`SimFailure`).

/// The leader marks out a node down this long (`--down-out-after`; with four nodes).
pub const DOWN_OUT_SECONDS: u64 = 4;

#[derive(Debug, Clone)]
pub struct SimConfig {
    pub seed: u64,
    /// Simulated seconds of client load and faults (then healing and the final checks).
    pub seconds: u64,
    /// 3 or 4.
    pub nodes: usize,
    pub faults: bool,
    /// Nodes acknowledge flushes without making anything durable: the run must fail.
    pub canary: bool,
}

impl SimConfig {
    pub fn replay_command(&self) -> String {
        format!(
            "cargo run --release -p torus-net --example cluster_sim -- --seed {} --seconds {} --nodes {}{}{}",
            self.seed,
            self.seconds,
            self.nodes,
            if self.faults { "" } else { " --no-faults" },
            if self.canary { " --canary" } else { "" }
        )
    }
}

/// Faults injected, by kind.
pub const FAULT_KINDS: [&str; 11] = [
    "kill",
    "power-loss",
    "isolate",
    "partition",
    "one-way",
    "resets",
    "delay",
    "writer-move",
    "drain",
    "cascade",
    "duplicates",
];

#[derive(Debug, Default, Clone)]
pub struct SimReport {
    pub seeds: u64,
    pub sim_seconds: u64,
    pub events: u64,
    pub messages: u64,
    pub faults: [u64; 11],
    pub writes_acked: u64,
    pub reads_checked: u64,
    pub flushes_acked: u64,
    /// Requests answered with an error (unavailable, not wrong).
    pub errors: u64,
    pub blocks_copied: u64,
    pub catch_up_rounds: u64,
    /// Rounds reviving PGs lost with every clean holder.
    pub revivals: u64,
    /// Of those, revivals that copied whole PGs from another holder's copy, which covers
    /// more (`replication::revival_source`), and revivals that waited for one to come back.
    pub revivals_whole: u64,
    pub revivals_waited: u64,
    /// Flushes whose map epoch was recorded (the first after each new map a node sees).
    pub flush_records: u64,
    /// Flushes recorded on a node's own disk after its lease ran out (`Cluster::fence_cut_off`),
    /// and records of them published by the next process.
    pub cut_records: u64,
    pub cut_records_published: u64,
    /// Nodes the leader marked out after being down `DOWN_OUT`.
    pub marked_out: u64,
    pub map_epochs: u64,
    /// Blocks compared across replicas at the end of a run.
    pub blocks_verified: u64,
    /// Longest time from healing to every PG clean, microseconds.
    pub converge_max: u64,
    /// Blocks freed by nodes that no longer held their PG.
    pub blocks_freed: u64,
}

impl SimReport {
    pub fn add(&mut self, o: &SimReport) {
        self.seeds += o.seeds;
        self.sim_seconds += o.sim_seconds;
        self.events += o.events;
        self.messages += o.messages;
        for (a, b) in self.faults.iter_mut().zip(o.faults) {
            *a += b;
        }
        self.writes_acked += o.writes_acked;
        self.reads_checked += o.reads_checked;
        self.flushes_acked += o.flushes_acked;
        self.errors += o.errors;
        self.blocks_copied += o.blocks_copied;
        self.catch_up_rounds += o.catch_up_rounds;
        self.revivals += o.revivals;
        self.revivals_whole += o.revivals_whole;
        self.revivals_waited += o.revivals_waited;
        self.flush_records += o.flush_records;
        self.cut_records += o.cut_records;
        self.cut_records_published += o.cut_records_published;
        self.marked_out += o.marked_out;
        self.map_epochs += o.map_epochs;
        self.blocks_verified += o.blocks_verified;
        self.converge_max = self.converge_max.max(o.converge_max);
        self.blocks_freed += o.blocks_freed;
    }

    pub fn faults_line(&self) -> String {
        FAULT_KINDS
            .iter()
            .zip(self.faults)
            .map(|(k, n)| format!("{k} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[derive(Debug)]
pub struct SimFailure {
    pub message: String,
    pub replay: String,
}

impl std::fmt::Display for SimFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}\nreplay: {}", self.message, self.replay)
    }
}
