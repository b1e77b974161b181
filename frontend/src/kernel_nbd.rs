//! Attaching the kernel's NBD client to a torus volume through generic netlink (the `nbd`
//! family of `linux/nbd-netlink.h`), as Torus's `torusblk nbd` did: torus negotiates each
//! connection itself, then hands the sockets to the kernel with `NBD_CMD_CONNECT`.
//!
//! Reconnecting: the device is configured with a dead-connection timeout, during which the
//! kernel holds I/O when a connection dies instead of failing it. The kernel announces the
//! death on the `nbd_mc_group` multicast group (`NBD_CMD_LINK_DEAD`); a monitor process
//! listening there connects again and gives the kernel the new sockets
//! (`NBD_CMD_RECONFIGURE`), so a restarted torusd does not turn a filesystem read-only. The
//! same monitor asks the server for the volume's size every few seconds (`OPT_INFO`) and
//! announces a change to the kernel (`NBD_CMD_RECONFIGURE` with the new size).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const CTRL_ATTR_MCAST_GROUPS: u16 = 7;
const CTRL_ATTR_MCAST_GRP_NAME: u16 = 1;
const CTRL_ATTR_MCAST_GRP_ID: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLA_F_NESTED: u16 = 1 << 15;
const SOL_NETLINK: i32 = 270;
const NETLINK_ADD_MEMBERSHIP: i32 = 1;

pub const NBD_CMD_CONNECT: u8 = 1;
pub const NBD_CMD_DISCONNECT: u8 = 2;
pub const NBD_CMD_RECONFIGURE: u8 = 3;
pub const NBD_CMD_LINK_DEAD: u8 = 4;
pub const NBD_CMD_STATUS: u8 = 5;
const NBD_ATTR_INDEX: u16 = 1;
const NBD_ATTR_SIZE_BYTES: u16 = 2;
const NBD_ATTR_BLOCK_SIZE_BYTES: u16 = 3;
const NBD_ATTR_TIMEOUT: u16 = 4;
const NBD_ATTR_SERVER_FLAGS: u16 = 5;
const NBD_ATTR_SOCKETS: u16 = 7;
const NBD_ATTR_DEAD_CONN_TIMEOUT: u16 = 8;
const NBD_ATTR_DEVICE_LIST: u16 = 9;
const NBD_ATTR_BACKEND_IDENTIFIER: u16 = 10;
const NBD_DEVICE_INDEX: u16 = 1;
const NBD_DEVICE_CONNECTED: u16 = 2;
const NBD_SOCK_ITEM: u16 = 1;
const NBD_SOCK_FD: u16 = 1;

/// A generic netlink message being built: attributes, nested ones, then `send`.
pub struct Msg {
    buf: Vec<u8>,
    nests: Vec<usize>,
}

impl Msg {
    fn new(family: u16, cmd: u8, flags: u16) -> Msg {
        let mut buf = vec![0u8; 20];
        buf[4..6].copy_from_slice(&family.to_ne_bytes());
        buf[6..8].copy_from_slice(&flags.to_ne_bytes());
        buf[16] = cmd;
        buf[17] = 1; // version
        Msg {
            buf,
            nests: Vec::new(),
        }
    }
    fn attr(&mut self, kind: u16, payload: &[u8]) -> &mut Msg {
        let len = 4 + payload.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
        self
    }
    fn u32(&mut self, kind: u16, v: u32) -> &mut Msg {
        self.attr(kind, &v.to_ne_bytes())
    }
    fn u64(&mut self, kind: u16, v: u64) -> &mut Msg {
        self.attr(kind, &v.to_ne_bytes())
    }
    fn begin(&mut self, kind: u16) -> &mut Msg {
        self.nests.push(self.buf.len());
        self.attr(kind | NLA_F_NESTED, &[])
    }
    fn end(&mut self) -> &mut Msg {
        let at = self.nests.pop().expect("nested attribute open");
        let len = (self.buf.len() - at) as u16;
        self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
        self
    }
    fn finish(&mut self, seq: u32) -> &[u8] {
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf[8..12].copy_from_slice(&seq.to_ne_bytes());
        &self.buf
    }
}

/// Attributes of a received message: (type without flags, payload).
fn attrs(mut data: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while data.len() >= 4 {
        let len = u16::from_ne_bytes([data[0], data[1]]) as usize;
        let kind = u16::from_ne_bytes([data[2], data[3]]) & 0x3fff;
        if len < 4 || len > data.len() {
            break;
        }
        out.push((kind, &data[4..len]));
        data = &data[len.next_multiple_of(4).min(data.len())..];
    }
    out
}

fn as_u32(p: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(p.get(..4)?.try_into().ok()?))
}

/// A generic netlink socket bound to the `nbd` family.
pub struct Netlink {
    fd: OwnedFd,
    family: u16,
    mcast_group: Option<u32>,
    seq: u32,
}

/// One message received: its netlink type and sequence, genl command and attributes
/// (owned), and for an NLMSG_ERROR the error (0 for an ack).
pub struct Received {
    pub kind: u16,
    pub seq: u32,
    pub cmd: u8,
    pub attrs: Vec<(u16, Vec<u8>)>,
    pub error: i32,
}

impl Netlink {
    pub fn open() -> io::Result<Netlink> {
        // SAFETY: plain socket syscall; the fd is owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_GENERIC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just created and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut nl = Netlink {
            fd,
            family: 0,
            mcast_group: None,
            seq: 1,
        };
        let mut m = Msg::new(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, NLM_F_REQUEST | NLM_F_ACK);
        m.attr(CTRL_ATTR_FAMILY_NAME, b"nbd\0");
        let replies = nl.request(&mut m).map_err(|e| {
            if e.raw_os_error() == Some(libc::ENOENT) {
                io::Error::new(
                    e.kind(),
                    "the kernel has no NBD driver (generic netlink family \"nbd\" not found): `modprobe nbd`",
                )
            } else {
                e
            }
        })?;
        for r in replies {
            for (kind, p) in &r.attrs {
                match *kind {
                    CTRL_ATTR_FAMILY_ID if p.len() >= 2 => {
                        nl.family = u16::from_ne_bytes([p[0], p[1]])
                    }
                    CTRL_ATTR_MCAST_GROUPS => {
                        for (_, group) in attrs(p) {
                            let g = attrs(group);
                            let name = g.iter().find(|a| a.0 == CTRL_ATTR_MCAST_GRP_NAME);
                            let id = g.iter().find(|a| a.0 == CTRL_ATTR_MCAST_GRP_ID);
                            if let (Some(n), Some(id)) = (name, id) {
                                if n.1.starts_with(b"nbd_mc_group") {
                                    nl.mcast_group = as_u32(id.1);
                                }
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        if nl.family == 0 {
            return Err(io::Error::other("netlink: no id for the nbd family"));
        }
        Ok(nl)
    }

    fn send(&mut self, m: &mut Msg) -> io::Result<u32> {
        self.seq += 1;
        let seq = self.seq;
        let bytes = m.finish(seq);
        // SAFETY: sending a buffer we own; the kernel address is zeroed (pid 0).
        let n = unsafe {
            let mut addr: libc::sockaddr_nl = std::mem::zeroed();
            addr.nl_family = libc::AF_NETLINK as u16;
            libc::sendto(
                self.fd.as_raw_fd(),
                bytes.as_ptr() as *const libc::c_void,
                bytes.len(),
                0,
                &addr as *const libc::sockaddr_nl as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(seq)
    }

    /// Receives one datagram and splits it into messages; None on timeout.
    fn recv(&mut self, timeout: Option<Duration>) -> io::Result<Option<Vec<Received>>> {
        if let Some(t) = timeout {
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd we own.
            let r = unsafe { libc::poll(&mut pfd, 1, t.as_millis() as i32) };
            if r == 0 {
                return Ok(None);
            }
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EINTR) {
                    return Ok(None);
                }
                return Err(e);
            }
        }
        let mut buf = vec![0u8; 64 * 1024];
        // SAFETY: receiving into a buffer we own.
        let n = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                0,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut data = &buf[..n as usize];
        let mut out = Vec::new();
        while data.len() >= 16 {
            let len = u32::from_ne_bytes(data[0..4].try_into().expect("4")) as usize;
            let kind = u16::from_ne_bytes([data[4], data[5]]);
            let seq = u32::from_ne_bytes(data[8..12].try_into().expect("4"));
            if len < 16 || len > data.len() {
                break;
            }
            let body = &data[16..len];
            let (cmd, error, attr_bytes): (u8, i32, &[u8]) = if kind == NLMSG_ERROR {
                (
                    0,
                    body.get(..4)
                        .and_then(|b| b.try_into().ok())
                        .map(i32::from_ne_bytes)
                        .unwrap_or(-libc::EIO),
                    &[],
                )
            } else if body.len() >= 4 {
                (body[0], 0, &body[4..])
            } else {
                (0, 0, &[])
            };
            let attrs = attrs(attr_bytes)
                .into_iter()
                .map(|(k, p)| (k, p.to_vec()))
                .collect();
            out.push(Received {
                kind,
                seq,
                cmd,
                attrs,
                error,
            });
            data = &data[len.next_multiple_of(4).min(data.len())..];
        }
        Ok(Some(out))
    }

    /// Sends a request with NLM_F_ACK; returns the replies before the ack, or the error.
    fn request(&mut self, m: &mut Msg) -> io::Result<Vec<Received>> {
        let seq = self.send(m)?;
        let mut replies = Vec::new();
        loop {
            let Some(batch) = self.recv(Some(Duration::from_secs(30)))? else {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "netlink: no answer from the kernel in 30 s",
                ));
            };
            for r in batch {
                if r.seq != seq {
                    continue; // a multicast message or an old answer
                }
                match r.kind {
                    NLMSG_ERROR if r.error == 0 => return Ok(replies),
                    NLMSG_ERROR => return Err(io::Error::from_raw_os_error(-r.error)),
                    NLMSG_DONE => return Ok(replies),
                    _ => replies.push(r),
                }
            }
        }
    }

    fn msg(&self, cmd: u8) -> Msg {
        Msg::new(self.family, cmd, NLM_F_REQUEST | NLM_F_ACK)
    }

    /// Connects device `index` (None: any free one) to already negotiated sockets; returns
    /// the device index.
    pub fn connect(
        &mut self,
        index: Option<u32>,
        cfg: &DeviceConfig,
        sockets: &[RawFd],
    ) -> io::Result<u32> {
        let mut m = self.msg(NBD_CMD_CONNECT);
        if let Some(i) = index {
            m.u32(NBD_ATTR_INDEX, i);
        }
        m.u64(NBD_ATTR_SIZE_BYTES, cfg.size)
            .u64(NBD_ATTR_BLOCK_SIZE_BYTES, cfg.block_size)
            .u64(NBD_ATTR_SERVER_FLAGS, cfg.flags as u64)
            .u64(NBD_ATTR_TIMEOUT, cfg.timeout.as_secs())
            .u64(NBD_ATTR_DEAD_CONN_TIMEOUT, cfg.dead_conn_timeout.as_secs());
        m.attr(NBD_ATTR_BACKEND_IDENTIFIER, &nul_terminated(&cfg.backend));
        sockets_attr(&mut m, sockets);
        let replies = self.request(&mut m)?;
        replies
            .iter()
            .flat_map(|r| r.attrs.iter())
            .find(|a| a.0 == NBD_ATTR_INDEX)
            .and_then(|a| as_u32(&a.1))
            .or(index)
            .ok_or_else(|| io::Error::other("the kernel connected a device but did not say which"))
    }

    /// Gives device `index` new sockets in place of dead ones; `backend` must be the one
    /// the device was connected with (the kernel refuses otherwise).
    pub fn reconfigure(&mut self, index: u32, backend: &str, sockets: &[RawFd]) -> io::Result<()> {
        let mut m = self.msg(NBD_CMD_RECONFIGURE);
        m.u32(NBD_ATTR_INDEX, index);
        m.attr(NBD_ATTR_BACKEND_IDENTIFIER, &nul_terminated(backend));
        sockets_attr(&mut m, sockets);
        self.request(&mut m).map(drop)
    }

    /// Announces a new size of device `index` (the volume grew or shrank).
    pub fn resize(&mut self, index: u32, backend: &str, size: u64) -> io::Result<()> {
        let mut m = self.msg(NBD_CMD_RECONFIGURE);
        m.u32(NBD_ATTR_INDEX, index);
        m.attr(NBD_ATTR_BACKEND_IDENTIFIER, &nul_terminated(backend));
        m.u64(NBD_ATTR_SIZE_BYTES, size);
        self.request(&mut m).map(drop)
    }

    pub fn disconnect(&mut self, index: u32) -> io::Result<()> {
        let mut m = self.msg(NBD_CMD_DISCONNECT);
        m.u32(NBD_ATTR_INDEX, index);
        self.request(&mut m).map(drop)
    }

    /// Whether device `index` is connected (None: the kernel has no such device).
    pub fn connected(&mut self, index: u32) -> io::Result<Option<bool>> {
        let mut m = self.msg(NBD_CMD_STATUS);
        m.u32(NBD_ATTR_INDEX, index);
        let replies = match self.request(&mut m) {
            Ok(r) => r,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(None),
            Err(e) => return Err(e),
        };
        for r in &replies {
            for (kind, p) in &r.attrs {
                if *kind != NBD_ATTR_DEVICE_LIST {
                    continue;
                }
                for (_, item) in attrs(p) {
                    let a = attrs(item);
                    let i = a
                        .iter()
                        .find(|x| x.0 == NBD_DEVICE_INDEX)
                        .and_then(|x| as_u32(x.1));
                    let c = a
                        .iter()
                        .find(|x| x.0 == NBD_DEVICE_CONNECTED)
                        .and_then(|x| x.1.first());
                    if i == Some(index) {
                        return Ok(Some(c.copied().unwrap_or(0) != 0));
                    }
                }
            }
        }
        Ok(None)
    }

    /// Joins the multicast group on which the kernel announces dead links.
    pub fn subscribe(&mut self) -> io::Result<()> {
        let group = self
            .mcast_group
            .ok_or_else(|| io::Error::other("the nbd family has no multicast group"))?;
        // SAFETY: setsockopt with a u32 we own.
        let r = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                SOL_NETLINK,
                NETLINK_ADD_MEMBERSHIP,
                &group as *const u32 as *const libc::c_void,
                4,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits up to `timeout` for a dead-link announcement; returns the device indexes named.
    pub fn dead_links(&mut self, timeout: Duration) -> io::Result<Vec<u32>> {
        let mut out = Vec::new();
        if let Some(batch) = self.recv(Some(timeout))? {
            for r in batch {
                if r.kind == self.family && r.cmd == NBD_CMD_LINK_DEAD {
                    out.extend(
                        r.attrs
                            .iter()
                            .filter(|a| a.0 == NBD_ATTR_INDEX)
                            .filter_map(|a| as_u32(&a.1)),
                    );
                }
            }
        }
        Ok(out)
    }
}

fn nul_terminated(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

fn sockets_attr(m: &mut Msg, sockets: &[RawFd]) {
    m.begin(NBD_ATTR_SOCKETS);
    for fd in sockets {
        m.begin(NBD_SOCK_ITEM);
        m.u32(NBD_SOCK_FD, *fd as u32);
        m.end();
    }
    m.end();
}

/// How a device is set up.
pub struct DeviceConfig {
    pub size: u64,
    pub block_size: u64,
    pub flags: u16,
    /// A request not answered in this long makes the kernel drop the connection and requeue.
    pub timeout: Duration,
    /// How long I/O waits for a dead connection to be replaced before it fails.
    pub dead_conn_timeout: Duration,
    /// Shown in /sys/block/nbdN/backend.
    pub backend: String,
}

/// `/dev/nbd3` → 3.
pub fn device_index(path: &str) -> Option<u32> {
    path.trim_start_matches("/dev/")
        .strip_prefix("nbd")?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_attributes_are_measured_and_parsed_back() {
        let mut m = Msg::new(30, NBD_CMD_CONNECT, NLM_F_REQUEST);
        m.u64(NBD_ATTR_SIZE_BYTES, 1 << 30);
        sockets_attr(&mut m, &[5, 6]);
        let bytes = m.finish(7).to_vec();
        assert_eq!(
            u32::from_ne_bytes(bytes[0..4].try_into().unwrap()) as usize,
            bytes.len()
        );
        let a = attrs(&bytes[20..]);
        assert_eq!(a.len(), 2);
        assert_eq!(a[0].0, NBD_ATTR_SIZE_BYTES);
        assert_eq!(a[1].0, NBD_ATTR_SOCKETS);
        let items = attrs(a[1].1);
        assert_eq!(items.len(), 2);
        let fd = attrs(items[1].1);
        assert_eq!(as_u32(fd[0].1), Some(6));
        // A lying length ends the parse rather than reading past the buffer.
        assert!(attrs(&[200, 0, 1, 0, 0, 0]).is_empty());
    }

    #[test]
    fn device_paths() {
        assert_eq!(device_index("/dev/nbd12"), Some(12));
        assert_eq!(device_index("nbd0"), Some(0));
        assert_eq!(device_index("/dev/sda"), None);
    }
}
