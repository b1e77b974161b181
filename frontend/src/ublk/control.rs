//! The ublk control device (`/dev/ublk-control`): add, configure, start, stop and delete
//! devices, and take a device back after a restart (user recovery). Commands go through a
//! small io_uring of 128-byte SQEs owned by the control plane; START_DEV and
//! END_USER_RECOVERY block in the kernel until every queue has fetched, so they run while the
//! cores issue their fetches.

use super::error::{ControlCommand, UblkError};
use super::sys;
use io_uring::{cqueue, opcode, squeue, types, IoUring};
use parking_lot::Mutex;
use std::fs::File;
use std::os::fd::AsRawFd;

pub const CONTROL_PATH: &str = "/dev/ublk-control";

pub struct Control {
    file: File,
    ring: Mutex<IoUring<squeue::Entry128, cqueue::Entry>>,
}

impl Control {
    pub fn open() -> Result<Control, UblkError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(CONTROL_PATH)
            .map_err(|source| UblkError::OpenControl { source })?;
        let ring = IoUring::<squeue::Entry128, cqueue::Entry>::builder()
            .build(4)
            .map_err(|source| UblkError::ControlRing { source })?;
        Ok(Control {
            file,
            ring: Mutex::new(ring),
        })
    }

    /// Sends one control command and waits for its answer (>= 0, or the kernel's errno).
    fn command(
        &self,
        command: ControlCommand,
        op: u32,
        cmd: sys::CtrlCmd,
    ) -> Result<i32, UblkError> {
        let dev_id = cmd.dev_id;
        let failed = |errno: i32| UblkError::Control {
            command,
            dev_id,
            errno,
        };
        let entry = opcode::UringCmd80::new(types::Fd(self.file.as_raw_fd()), op)
            .cmd(sys::bytes_of(&cmd))
            .build()
            .user_data(1);
        let mut ring = self.ring.lock();
        // SAFETY: whatever `cmd.addr` points at belongs to the caller, which waits here for
        // the completion before it returns.
        unsafe { ring.submission().push(&entry) }
            .map_err(|_| UblkError::ControlRingFull { command, dev_id })?;
        loop {
            match ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // io_uring_enter's own failure: an OS error, so it always has an errno.
                Err(e) => return Err(failed(e.raw_os_error().unwrap_or(libc::EIO))),
            }
            if let Some(cqe) = ring.completion().next() {
                let r = cqe.result();
                return if r < 0 { Err(failed(-r)) } else { Ok(r) };
            }
        }
    }

    fn header(dev_id: u32) -> sys::CtrlCmd {
        sys::CtrlCmd {
            dev_id,
            queue_id: u16::MAX,
            ..Default::default()
        }
    }

    /// Adds a device (the kernel picks its id); returns what the kernel made of `info`.
    pub fn add(
        &self,
        queues: u16,
        depth: u16,
        max_io_bytes: u32,
    ) -> Result<sys::DevInfo, UblkError> {
        let mut info = sys::DevInfo {
            nr_hw_queues: queues,
            queue_depth: depth,
            max_io_buf_bytes: max_io_bytes,
            dev_id: u32::MAX,
            flags: sys::F_USER_RECOVERY | sys::F_USER_RECOVERY_REISSUE | sys::F_CMD_IOCTL_ENCODE,
            ..Default::default()
        };
        let mut cmd = Self::header(u32::MAX);
        cmd.addr = &mut info as *mut sys::DevInfo as u64;
        cmd.len = std::mem::size_of::<sys::DevInfo>() as u16;
        self.command(ControlCommand::AddDevice, sys::CMD_ADD_DEV, cmd)?;
        Ok(info)
    }

    pub fn info(&self, dev_id: u32) -> Result<sys::DevInfo, UblkError> {
        let mut info = sys::DevInfo::default();
        let mut cmd = Self::header(dev_id);
        cmd.addr = &mut info as *mut sys::DevInfo as u64;
        cmd.len = std::mem::size_of::<sys::DevInfo>() as u16;
        self.command(ControlCommand::GetDeviceInfo, sys::CMD_GET_DEV_INFO, cmd)?;
        Ok(info)
    }

    pub fn set_params(&self, dev_id: u32, params: &sys::Params) -> Result<(), UblkError> {
        let mut params = *params;
        params.len = std::mem::size_of::<sys::Params>() as u32;
        let mut cmd = Self::header(dev_id);
        cmd.addr = &mut params as *mut sys::Params as u64;
        cmd.len = params.len as u16;
        self.command(ControlCommand::SetParams, sys::CMD_SET_PARAMS, cmd)
            .map(drop)
    }

    /// Blocks until every queue has fetched, then the block device appears.
    pub fn start(&self, dev_id: u32) -> Result<(), UblkError> {
        let mut cmd = Self::header(dev_id);
        cmd.data[0] = std::process::id() as u64;
        self.command(ControlCommand::StartDevice, sys::CMD_START_DEV, cmd)
            .map(drop)
    }

    pub fn stop(&self, dev_id: u32) -> Result<(), UblkError> {
        self.command(
            ControlCommand::StopDevice,
            sys::CMD_STOP_DEV,
            Self::header(dev_id),
        )
        .map(drop)
    }

    /// Waits until the device's char device is closed by everyone, then removes it.
    pub fn delete(&self, dev_id: u32) -> Result<(), UblkError> {
        self.command(
            ControlCommand::DeleteDevice,
            sys::CMD_DEL_DEV,
            Self::header(dev_id),
        )
        .map(drop)
    }

    pub fn start_recovery(&self, dev_id: u32) -> Result<(), UblkError> {
        self.command(
            ControlCommand::StartRecovery,
            sys::CMD_START_USER_RECOVERY,
            Self::header(dev_id),
        )
        .map(drop)
    }

    /// Like `start`: blocks until every queue has fetched again.
    pub fn end_recovery(&self, dev_id: u32) -> Result<(), UblkError> {
        let mut cmd = Self::header(dev_id);
        cmd.data[0] = std::process::id() as u64;
        self.command(ControlCommand::EndRecovery, sys::CMD_END_USER_RECOVERY, cmd)
            .map(drop)
    }
}
