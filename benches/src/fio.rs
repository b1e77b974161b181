//! The fio side of a comparison: the workloads, one run of fio against a target, and what a
//! run's JSON says (IOPS, bandwidth, latency percentiles), gathered per cell as medians.

use crate::targets::Target;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::process::Command;

#[derive(Clone, Copy)]
pub struct Workload {
    pub name: &'static str,
    pub rw: &'static str,
    pub bs: &'static str,
    pub iodepth: u32,
    pub mix_read: Option<u32>,
}

pub const WORKLOADS: [Workload; 7] = [
    Workload {
        name: "randwrite-4k-qd32",
        rw: "randwrite",
        bs: "4k",
        iodepth: 32,
        mix_read: None,
    },
    Workload {
        name: "randread-4k-qd32",
        rw: "randread",
        bs: "4k",
        iodepth: 32,
        mix_read: None,
    },
    Workload {
        name: "randwrite-4k-qd1",
        rw: "randwrite",
        bs: "4k",
        iodepth: 1,
        mix_read: None,
    },
    Workload {
        name: "randread-4k-qd1",
        rw: "randread",
        bs: "4k",
        iodepth: 1,
        mix_read: None,
    },
    Workload {
        name: "randrw70-4k-qd32",
        rw: "randrw",
        bs: "4k",
        iodepth: 32,
        mix_read: Some(70),
    },
    Workload {
        name: "seqwrite-1m-qd8",
        rw: "write",
        bs: "1m",
        iodepth: 8,
        mix_read: None,
    },
    Workload {
        name: "seqread-1m-qd8",
        rw: "read",
        bs: "1m",
        iodepth: 8,
        mix_read: None,
    },
];

#[derive(Serialize, Clone, Debug, Default)]
pub struct Sample {
    pub iops: f64,
    pub mib_s: f64,
    pub lat_p50_us: f64,
    pub lat_p99_us: f64,
    pub server_cpu_s: f64,
    pub ios: f64,
    pub bytes_written: f64,
}

pub fn run_fio(target: &Target, extra: &[String]) -> Result<serde_json::Value> {
    let out = Command::new("fio")
        .args(&target.fio)
        .args(extra)
        .arg("--output-format=json")
        .output()
        .context("run fio (Debian package fio)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "fio on {} failed: {}{}",
            target.name,
            String::from_utf8_lossy(&out.stderr),
            text
        );
    }
    let json: serde_json::Value =
        serde_json::from_str(&text[text.find('{').context("fio printed no json")?..])?;
    let job = json["jobs"][0].clone();
    if job["error"] != 0 {
        bail!("fio on {} reported error {}", target.name, job["error"]);
    }
    Ok(job)
}

pub fn sample(job: &serde_json::Value, cpu_s: f64) -> Sample {
    let mut s = Sample::default();
    let mut lat = Vec::new();
    for dir in ["read", "write"] {
        let d = &job[dir];
        s.iops += d["iops"].as_f64().unwrap_or(0.0);
        s.mib_s += d["bw_bytes"].as_f64().unwrap_or(0.0) / (1 << 20) as f64;
        s.ios += d["total_ios"].as_f64().unwrap_or(0.0);
        if dir == "write" {
            s.bytes_written += d["io_bytes"].as_f64().unwrap_or(0.0);
        }
        if d["total_ios"].as_f64().unwrap_or(0.0) > 0.0 {
            let p = &d["clat_ns"]["percentile"];
            lat.push((
                p["50.000000"].as_f64().unwrap_or(0.0) / 1000.0,
                p["99.000000"].as_f64().unwrap_or(0.0) / 1000.0,
            ));
        }
    }
    s.lat_p50_us = lat.iter().map(|l| l.0).fold(0.0, f64::max);
    s.lat_p99_us = lat.iter().map(|l| l.1).fold(0.0, f64::max);
    s.server_cpu_s = cpu_s;
    s
}

/// Median of one field over the repeats of a cell (the upper one of an even count).
pub fn median_of(samples: &[Sample], field: fn(&Sample) -> f64) -> f64 {
    let mut v: Vec<f64> = samples.iter().map(field).collect();
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

#[derive(Serialize)]
pub struct Cell {
    pub workload: String,
    pub target: String,
    pub samples: Vec<Sample>,
    pub iops_median: f64,
    pub iops_min: f64,
    pub iops_max: f64,
    pub mib_s_median: f64,
    pub lat_p50_us_median: f64,
    pub lat_p99_us_median: f64,
    pub server_cpu_s_per_100k_ios: Option<f64>,
}
