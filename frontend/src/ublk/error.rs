//! What goes wrong serving a ublk device, one variant per thing that happens: the control
//! device cannot be opened or its ring set up, the kernel refuses a control command (with its
//! errno), a device's char device or descriptor area cannot be had, a queue does not start or
//! stop in time, or a device the previous torusd served cannot be taken back. The texts are
//! what the admin API and `torusblk ublk` show the user.

use super::control::CONTROL_PATH;
use super::{QUEUE_START_TIMEOUT, QUEUE_STOP_TIMEOUT};
use std::fmt;
use std::io;

/// A command to `/dev/ublk-control` (`UBLK_U_CMD_*`), named as its failure is reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlCommand {
    AddDevice,
    GetDeviceInfo,
    SetParams,
    StartDevice,
    StopDevice,
    DeleteDevice,
    StartRecovery,
    EndRecovery,
}

#[derive(Debug, thiserror::Error)]
pub enum UblkError {
    /// `/dev/ublk-control` cannot be opened: the module is not loaded, or no permission.
    #[error("open {CONTROL_PATH}: {source} (is the ublk_drv module loaded? `modprobe ublk_drv`)")]
    OpenControl { source: io::Error },
    /// The control plane's io_uring (128-byte SQEs) could not be set up.
    #[error("{source}")]
    ControlRing { source: io::Error },
    /// The control ring had no free entry for the command (a command before it was never
    /// consumed by the kernel).
    #[error("{}", ControlFailure(*command, *dev_id, &"control ring full"))]
    ControlRingFull {
        command: ControlCommand,
        dev_id: u32,
    },
    /// The kernel answered a control command with `-errno` (or io_uring_enter failed with
    /// `errno` while submitting it). `dev_id` is `u32::MAX` for `AddDevice`.
    #[error("{}", ControlFailure(*command, *dev_id, &io::Error::from_raw_os_error(*errno)))]
    Control {
        command: ControlCommand,
        dev_id: u32,
        errno: i32,
    },
    /// `/dev/ublkcN`, the device's char device, did not appear or cannot be opened.
    #[error("open /dev/ublkc{dev_id}: {source}")]
    OpenCharDevice { dev_id: u32, source: io::Error },
    /// A core could not map the descriptor area of its queue.
    #[error("map the descriptors of queue {queue}: {source}")]
    MapDescriptors { queue: u16, source: io::Error },
    /// A core did not answer that its queue started within `QUEUE_START_TIMEOUT`.
    #[error("a core did not start its ublk queue within {} s", QUEUE_START_TIMEOUT.as_secs())]
    QueueStartTimeout,
    /// The cores still hold device `dev_id` after its stop, past `QUEUE_STOP_TIMEOUT`.
    #[error(
        "ublk device {dev_id}: queues did not stop within {} s",
        QUEUE_STOP_TIMEOUT.as_secs()
    )]
    QueueStopTimeout { dev_id: u32 },
    /// No volume of that name to serve.
    #[error("no volume named {volume:?}")]
    NoVolume { volume: String },
    /// The volume's attach policy refused it (one writing node per volume), saying why.
    #[error("{why}")]
    Refused { why: String },
    /// `remove` of a device this node does not serve.
    #[error("ublk device {dev_id} is not served by this node")]
    NotServed { dev_id: u32 },
    /// A device to take back is not quiesced (waiting for a server) but in this state.
    #[error("device state {state} (not waiting for a server)")]
    NotQuiesced { state: u16 },
    /// A device to take back has a queue count other than this torusd's core count.
    #[error("it has {queues} queues and this torusd runs {cores} cores")]
    QueueCountMismatch { queues: u16, cores: usize },
}

impl UblkError {
    /// The kernel's errno when a control command failed.
    pub fn errno(&self) -> Option<i32> {
        match self {
            UblkError::Control { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

/// How a failed control command reads: what was done, to which device, and why it failed.
struct ControlFailure<'a>(ControlCommand, u32, &'a dyn fmt::Display);

impl fmt::Display for ControlFailure<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ControlFailure(command, id, why) = self;
        match command {
            ControlCommand::AddDevice => write!(f, "add a ublk device: {why}"),
            ControlCommand::GetDeviceInfo => write!(f, "the kernel has no such device ({why})"),
            ControlCommand::SetParams => write!(f, "set the parameters of ublk device {id}: {why}"),
            ControlCommand::StartDevice => write!(f, "start ublk device {id}: {why}"),
            ControlCommand::StopDevice => write!(f, "stop ublk device {id}: {why}"),
            ControlCommand::DeleteDevice => write!(f, "delete ublk device {id}: {why}"),
            ControlCommand::StartRecovery => write!(f, "start recovery: {why}"),
            ControlCommand::EndRecovery => write!(f, "end recovery: {why}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_failures_read_as_before_the_error_type() {
        let e = UblkError::Control {
            command: ControlCommand::StopDevice,
            dev_id: 3,
            errno: libc::ENODEV,
        };
        assert_eq!(
            e.to_string(),
            "stop ublk device 3: No such device (os error 19)"
        );
        assert_eq!(e.errno(), Some(libc::ENODEV));
        let e = UblkError::Control {
            command: ControlCommand::AddDevice,
            dev_id: u32::MAX,
            errno: libc::EPERM,
        };
        assert_eq!(
            e.to_string(),
            "add a ublk device: Operation not permitted (os error 1)"
        );
        let e = UblkError::ControlRingFull {
            command: ControlCommand::EndRecovery,
            dev_id: 3,
        };
        assert_eq!(e.to_string(), "end recovery: control ring full");
        assert_eq!(e.errno(), None);
    }

    #[test]
    fn the_open_failure_names_the_module_to_load() {
        let e = UblkError::OpenControl {
            source: io::Error::from_raw_os_error(libc::ENOENT),
        };
        assert_eq!(
            e.to_string(),
            "open /dev/ublk-control: No such file or directory (os error 2) \
             (is the ublk_drv module loaded? `modprobe ublk_drv`)"
        );
    }
}
