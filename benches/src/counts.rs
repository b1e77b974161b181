//! `torus-bench counts`: the allocations and the cluster's locks per replicated 4 KiB write.
//! Three nodes of a counters build (`torusd-testing --features counters`, found as `torusd`
//! beside `torus-bench`: `benches/write_path_counts.sh` arranges it) and their etcd; fio
//! writes a fixed number of random 4 KiB blocks through node a at each queue depth, and each
//! node's `/metrics` is read before and after. What an idle window of the same length
//! counted (heartbeats, map polls) is taken off, so the figures are the writes' own.

use crate::fio::run_fio;
use crate::targets::start_targets;
use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// (allocations, locks) a node has counted so far.
fn counted(admin: u16) -> Result<(u64, u64)> {
    let mut s = TcpStream::connect(("127.0.0.1", admin)).context("connect to the admin API")?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let value = |name: &str| -> Result<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .with_context(|| format!("/metrics has no {name}: is torusd a counters build?"))
    };
    Ok((
        value("torus_counted_allocations_total")?,
        value("torus_counted_locks_total")?,
    ))
}

fn all_counted(admins: &[u16]) -> Result<Vec<(u64, u64)>> {
    admins.iter().map(|&a| counted(a)).collect()
}

fn delta(after: &[(u64, u64)], before: &[(u64, u64)]) -> Vec<(f64, f64)> {
    after
        .iter()
        .zip(before)
        .map(|(a, b)| ((a.0 - b.0) as f64, (a.1 - b.1) as f64))
        .collect()
}

pub fn counts(work: &Path, ios: u64, depths: &[u32]) -> Result<()> {
    let size: u64 = 256 << 20;
    let mut targets = start_targets(&["torus-3x"], work, size)?;
    let target = targets.pop().context("the cluster")?;
    let admins = target.admins.clone();
    if admins.len() != 3 {
        bail!("expected three nodes");
    }
    println!("# Allocations and cluster locks per replicated 4 KiB write ({ios} writes per depth)");
    println!();
    println!("| QD | node | role | allocations / write | locks / write |");
    println!("|---|---|---|---|---|");
    for &qd in depths {
        let before = all_counted(&admins)?;
        let started = Instant::now();
        run_fio(
            &target,
            &[
                "--name=counts".into(),
                "--rw=randwrite".into(),
                "--bs=4k".into(),
                format!("--iodepth={qd}"),
                format!("--io_size={}", ios * 4096),
                "--norandommap".into(),
                format!("--size={size}"),
            ],
        )?;
        let took = started.elapsed();
        let after = all_counted(&admins)?;
        // The same length of idle time, for what the control loops count meanwhile.
        let idle_before = all_counted(&admins)?;
        std::thread::sleep(took);
        let idle_after = all_counted(&admins)?;
        let busy = delta(&after, &before);
        let idle = delta(&idle_after, &idle_before);
        let mut total = (0.0, 0.0);
        for (i, (b, z)) in busy.iter().zip(&idle).enumerate() {
            let per = ((b.0 - z.0) / ios as f64, (b.1 - z.1) / ios as f64);
            total.0 += per.0;
            total.1 += per.1;
            let role = if i == 0 { "client's node" } else { "replica" };
            println!(
                "| {qd} | {} | {role} | {:.1} | {:.1} |",
                ["a", "b", "c"][i],
                per.0,
                per.1
            );
        }
        println!("| {qd} | all | | {:.1} | {:.1} |", total.0, total.1);
    }
    println!();
    println!(
        "Node a takes the client's requests (NBD) and is the primary of some placement groups; \
         a write whose primary is another node is forwarded there, so each node's share mixes \
         the roles. Idle windows of the same length were subtracted."
    );
    Ok(())
}
