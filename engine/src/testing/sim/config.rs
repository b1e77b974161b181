//! What a run is asked to do: the fault kinds it injects (`Faults`, named on the command line
//! as `crash,torn,...`), its seed and steps, and whether it is the canary (`SimConfig`). A
//! configuration names its run exactly: `replay_command` replays it.

/// The fault kinds a run injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Faults {
    pub crash: bool,
    pub torn: bool,
    pub misdirect: bool,
    pub read_error: bool,
    pub bit_rot: bool,
    pub write_error: bool,
    pub sync_error: bool,
    pub device_full: bool,
}

const FAULT_NAMES: [&str; 8] = [
    "crash",
    "torn",
    "misdirect",
    "read-error",
    "bit-rot",
    "write-error",
    "sync-error",
    "device-full",
];

impl Faults {
    pub fn all() -> Faults {
        Faults::parse("all").expect("all")
    }

    pub fn none() -> Faults {
        Faults::parse("none").expect("none")
    }

    fn flags(&self) -> [bool; 8] {
        [
            self.crash,
            self.torn,
            self.misdirect,
            self.read_error,
            self.bit_rot,
            self.write_error,
            self.sync_error,
            self.device_full,
        ]
    }

    /// `all`, `none`, or a comma-separated list of `crash,torn,misdirect,read-error,bit-rot,
    /// write-error,sync-error,device-full`.
    pub fn parse(s: &str) -> Result<Faults, String> {
        let mut on = [false; 8];
        for word in s.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            match word {
                "all" => on = [true; 8],
                "none" => on = [false; 8],
                w => match FAULT_NAMES.iter().position(|n| *n == w) {
                    Some(i) => on[i] = true,
                    None => {
                        return Err(format!(
                            "unknown fault kind {w:?} (known: all, none, {})",
                            FAULT_NAMES.join(", ")
                        ))
                    }
                },
            }
        }
        Ok(Faults {
            crash: on[0],
            torn: on[1],
            misdirect: on[2],
            read_error: on[3],
            bit_rot: on[4],
            write_error: on[5],
            sync_error: on[6],
            device_full: on[7],
        })
    }
}

impl std::fmt::Display for Faults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let on: Vec<&str> = FAULT_NAMES
            .iter()
            .zip(self.flags())
            .filter(|(_, on)| *on)
            .map(|(n, _)| *n)
            .collect();
        if on.is_empty() {
            f.write_str("none")
        } else if on.len() == FAULT_NAMES.len() {
            f.write_str("all")
        } else {
            f.write_str(&on.join(","))
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct SimConfig {
    pub seed: u64,
    /// Scheduler steps (a step submits a request, completes a disk operation, fires the commit
    /// timer, crashes, ...).
    pub steps: u32,
    pub faults: Faults,
    /// Acknowledge flushes before they are durable: the run must then fail.
    pub canary: bool,
}

impl SimConfig {
    /// The command that replays this run exactly.
    pub fn replay_command(&self) -> String {
        format!(
            "cargo run --release -p torus-engine --example sim -- --seed {} --steps {} --faults {}{}",
            self.seed,
            self.steps,
            self.faults,
            if self.canary { " --canary" } else { "" }
        )
    }
}
