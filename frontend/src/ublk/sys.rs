//! The ublk UAPI (`include/uapi/linux/ublk_cmd.h`), written out for the parts torus uses.
//!
//! Commands are sent with the ioctl encoding (`UBLK_F_CMD_IOCTL_ENCODE`), which every kernel
//! since 6.4 accepts; the control commands need 128-byte SQEs (the 32-byte control command
//! lives in the SQE's command area), the I/O commands fit in a plain 64-byte SQE.

/// `_IOC(dir, 'u', nr, size)`.
const fn ioc(dir: u32, nr: u32, size: u32) -> u32 {
    dir << 30 | size << 16 | (b'u' as u32) << 8 | nr
}
const IOC_READ: u32 = 2;
const IOC_RW: u32 = 3;
const CTRL: u32 = std::mem::size_of::<CtrlCmd>() as u32;
const IO: u32 = std::mem::size_of::<IoCmd>() as u32;

pub const CMD_GET_DEV_INFO: u32 = ioc(IOC_READ, 0x02, CTRL);
pub const CMD_ADD_DEV: u32 = ioc(IOC_RW, 0x04, CTRL);
pub const CMD_DEL_DEV: u32 = ioc(IOC_RW, 0x05, CTRL);
pub const CMD_START_DEV: u32 = ioc(IOC_RW, 0x06, CTRL);
pub const CMD_STOP_DEV: u32 = ioc(IOC_RW, 0x07, CTRL);
pub const CMD_SET_PARAMS: u32 = ioc(IOC_RW, 0x08, CTRL);
pub const CMD_START_USER_RECOVERY: u32 = ioc(IOC_RW, 0x10, CTRL);
pub const CMD_END_USER_RECOVERY: u32 = ioc(IOC_RW, 0x11, CTRL);

pub const IO_FETCH_REQ: u32 = ioc(IOC_RW, 0x20, IO);
pub const IO_COMMIT_AND_FETCH_REQ: u32 = ioc(IOC_RW, 0x21, IO);

/// Result of an I/O command when the device is going away: do not fetch again.
pub const IO_RES_ABORT: i32 = -libc::ENODEV;

/// Offset of queue `q`'s descriptor array in the char device's mmap space: the kernel spaces
/// queues by the largest possible array, `UBLK_MAX_QUEUE_DEPTH` descriptors rounded to pages.
pub fn desc_offset(q: u16) -> i64 {
    let max = (MAX_QUEUE_DEPTH * std::mem::size_of::<IoDesc>()).next_multiple_of(page_size());
    (q as usize * max) as i64
}
pub const MAX_QUEUE_DEPTH: usize = 4096;

pub fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
}

pub const F_USER_RECOVERY: u64 = 1 << 3;
pub const F_USER_RECOVERY_REISSUE: u64 = 1 << 4;
pub const F_CMD_IOCTL_ENCODE: u64 = 1 << 6;

pub const S_DEV_DEAD: u16 = 0;
pub const S_DEV_LIVE: u16 = 1;
pub const S_DEV_QUIESCED: u16 = 2;

pub const OP_READ: u8 = 0;
pub const OP_WRITE: u8 = 1;
pub const OP_FLUSH: u8 = 2;
pub const OP_DISCARD: u8 = 3;
pub const OP_WRITE_ZEROES: u8 = 5;
pub const IO_F_FUA: u32 = 1 << 13;

pub const ATTR_VOLATILE_CACHE: u32 = 1 << 2;
pub const ATTR_FUA: u32 = 1 << 3;
pub const PARAM_TYPE_BASIC: u32 = 1 << 0;
pub const PARAM_TYPE_DISCARD: u32 = 1 << 1;

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct CtrlCmd {
    pub dev_id: u32,
    pub queue_id: u16,
    pub len: u16,
    pub addr: u64,
    pub data: [u64; 2],
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct DevInfo {
    pub nr_hw_queues: u16,
    pub queue_depth: u16,
    pub state: u16,
    pub pad0: u16,
    pub max_io_buf_bytes: u32,
    pub dev_id: u32,
    pub ublksrv_pid: i32,
    pub pad1: u32,
    pub flags: u64,
    pub ublksrv_flags: u64,
    pub owner_uid: u32,
    pub owner_gid: u32,
    pub reserved1: u64,
    pub reserved2: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct IoDesc {
    pub op_flags: u32,
    pub nr_sectors: u32,
    pub start_sector: u64,
    pub addr: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct IoCmd {
    pub q_id: u16,
    pub tag: u16,
    pub result: i32,
    pub addr: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct ParamBasic {
    pub attrs: u32,
    pub logical_bs_shift: u8,
    pub physical_bs_shift: u8,
    pub io_opt_shift: u8,
    pub io_min_shift: u8,
    pub max_sectors: u32,
    pub chunk_sectors: u32,
    pub dev_sectors: u64,
    pub virt_boundary_mask: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct ParamDiscard {
    pub discard_alignment: u32,
    pub discard_granularity: u32,
    pub max_discard_sectors: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_discard_segments: u16,
    pub reserved0: u16,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct Params {
    pub len: u32,
    pub types: u32,
    pub basic: ParamBasic,
    pub discard: ParamDiscard,
}

/// The bytes of a plain-data struct, for an SQE's command area.
pub fn bytes_of<T: Copy, const N: usize>(value: &T) -> [u8; N] {
    let mut out = [0u8; N];
    let size = std::mem::size_of::<T>();
    assert!(size <= N);
    // SAFETY: T is plain data (repr(C), Copy) and `size` bytes fit in `out`.
    unsafe {
        std::ptr::copy_nonoverlapping(value as *const T as *const u8, out.as_mut_ptr(), size)
    };
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_match_the_kernel() {
        assert_eq!(std::mem::size_of::<CtrlCmd>(), 32);
        assert_eq!(std::mem::size_of::<DevInfo>(), 64);
        assert_eq!(std::mem::size_of::<IoDesc>(), 24);
        assert_eq!(std::mem::size_of::<IoCmd>(), 16);
        assert_eq!(std::mem::size_of::<ParamBasic>(), 32);
        assert_eq!(std::mem::size_of::<ParamDiscard>(), 20);
        // Values from the kernel header's _IOWR('u', 0x04, struct ublksrv_ctrl_cmd) etc.
        assert_eq!(CMD_ADD_DEV, 0xc020_7504);
        assert_eq!(CMD_GET_DEV_INFO, 0x8020_7502);
        assert_eq!(IO_FETCH_REQ, 0xc010_7520);
        assert_eq!(IO_COMMIT_AND_FETCH_REQ, 0xc010_7521);
        assert_eq!(desc_offset(1), 98304);
    }
}
