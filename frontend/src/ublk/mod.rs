//! The ublk target: torus volumes as `/dev/ublkbN` block devices, served by the cores'
//! own io_uring rings (one queue per core, `queue::QUEUE_DEPTH` requests each).
//!
//! Why not the `libublk` crate: it runs its own io_uring and event loop per queue, so each
//! request would cross from that loop to the core that owns its data and back. torus's cores
//! already run an io_uring; the ublk I/O commands fit in their ordinary 64-byte SQEs, so the UAPI
//! is written out in `sys` (about 150 lines) and a queue is one more kind of work on a core.
//!
//! Devices are created with `UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE`: when torusd
//! stops, the kernel holds new I/O and requeues what was in flight; the next torusd reads the
//! list of its devices from the data dir (`ublk-devices`) and takes them back, so a filesystem
//! mounted on one sees a pause, not an error.

pub mod control;
pub mod error;
pub mod queue;
pub mod sys;

pub use error::{ControlCommand, UblkError};

use crate::exports::Exports;
use control::Control;
use parking_lot::Mutex;
use queue::{Device, StartQueue, MAX_IO_BYTES, QUEUE_DEPTH};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use torus_engine::{Message, Shared};

/// How long the cores may take to start a device's queues (each queues a fetch per tag: no
/// I/O, so a core that takes this long is stuck).
pub const QUEUE_START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the cores may take to let go of a stopped device (the stop aborts every fetch;
/// requests in flight finish first).
pub const QUEUE_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// A device as `torusblk ublk` and the admin API show it.
#[derive(Debug, Clone)]
pub struct DeviceView {
    pub id: u32,
    pub volume: String,
    pub path: String,
    pub queues: u16,
    pub depth: u16,
}

/// This node's ublk devices.
pub struct UblkTarget {
    shared: Arc<Shared>,
    exports: Arc<Exports>,
    state_file: PathBuf,
    control: Mutex<Option<Arc<Control>>>,
    devices: Mutex<BTreeMap<u32, Arc<Device>>>,
}

fn device_params(size: u64, read_only: bool) -> sys::Params {
    let mut attrs = sys::ATTR_VOLATILE_CACHE | sys::ATTR_FUA;
    if read_only {
        attrs |= 1; // UBLK_ATTR_READ_ONLY
    }
    sys::Params {
        len: 0,
        types: sys::PARAM_TYPE_BASIC | sys::PARAM_TYPE_DISCARD,
        basic: sys::ParamBasic {
            attrs,
            logical_bs_shift: 9,
            physical_bs_shift: 12,
            io_opt_shift: 12,
            io_min_shift: 12,
            max_sectors: MAX_IO_BYTES >> 9,
            chunk_sectors: 0,
            dev_sectors: size >> 9,
            virt_boundary_mask: 0,
        },
        discard: sys::ParamDiscard {
            discard_alignment: 0,
            discard_granularity: 4096,
            max_discard_sectors: 1 << 21,
            max_write_zeroes_sectors: 1 << 21,
            max_discard_segments: 1,
            reserved0: 0,
        },
    }
}

/// Opens `/dev/ublkcN`, waiting briefly for devtmpfs/udev to make it.
fn open_cdev(id: u32) -> Result<std::os::fd::OwnedFd, UblkError> {
    let path = format!("/dev/ublkc{id}");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
        {
            Ok(f) => return Ok(f.into()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(source) => return Err(UblkError::OpenCharDevice { dev_id: id, source }),
        }
    }
}

impl UblkTarget {
    pub fn new(
        shared: Arc<Shared>,
        exports: Arc<Exports>,
        data_dir: &std::path::Path,
    ) -> UblkTarget {
        UblkTarget {
            shared,
            exports,
            state_file: data_dir.join("ublk-devices"),
            control: Mutex::new(None),
            devices: Mutex::new(BTreeMap::new()),
        }
    }

    fn control(&self) -> Result<Arc<Control>, UblkError> {
        let mut c = self.control.lock();
        if let Some(c) = &*c {
            return Ok(c.clone());
        }
        let opened = Arc::new(Control::open()?);
        *c = Some(opened.clone());
        Ok(opened)
    }

    pub fn list(&self) -> Vec<DeviceView> {
        self.devices.lock().values().map(|d| view(d)).collect()
    }

    /// Serves `volume` as a new `/dev/ublkbN`.
    pub fn create(&self, volume: &str) -> Result<DeviceView, UblkError> {
        let attachment = self.attach(volume)?;
        let control = self.control()?;
        let queues = self.shared.mailboxes.len() as u16;
        let info = control.add(queues, QUEUE_DEPTH, MAX_IO_BYTES)?;
        let id = info.dev_id;
        let v = attachment.0.clone();
        let started = (|| {
            control.set_params(id, &device_params(v.size(), v.read_only))?;
            let device = Arc::new(Device {
                id,
                cdev: open_cdev(id)?,
                queues,
                depth: QUEUE_DEPTH,
                attachment,
            });
            self.start_queues(&device)?;
            control.start(id)?;
            Ok::<_, UblkError>(device)
        })();
        match started {
            Ok(device) => {
                let shown = view(&device);
                self.devices.lock().insert(id, device);
                self.save();
                Ok(shown)
            }
            Err(e) => {
                let _ = control.stop(id);
                let _ = control.delete(id);
                Err(e)
            }
        }
    }

    /// Claims `volume` for a device (the attach policy may refuse it).
    fn attach(&self, volume: &str) -> Result<crate::exports::Attachment, UblkError> {
        self.exports.attach_checked(volume).map_err(|e| match e {
            None => UblkError::NoVolume {
                volume: volume.to_owned(),
            },
            Some(why) => UblkError::Refused { why },
        })
    }

    fn start_queues(&self, device: &Arc<Device>) -> Result<(), UblkError> {
        let (tx, rx) = crossbeam_channel::bounded(device.queues as usize);
        for q in 0..device.queues {
            self.shared.mailboxes[q as usize].send(Message::Service(Box::new(StartQueue {
                device: device.clone(),
                q,
                ready: tx.clone(),
            })));
        }
        for _ in 0..device.queues {
            rx.recv_timeout(QUEUE_START_TIMEOUT)
                .map_err(|_| UblkError::QueueStartTimeout)??;
        }
        Ok(())
    }

    /// Stops and deletes device `id`: the block device goes away, after the kernel has
    /// flushed what its users wrote.
    pub fn remove(&self, id: u32) -> Result<(), UblkError> {
        let device = self
            .devices
            .lock()
            .remove(&id)
            .ok_or(UblkError::NotServed { dev_id: id })?;
        let control = self.control()?;
        control.stop(id)?;
        // The stop aborts every queue's fetches; each core then drops its share.
        let deadline = Instant::now() + QUEUE_STOP_TIMEOUT;
        while Arc::strong_count(&device) > 1 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if Arc::strong_count(&device) > 1 {
            return Err(UblkError::QueueStopTimeout { dev_id: id });
        }
        drop(device);
        control.delete(id)?;
        self.save();
        Ok(())
    }

    /// Takes back the devices a previous torusd served (listed in the data dir). Devices
    /// the kernel no longer has are forgotten; each one taken back is logged.
    pub fn recover(&self) {
        let Ok(text) = std::fs::read_to_string(&self.state_file) else {
            return;
        };
        for line in text.lines() {
            let mut f = line.split('\t');
            let (Some(Ok(id)), Some(volume)) = (f.next().map(str::parse::<u32>), f.next()) else {
                continue;
            };
            match self.recover_one(id, volume) {
                Ok(()) => eprintln!("torusd: ublk device /dev/ublkb{id} ({volume}) taken back"),
                Err(e) => eprintln!("torusd: ublk device {id} ({volume}) not taken back: {e}"),
            }
        }
        self.save();
    }

    fn recover_one(&self, id: u32, volume: &str) -> Result<(), UblkError> {
        let control = self.control()?;
        // The kernel quiesces a device shortly after its server's rings close.
        let deadline = Instant::now() + Duration::from_secs(15);
        let info = loop {
            let info = control.info(id)?;
            if info.state == sys::S_DEV_QUIESCED || Instant::now() > deadline {
                break info;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        if info.state != sys::S_DEV_QUIESCED {
            return Err(UblkError::NotQuiesced { state: info.state });
        }
        if info.nr_hw_queues as usize != self.shared.mailboxes.len() {
            return Err(UblkError::QueueCountMismatch {
                queues: info.nr_hw_queues,
                cores: self.shared.mailboxes.len(),
            });
        }
        let attachment = self.attach(volume)?;
        loop {
            match control.start_recovery(id) {
                Ok(()) => break,
                Err(e) if e.errno() == Some(libc::EBUSY) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => return Err(e),
            }
        }
        let device = Arc::new(Device {
            id,
            cdev: open_cdev(id)?,
            queues: info.nr_hw_queues,
            depth: info.queue_depth,
            attachment,
        });
        self.start_queues(&device)?;
        control.end_recovery(id)?;
        self.devices.lock().insert(id, device);
        Ok(())
    }

    /// Writes the device list (replaced atomically) so a restarted torusd can take them back.
    fn save(&self) {
        let text: String = self
            .devices
            .lock()
            .values()
            .map(|d| format!("{}\t{}\n", d.id, d.attachment.0.name))
            .collect();
        let tmp = self.state_file.with_extension("tmp");
        let result =
            std::fs::write(&tmp, text).and_then(|_| std::fs::rename(&tmp, &self.state_file));
        if let Err(e) = result {
            eprintln!("torusd: saving {}: {e}", self.state_file.display());
        }
    }
}

fn view(d: &Device) -> DeviceView {
    DeviceView {
        id: d.id,
        volume: d.attachment.0.name.clone(),
        path: format!("/dev/ublkb{}", d.id),
        queues: d.queues,
        depth: d.depth,
    }
}
