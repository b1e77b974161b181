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
pub mod queue;
pub mod sys;

use crate::exports::Exports;
use control::Control;
use parking_lot::Mutex;
use queue::{Device, StartQueue, MAX_IO_BYTES, QUEUE_DEPTH};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use torus_engine::{Message, Shared};

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
fn open_cdev(id: u32) -> Result<std::os::fd::OwnedFd, String> {
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
            Err(e) => return Err(format!("open {path}: {e}")),
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

    fn control(&self) -> Result<Arc<Control>, String> {
        let mut c = self.control.lock();
        if let Some(c) = &*c {
            return Ok(c.clone());
        }
        let opened = Arc::new(Control::open().map_err(|e| e.to_string())?);
        *c = Some(opened.clone());
        Ok(opened)
    }

    pub fn list(&self) -> Vec<DeviceView> {
        self.devices.lock().values().map(|d| view(d)).collect()
    }

    /// Serves `volume` as a new `/dev/ublkbN`.
    pub fn create(&self, volume: &str) -> Result<DeviceView, String> {
        let attachment = self.exports.attach_checked(volume).map_err(|e| match e {
            None => format!("no volume named {volume:?}"),
            Some(why) => why,
        })?;
        let control = self.control()?;
        let queues = self.shared.mailboxes.len() as u16;
        let info = control
            .add(queues, QUEUE_DEPTH, MAX_IO_BYTES)
            .map_err(|e| format!("add a ublk device: {e}"))?;
        let id = info.dev_id;
        let v = attachment.0.clone();
        let started = (|| {
            control
                .set_params(id, &device_params(v.size(), v.read_only))
                .map_err(|e| format!("set the parameters of ublk device {id}: {e}"))?;
            let device = Arc::new(Device {
                id,
                cdev: open_cdev(id)?,
                queues,
                depth: QUEUE_DEPTH,
                attachment,
            });
            self.start_queues(&device)?;
            control
                .start(id)
                .map_err(|e| format!("start ublk device {id}: {e}"))?;
            Ok::<_, String>(device)
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

    fn start_queues(&self, device: &Arc<Device>) -> Result<(), String> {
        let (tx, rx) = crossbeam_channel::bounded(device.queues as usize);
        for q in 0..device.queues {
            self.shared.mailboxes[q as usize].send(Message::Service(Box::new(StartQueue {
                device: device.clone(),
                q,
                ready: tx.clone(),
            })));
        }
        for _ in 0..device.queues {
            rx.recv_timeout(Duration::from_secs(10))
                .map_err(|_| "a core did not start its ublk queue within 10 s".to_string())??;
        }
        Ok(())
    }

    /// Stops and deletes device `id`: the block device goes away, after the kernel has
    /// flushed what its users wrote.
    pub fn remove(&self, id: u32) -> Result<(), String> {
        let device = self
            .devices
            .lock()
            .remove(&id)
            .ok_or_else(|| format!("ublk device {id} is not served by this node"))?;
        let control = self.control()?;
        control
            .stop(id)
            .map_err(|e| format!("stop ublk device {id}: {e}"))?;
        // The stop aborts every queue's fetches; each core then drops its share.
        let deadline = Instant::now() + Duration::from_secs(10);
        while Arc::strong_count(&device) > 1 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if Arc::strong_count(&device) > 1 {
            return Err(format!("ublk device {id}: queues did not stop within 10 s"));
        }
        drop(device);
        control
            .delete(id)
            .map_err(|e| format!("delete ublk device {id}: {e}"))?;
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

    fn recover_one(&self, id: u32, volume: &str) -> Result<(), String> {
        let control = self.control()?;
        // The kernel quiesces a device shortly after its server's rings close.
        let deadline = Instant::now() + Duration::from_secs(15);
        let info = loop {
            let info = control
                .info(id)
                .map_err(|e| format!("the kernel has no such device ({e})"))?;
            if info.state == sys::S_DEV_QUIESCED || Instant::now() > deadline {
                break info;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        if info.state != sys::S_DEV_QUIESCED {
            return Err(format!(
                "device state {} (not waiting for a server)",
                info.state
            ));
        }
        if info.nr_hw_queues as usize != self.shared.mailboxes.len() {
            return Err(format!(
                "it has {} queues and this torusd runs {} cores",
                info.nr_hw_queues,
                self.shared.mailboxes.len()
            ));
        }
        let attachment = self.exports.attach_checked(volume).map_err(|e| match e {
            None => format!("no volume named {volume:?}"),
            Some(why) => why,
        })?;
        loop {
            match control.start_recovery(id) {
                Ok(()) => break,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => return Err(format!("start recovery: {e}")),
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
        control
            .end_recovery(id)
            .map_err(|e| format!("end recovery: {e}"))?;
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
