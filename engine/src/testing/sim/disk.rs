//! The simulated disk: two memfds, what reads see (`current`) and what survives power loss
//! (`durable`). A completed write is dirty until a completed fdatasync submitted after it
//! covers it. Operations the store submits wait in `inflight` and complete in an order the
//! seed chooses (`Sim::complete_disk_op`), with the faults real disks have: latent read
//! errors, failed writes (some sectors written), a full device, misdirected writes, and a
//! failed fdatasync that drops dirty pages, as Linux does.

use super::{Faults, Sim, SimFailure, SECTOR};
use crate::layout::PAGE_SIZE;
use crate::store::{DiskOp, IoSubmit, StoreIo};
use std::fs::File;
use std::os::fd::FromRawFd;
use std::os::unix::fs::FileExt;

fn memfd(name: &std::ffi::CStr) -> File {
    // SAFETY: plain syscall; the fd it returns is owned by the File from here on.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: fd is a fresh descriptor nobody else owns.
    unsafe { File::from_raw_fd(fd) }
}

/// A completed write not yet covered by a completed fdatasync.
pub(super) struct Dirty {
    seq: u64,
    pub(super) offset: u64,
    pub(super) data: Vec<u8>,
}

pub(super) struct InFlight {
    pub(super) op: DiskOp,
    io: StoreIo,
    /// For a sync: dirty writes with a lower sequence number completed before it was
    /// submitted, and are what it makes durable.
    sync_mark: u64,
}

/// The disk: what reads see (`current`) and what survives power loss (`durable`).
pub(super) struct SimDisk {
    pub(super) current: File,
    pub(super) durable: File,
    pub(super) size: u64,
    pub(super) dirty: Vec<Dirty>,
    dirty_seq: u64,
    pub(super) inflight: Vec<InFlight>,
}

impl IoSubmit for SimDisk {
    fn submit_store(&mut self, op: DiskOp, io: StoreIo) {
        self.inflight.push(InFlight {
            op,
            io,
            sync_mark: self.dirty_seq,
        });
    }
}

impl SimDisk {
    pub(super) fn new(size: u64) -> SimDisk {
        let current = memfd(c"torus-sim-current");
        let durable = memfd(c"torus-sim-durable");
        current.set_len(size).expect("size memfd");
        durable.set_len(size).expect("size memfd");
        SimDisk {
            current,
            durable,
            size,
            dirty: Vec::new(),
            dirty_seq: 0,
            inflight: Vec::new(),
        }
    }

    pub(super) fn write_current(&mut self, offset: u64, data: &[u8]) {
        self.current
            .write_all_at(data, offset)
            .expect("memfd write");
        self.dirty.push(Dirty {
            seq: self.dirty_seq,
            offset,
            data: data.to_vec(),
        });
        self.dirty_seq += 1;
    }

    /// `current` = `durable` + the dirty writes still held, in order.
    pub(super) fn rebuild_current(&mut self) {
        let mut image = vec![0u8; self.size as usize];
        self.durable
            .read_exact_at(&mut image, 0)
            .expect("memfd read");
        for d in &self.dirty {
            let at = d.offset as usize;
            image[at..at + d.data.len()].copy_from_slice(&d.data);
        }
        self.current.write_all_at(&image, 0).expect("memfd write");
    }

    /// The bytes a write operation carries (read from the store's buffers).
    pub(super) fn gather(op: &DiskOp) -> (u64, Vec<u8>) {
        match *op {
            // SAFETY: the store keeps the buffer alive until the operation completes.
            DiskOp::Write { offset, ptr, len } => (
                offset,
                unsafe { std::slice::from_raw_parts(ptr, len as usize) }.to_vec(),
            ),
            DiskOp::Writev {
                offset,
                iovecs,
                count,
            } => {
                let mut data = Vec::new();
                // SAFETY: the iovecs and the buffers they name live until completion.
                for iov in unsafe { std::slice::from_raw_parts(iovecs, count as usize) } {
                    data.extend_from_slice(unsafe {
                        std::slice::from_raw_parts(iov.iov_base as *const u8, iov.iov_len)
                    });
                }
                (offset, data)
            }
            _ => unreachable!("not a write"),
        }
    }
}

impl Sim {
    pub(super) fn trace_fault(&self, what: &str, offset: u64, len: usize) {
        if self.trace {
            let page = offset / PAGE_SIZE as u64;
            let r = &self.region;
            let area = if page < r.journal {
                "checkpoint"
            } else if page < r.slots {
                "journal"
            } else {
                "slots"
            };
            eprintln!("[{}] {what} at page {page} ({area}) len {len}", self.step);
        }
    }

    /// Completes one disk operation, maybe with a fault.
    pub(super) fn complete_disk_op(
        &mut self,
        index: usize,
        faults_on: bool,
    ) -> Result<(), SimFailure> {
        let f = if faults_on {
            self.config.faults
        } else {
            Faults::none()
        };
        let op = self.disk.inflight.remove(index);
        self.report.disk_ops += 1;
        let result = match op.op {
            DiskOp::Read {
                offset, ptr, len, ..
            } => {
                if f.read_error && self.rng.chance(0.004) {
                    self.report.read_errors += 1;
                    self.trace_fault("read error", offset, len as usize);
                    self.damaged = true;
                    -libc::EIO
                } else {
                    // SAFETY: the store keeps the buffer alive until the operation completes.
                    let buf = unsafe { std::slice::from_raw_parts_mut(ptr, len as usize) };
                    self.disk
                        .current
                        .read_exact_at(buf, offset)
                        .expect("memfd read");
                    len as i32
                }
            }
            DiskOp::Write { .. } | DiskOp::Writev { .. } => {
                let (offset, data) = SimDisk::gather(&op.op);
                let len = data.len() as i32;
                if f.write_error && self.rng.chance(0.002) {
                    // Some sectors may have reached the disk before it failed.
                    self.report.write_errors += 1;
                    self.trace_fault("write error", offset, data.len());
                    self.damaged = true;
                    let part = self.rng.below(data.len() as u64 / SECTOR as u64 + 1) as usize;
                    if part > 0 {
                        self.disk.write_current(offset, &data[..part * SECTOR]);
                    }
                    -libc::EIO
                } else if f.device_full && self.rng.chance(0.002) {
                    self.report.device_full += 1;
                    self.trace_fault("device full", offset, data.len());
                    -libc::ENOSPC
                } else if f.misdirect && self.rng.chance(0.002) {
                    self.report.misdirected_writes += 1;
                    self.trace_fault("misdirected write", offset, data.len());
                    self.damaged = true;
                    let pages = (self.disk.size - data.len() as u64) / PAGE_SIZE as u64;
                    let to = self.rng.below(pages + 1) * PAGE_SIZE as u64;
                    self.disk.write_current(to, &data);
                    len
                } else {
                    self.disk.write_current(offset, &data);
                    len
                }
            }
            DiskOp::SyncData => {
                if f.sync_error && self.rng.chance(0.004) {
                    // Linux marks the pages clean anyway: some dirty data is simply gone.
                    self.report.sync_errors += 1;
                    self.trace_fault("fdatasync error", 0, 0);
                    self.damaged = true;
                    let mut kept = Vec::new();
                    for d in std::mem::take(&mut self.disk.dirty) {
                        if d.seq >= op.sync_mark || self.rng.chance(0.5) {
                            kept.push(d);
                        }
                    }
                    self.disk.dirty = kept;
                    self.disk.rebuild_current();
                    -libc::EIO
                } else {
                    let mut kept = Vec::new();
                    for d in std::mem::take(&mut self.disk.dirty) {
                        if d.seq < op.sync_mark {
                            self.disk
                                .durable
                                .write_all_at(&d.data, d.offset)
                                .expect("write");
                        } else {
                            kept.push(d);
                        }
                    }
                    self.disk.dirty = kept;
                    0
                }
            }
        };
        let store = self.store.as_mut().expect("store open");
        store.on_io(&mut self.disk, op.io, result);
        self.collect()
    }
}
