//! Scrub: every block of a volume this node holds as a clean replica is read (each read
//! checks the block's crc32c) and each bad one rewritten from another clean replica; then this
//! node's block list is compared with each other clean holder's, and a block whose crc here
//! differs from what most holders have is rewritten from them (`compare_replicas`).
//!
//! Invariant: blocks written during the scrub are left alone (the write itself went to every
//! replica): while a PG is scrubbed here, the blocks coordinated writes touch are remembered
//! (`send_local_tracked`), as are those of replica writes.

use super::Cluster;
use crate::map::ClusterMap;
use crate::metadata::VolumeRecord;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use torus_engine::{Piece, PieceKind, BLOCK_SIZE, CHUNK_SIZE};

/// What a scrub found on one node.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ScrubReport {
    pub node: String,
    pub blocks_checked: u64,
    pub bad_found: u64,
    /// Blocks whose crc32c here differed from the other replicas'.
    #[serde(default)]
    pub diverged: u64,
    pub repaired: u64,
    pub problems: Vec<String>,
}

impl Cluster {
    /// Reads every block of `volume` this node holds as a clean replica (each read checks the
    /// block's crc32c) and rewrites each bad one from another clean replica.
    pub async fn scrub_local(self: &Arc<Self>, volume: u32) -> ScrubReport {
        let mut report = ScrubReport {
            node: self.me.clone(),
            ..ScrubReport::default()
        };
        let Some(vol) = self.volume(volume) else {
            report.problems.push("no such volume here".into());
            return report;
        };
        if let Ok((Some(m), _)) = self.kv.map().await {
            self.install_map(m);
        }
        let map = self.map();
        let pg_count = map.pg_count as usize;
        let mut bitmap = vec![false; pg_count];
        let mut pgs = Vec::new();
        {
            let mut busy = 0;
            let mut not_clean = 0;
            for pg in 0..map.pg_count {
                if map.slot_of(pg, &self.me).is_none() {
                    continue;
                }
                if !map.clean_holder(pg, vol.replicas, &self.me) {
                    not_clean += 1;
                } else if !self.recovering.insert(pg) {
                    busy += 1;
                } else {
                    bitmap[pg as usize] = true;
                    pgs.push(pg);
                }
            }
            if not_clean > 0 {
                report.problems.push(format!(
                    "{not_clean} PGs not scrubbed here: this node is catching up on them"
                ));
            }
            if busy > 0 {
                report.problems.push(format!(
                    "{busy} PGs not scrubbed here: a catch-up or another scrub holds them"
                ));
            }
        }
        self.track_dirty(pgs.clone()).await;
        let blocks: Vec<u64> = self
            .list_local(&bitmap)
            .await
            .into_iter()
            .filter(|(v, _, _)| *v == volume)
            .map(|(_, b, _)| b)
            .collect();
        // Runs of consecutive blocks within a chunk: one read each; a failed run is read
        // again block by block to find the bad ones.
        let chunk_blocks = CHUNK_SIZE / BLOCK_SIZE as u64;
        let mut runs: Vec<(u64, u32)> = Vec::new();
        for b in blocks {
            match runs.last_mut() {
                Some(r) if r.0 + r.1 as u64 == b && r.0 / chunk_blocks == b / chunk_blocks => {
                    r.1 += 1
                }
                _ => runs.push((b, 1)),
            }
        }
        let mut bad = Vec::new();
        for (first, n) in runs {
            report.blocks_checked += n as u64;
            if self.read_local(volume, first, n).await {
                continue;
            }
            for b in first..first + n as u64 {
                if !self.read_local(volume, b, 1).await {
                    bad.push(b);
                }
            }
        }
        report.bad_found = bad.len() as u64;
        for b in bad {
            let pg = self.pg_of(volume, b * BLOCK_SIZE as u64);
            let others: Vec<String> = map
                .nodes
                .keys()
                .filter(|n| **n != self.me && map.clean_holder(pg, vol.replicas, n))
                .cloned()
                .collect();
            let mut fixed = false;
            for node in others {
                if self.copy_run(&map, &node, volume, b, 1, 0).await.is_ok() {
                    fixed = true;
                    break;
                }
            }
            if fixed {
                report.repaired += 1;
                self.host.log(&format!("scrub: volume {volume} block {b} failed its checksum here; rewritten from a replica"));
            } else {
                report.problems.push(format!(
                    "block {b}: bad here and no replica could supply it"
                ));
            }
        }
        self.compare_replicas(&map, &vol, volume, &pgs, &mut report)
            .await;
        if !self.flushed_here().await {
            report
                .problems
                .push("flush after the repairs failed".into());
        }
        for pg in pgs {
            self.recovering.remove(pg);
        }
        report
    }

    /// The scrub's second half: this node's block list (volume, block, crc32c) for the PGs it
    /// scrubs against each other clean holder's. A block whose crc here differs from what most
    /// holders have (with two holders: from the PG primary's) is rewritten from one of them,
    /// or unmapped when they hold zeroes; an unmapped block reads as zeroes, so it equals a
    /// mapped block of zeroes. Blocks written during the scrub are left alone.
    async fn compare_replicas(
        &self,
        map: &ClusterMap,
        vol: &VolumeRecord,
        volume: u32,
        pgs: &[u32],
        report: &mut ScrubReport,
    ) {
        let zero_crc = crc32c::crc32c(&[0u8; BLOCK_SIZE]);
        let pg_count = map.pg_count as usize;
        let mut bitmap = vec![false; pg_count];
        for &pg in pgs {
            bitmap[pg as usize] = true;
        }
        let of_volume = |list: Vec<(u32, u64, u32)>| -> BTreeMap<u64, u32> {
            list.into_iter()
                .filter(|(v, _, _)| *v == volume)
                .map(|(_, b, crc)| (b, crc))
                .collect()
        };
        let here = of_volume(self.list_local(&bitmap).await);
        // Each other node that is a clean holder of some of these PGs, with its list for them.
        let mut others: Vec<(String, Vec<bool>, BTreeMap<u64, u32>)> = Vec::new();
        for node in map.nodes.keys().filter(|n| **n != self.me) {
            let mut theirs = vec![false; pg_count];
            let mut any = false;
            for &pg in pgs {
                if map.clean_holder(pg, vol.replicas, node) {
                    theirs[pg as usize] = true;
                    any = true;
                }
            }
            if !any {
                continue;
            }
            // A link torn down a moment ago (the node restarted) answers RETRY once.
            let mut listed = self.list_remote(map, node, &theirs).await;
            for _ in 0..10 {
                if listed.is_ok() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
                listed = self.list_remote(map, node, &theirs).await;
            }
            match listed {
                Ok(list) => others.push((node.clone(), theirs, of_volume(list))),
                Err(e) => report.problems.push(format!(
                    "could not compare with {node}: {e}; its copies were not checked against these"
                )),
            }
        }
        let mut blocks: std::collections::BTreeSet<u64> = here.keys().copied().collect();
        for (_, _, list) in &others {
            blocks.extend(list.keys().copied());
        }
        for b in blocks {
            let pg = self.pg_of(volume, b * BLOCK_SIZE as u64);
            if !bitmap[pg as usize] {
                continue;
            }
            let mine = here.get(&b).copied().unwrap_or(zero_crc);
            let holders: Vec<(&String, u32)> = others
                .iter()
                .filter(|(_, pgs, _)| pgs[pg as usize])
                .map(|(n, _, list)| (n, list.get(&b).copied().unwrap_or(zero_crc)))
                .collect();
            if holders.iter().all(|(_, crc)| *crc == mine) {
                continue;
            }
            if self
                .dirty
                .lock()
                .get(&pg)
                .is_some_and(|d| d.contains_key(&(volume, b)))
            {
                continue; // written during the scrub: the write itself went to every replica
            }
            // The value most holders (this one included) have; on a tie, the primary's.
            let agree = |crc: u32| 1 + holders.iter().filter(|(_, c)| *c == crc).count();
            let mut best = mine;
            for (_, crc) in &holders {
                if agree(*crc) > agree(best) {
                    best = *crc;
                }
            }
            if agree(best) * 2 == holders.len() + 1 {
                let primary = map.targets(pg, vol.replicas).primary;
                if let Some((_, crc)) = holders.iter().find(|(n, _)| Some(n.as_str()) == primary) {
                    best = *crc;
                } else {
                    best = mine;
                }
            }
            if best == mine {
                continue; // the other holder is the odd one out: its own scrub repairs it
            }
            report.diverged += 1;
            let fixed = if best == zero_crc {
                self.unmap_local(volume, b).await
            } else {
                let source = holders
                    .iter()
                    .find(|(_, c)| *c == best)
                    .map(|(n, _)| (*n).clone())
                    .expect("a holder has the chosen value");
                self.copy_run(map, &source, volume, b, 1, 0).await.is_ok()
            };
            if fixed {
                report.repaired += 1;
                self.host.log(&format!("scrub: volume {volume} block {b} differed from the other replicas here; rewritten from them"));
            } else {
                report.problems.push(format!(
                    "block {b}: differs from the other replicas and could not be rewritten"
                ));
            }
        }
    }

    /// True when a local read of `n` blocks from `block` passes its checksums.
    async fn read_local(&self, volume: u32, block: u64, n: u32) -> bool {
        self.send_local_ok(Piece {
            volume,
            offset: block * BLOCK_SIZE as u64,
            len: n * BLOCK_SIZE as u32,
            kind: PieceKind::Read,
        })
        .await
        .unwrap_or(false)
    }
}
