//! Every answer of the store checked against the model: a read returns a version the model
//! allows (and after a crash, one the crash may leave); EIO only where injected damage or a
//! failed write explains it. Acknowledged writes, flushes, snapshots and deletions update
//! the model.

use super::client::Request;
use super::model::{content_of, decode_sector, Content, Sector};
use super::{Sim, SimFailure, CLONE, SECTOR, UNKNOWN, ZERO_FLAG};
use crate::error::BlockError;
use crate::request::Output;

type Check = Result<(), String>;

impl Sim {
    /// Takes the store's answers and checks them against the model.
    pub(super) fn collect(&mut self) -> Result<(), SimFailure> {
        let out = std::mem::take(&mut self.store().out);
        for (_, completion) in out {
            let Some(request) = self.requests.remove(&completion.token) else {
                return self.fail(format!("answer to unknown request {}", completion.token));
            };
            if let Err(what) = self.check(request, completion.output) {
                return self.fail(what);
            }
        }
        Ok(())
    }

    /// A write or fdatasync failed on the disk (in this run): the region is poisoned and
    /// writes and flushes rightly answer EIO until the store is opened again.
    fn disk_failed(&self) -> bool {
        self.report.write_errors + self.report.sync_errors + self.report.device_full > 0
    }

    fn check(&mut self, request: Request, output: Result<Output, BlockError>) -> Check {
        if self.trace {
            match &request {
                Request::Read {
                    volume,
                    first,
                    allowed,
                    ..
                } => eprintln!(
                    "[{}] read v{volume} {first}+{} -> {}",
                    self.step,
                    allowed.len(),
                    if output.is_ok() {
                        "ok".to_string()
                    } else {
                        format!("{output:?}")
                    }
                ),
                r => eprintln!("[{}] {r:?} -> {output:?}", self.step),
            }
        }
        match request {
            Request::Write {
                volume,
                first,
                sectors,
                version,
                fua,
            } => {
                self.now += 1;
                let now = self.now;
                let acked = match &output {
                    Ok(Output::Done) => {
                        self.report.writes_acked += 1;
                        self.report.bytes_acked += sectors * SECTOR as u64;
                        Some(true)
                    }
                    Err(BlockError::NoSpace) => {
                        self.report.writes_enospc += 1;
                        None
                    }
                    // A partial write reads its edges: damage there fails it too.
                    Err(BlockError::Io) if self.disk_failed() || self.damaged => Some(false),
                    other => return Err(format!("write answered {other:?}")),
                };
                let model = self.sectors.get_mut(&volume).expect("volume");
                for s in first..first + sectors {
                    let sector = &mut model[s as usize];
                    let i = sector
                        .0
                        .iter()
                        .position(|r| r.tag == version)
                        .expect("write in the sector's versions");
                    match acked {
                        // ENOSPC harms nothing: the write never happened.
                        None => {
                            sector.0.remove(i);
                        }
                        Some(acked) => {
                            let r = &mut sector.0[i];
                            r.ended = Some(now);
                            r.acked = acked;
                            if acked && fua {
                                r.durable = true;
                                sector.prune();
                            }
                        }
                    }
                }
                Ok(())
            }
            Request::Volume { tag } => {
                self.now += 1;
                let now = self.now;
                let acked = match output {
                    Ok(Output::Done) => true,
                    Err(BlockError::Io) if self.disk_failed() || self.damaged => false,
                    // No room in the block map for the clone: nothing happened.
                    Err(BlockError::NoSpace) => {
                        self.report.writes_enospc += 1;
                        for sector in self.sectors.get_mut(&CLONE).expect("clone volume") {
                            sector.0.retain(|r| r.tag != tag);
                        }
                        return Ok(());
                    }
                    other => return Err(format!("clone or drop answered {other:?}")),
                };
                self.report.volume_ops_acked += acked as u64;
                for sector in self.sectors.get_mut(&CLONE).expect("clone volume") {
                    if let Some(r) = sector.0.iter_mut().find(|r| r.tag == tag) {
                        r.ended = Some(now);
                        r.acked = acked;
                        // Answered once its journal record is durable.
                        r.durable = acked;
                        if acked {
                            sector.prune();
                        }
                    }
                }
                Ok(())
            }
            Request::Flush { mark } => {
                match output {
                    Ok(Output::Done) => {
                        self.report.flushes_acked += 1;
                        for model in self.sectors.values_mut() {
                            for sector in model.iter_mut() {
                                sector.flushed(mark);
                            }
                        }
                    }
                    Err(BlockError::Io) if self.disk_failed() => self.report.flushes_failed += 1,
                    other => return Err(format!("flush answered {other:?}")),
                }
                Ok(())
            }
            Request::Read {
                volume,
                first,
                allowed,
                after_crash,
            } => {
                let sectors = allowed.len() as u64;
                let (data, head) = match output {
                    Ok(Output::Read { data, head }) => (data, head),
                    Err(BlockError::Io) if self.damaged => {
                        self.report.reads_eio += 1;
                        if after_crash {
                            let model = self.sectors.get_mut(&volume).expect("volume");
                            for s in first..first + sectors {
                                model[s as usize] = Sector::known(UNKNOWN);
                            }
                        }
                        return Ok(());
                    }
                    other => {
                        return Err(format!(
                        "read of volume {volume} sectors {first}+{sectors} answered {other:?}{}",
                        if self.damaged {
                            ""
                        } else {
                            " with no damage injected"
                        }
                    ))
                    }
                };
                self.report.reads_checked += 1;
                for (i, allowed) in allowed.iter().enumerate() {
                    let s = first + i as u64;
                    let at = head + i * SECTOR;
                    let got = decode_sector(&data[at..at + SECTOR], s);
                    let ok = match &got {
                        Content::Garbage => false,
                        _ if allowed.contains(&UNKNOWN) => true,
                        got => allowed.iter().any(|&v| content_of(v) == *got),
                    };
                    if !ok {
                        // Older than every version allowed: an acknowledged write was lost.
                        let older = |v: u64| allowed.iter().all(|a| *a & !ZERO_FLAG > v);
                        let kind = match &got {
                            Content::Version(v) if older(*v) => "stale read (a write was lost)",
                            Content::Zero if older(0) => "stale read (a write was lost)",
                            _ => "wrong data",
                        };
                        return Err(format!(
                            "{kind}: volume {volume} sector {s} holds {got:?}, allowed {allowed:?}{}",
                            if after_crash { " (first read after a crash)" } else { "" }
                        ));
                    }
                    if after_crash {
                        let durable = match got {
                            Content::Version(v) => v,
                            _ => 0,
                        };
                        self.sectors.get_mut(&volume).expect("volume")[s as usize] =
                            Sector::known(durable);
                    }
                }
                self.report.bytes_verified += sectors * SECTOR as u64;
                Ok(())
            }
        }
    }
}
