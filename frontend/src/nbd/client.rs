//! The client side of NBD. `negotiate` does the fixed newstyle handshake with simple replies
//! only, to hand the socket to the kernel's NBD client (`torusblk nbd`; the kernel speaks
//! neither structured replies nor extended headers). `Session` also negotiates structured
//! replies and `base:allocation`, and runs one request at a time: READ, WRITE, FLUSH and
//! BLOCK_STATUS, for `torusctl dump` and `load`.

use super::protocol::*;
use std::io::{self, Read, Write};
use std::time::Duration;

/// What the server said about the export.
#[derive(Debug, Clone, Copy)]
pub struct ExportInfo {
    pub size: u64,
    pub flags: u16,
}

/// How long each step of the handshake may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn read_u16(s: &mut impl Read) -> io::Result<u16> {
    let mut b = [0; 2];
    s.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}
fn read_u32(s: &mut impl Read) -> io::Result<u32> {
    let mut b = [0; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}
fn read_u64(s: &mut impl Read) -> io::Result<u64> {
    let mut b = [0; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

/// Negotiates `export` on a connected stream; on success the stream is in the transmission
/// phase.
pub fn negotiate<S: Read + Write>(s: &mut S, export: &str) -> io::Result<ExportInfo> {
    negotiate_with(s, export, false).map(|(info, _)| info)
}

fn send_option(s: &mut impl Write, option: u32, data: &[u8]) -> io::Result<()> {
    let mut out = Vec::with_capacity(16 + data.len());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    s.write_all(&out)
}

/// One option reply: (option, reply type, data).
fn read_option_reply(s: &mut impl Read) -> io::Result<(u32, u32, Vec<u8>)> {
    if read_u64(s)? != OPTION_REPLY_MAGIC {
        return Err(bad("bad option reply magic"));
    }
    let option = read_u32(s)?;
    let kind = read_u32(s)?;
    let len = read_u32(s)?;
    if len > 64 * 1024 {
        return Err(bad(format!("option reply of {len} bytes")));
    }
    let mut data = vec![0u8; len as usize];
    s.read_exact(&mut data)?;
    Ok((option, kind, data))
}

/// The handshake; with `structured`, also structured replies and the `base:allocation`
/// context (its id is returned).
fn negotiate_with<S: Read + Write>(
    s: &mut S,
    export: &str,
    structured: bool,
) -> io::Result<(ExportInfo, Option<u32>)> {
    if read_u64(s)? != NBDMAGIC || read_u64(s)? != IHAVEOPT {
        return Err(bad("not an NBD server (no newstyle greeting)"));
    }
    let hflags = read_u16(s)?;
    if hflags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(bad("server does not speak fixed newstyle"));
    }
    let mut cflags = CLIENT_FIXED_NEWSTYLE;
    if hflags & FLAG_NO_ZEROES != 0 {
        cflags |= CLIENT_NO_ZEROES;
    }
    s.write_all(&cflags.to_be_bytes())?;
    let name = export.as_bytes();
    let mut meta = None;
    if structured {
        send_option(s, OPT_STRUCTURED_REPLY, &[])?;
        let (_, kind, _) = read_option_reply(s)?;
        if kind != REP_ACK {
            return Err(bad("server refused structured replies"));
        }
        let mut q = Vec::new();
        q.extend_from_slice(&(name.len() as u32).to_be_bytes());
        q.extend_from_slice(name);
        q.extend_from_slice(&1u32.to_be_bytes());
        q.extend_from_slice(&(META_CONTEXT_ALLOCATION.len() as u32).to_be_bytes());
        q.extend_from_slice(META_CONTEXT_ALLOCATION.as_bytes());
        send_option(s, OPT_SET_META_CONTEXT, &q)?;
        loop {
            let (_, kind, data) = read_option_reply(s)?;
            match kind {
                REP_META_CONTEXT if data.len() >= 4 => {
                    meta = Some(u32::from_be_bytes(data[0..4].try_into().expect("4 bytes")))
                }
                REP_ACK => break,
                _ => {} // an error here only means no allocation map: holes are read as data
            }
        }
    }
    let mut go = Vec::with_capacity(8 + name.len());
    go.extend_from_slice(&(name.len() as u32).to_be_bytes());
    go.extend_from_slice(name);
    go.extend_from_slice(&0u16.to_be_bytes()); // no information requests
    send_option(s, OPT_GO, &go)?;
    let mut info = None;
    loop {
        let (option, kind, data) = read_option_reply(s)?;
        if option != OPT_GO {
            return Err(bad(format!("reply to option {option}, not OPT_GO")));
        }
        match kind {
            REP_ACK => break,
            REP_INFO if data.len() >= 2 => {
                let t = u16::from_be_bytes([data[0], data[1]]);
                if t == INFO_EXPORT && data.len() == 12 {
                    info = Some(ExportInfo {
                        size: u64::from_be_bytes(data[2..10].try_into().expect("8 bytes")),
                        flags: u16::from_be_bytes([data[10], data[11]]),
                    });
                }
            }
            k if k & (1 << 31) != 0 => {
                let why = String::from_utf8_lossy(&data).into_owned();
                let what = match k {
                    REP_ERR_UNKNOWN => "no such export",
                    REP_ERR_POLICY => "refused",
                    REP_ERR_SHUTDOWN => "server shutting down",
                    _ => "error",
                };
                return Err(io::Error::other(format!(
                    "export {export:?}: {what}{}{why}",
                    if why.is_empty() { "" } else { ": " }
                )));
            }
            _ => {}
        }
    }
    let info = info.ok_or_else(|| bad("server acknowledged OPT_GO without export information"))?;
    Ok((info, meta))
}

/// A TCP or Unix stream.
pub enum Stream {
    Tcp(std::net::TcpStream),
    Unix(std::os::unix::net::UnixStream),
}

impl Stream {
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(b),
            Stream::Unix(s) => s.read(b),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(b),
            Stream::Unix(s) => s.write(b),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A client connection in the transmission phase, one request at a time.
pub struct Session {
    s: Stream,
    pub info: ExportInfo,
    /// The id of `base:allocation`, when the server gave it.
    meta: Option<u32>,
    cookie: u64,
}

impl Session {
    fn request(
        &mut self,
        command: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> io::Result<u64> {
        self.cookie += 1;
        let h = RequestHeader {
            magic: REQUEST_MAGIC,
            flags: 0,
            command,
            cookie: self.cookie,
            offset,
            length,
        };
        let mut out = Vec::with_capacity(REQUEST_HEADER_SIZE + payload.len());
        out.extend_from_slice(&h.encode());
        out.extend_from_slice(payload);
        self.s.write_all(&out)?;
        Ok(self.cookie)
    }

    /// Reads reply chunks for `cookie` until the last; `chunk(type, payload)` sees each
    /// structured chunk (simple replies have none).
    fn replies(
        &mut self,
        cookie: u64,
        mut chunk: impl FnMut(u16, &[u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        loop {
            let magic = read_u32(&mut self.s)?;
            match magic {
                SIMPLE_REPLY_MAGIC => {
                    let error = read_u32(&mut self.s)?;
                    let c = read_u64(&mut self.s)?;
                    if c != cookie {
                        return Err(bad("reply to another request"));
                    }
                    return match error {
                        0 => Ok(()),
                        e => Err(io::Error::from_raw_os_error(e as i32)),
                    };
                }
                STRUCTURED_REPLY_MAGIC => {
                    let flags = read_u16(&mut self.s)?;
                    let kind = read_u16(&mut self.s)?;
                    let c = read_u64(&mut self.s)?;
                    let len = read_u32(&mut self.s)?;
                    if c != cookie {
                        return Err(bad("reply to another request"));
                    }
                    if len > PAYLOAD_MAX + 64 {
                        return Err(bad(format!("reply chunk of {len} bytes")));
                    }
                    let mut data = vec![0u8; len as usize];
                    self.s.read_exact(&mut data)?;
                    if kind & (1 << 15) != 0 {
                        let e = data
                            .get(..4)
                            .map(|b| u32::from_be_bytes(b.try_into().expect("4")));
                        let msg = data
                            .get(6..)
                            .map(String::from_utf8_lossy)
                            .unwrap_or_default();
                        let e = io::Error::from_raw_os_error(e.unwrap_or(EIO) as i32);
                        return Err(io::Error::new(
                            e.kind(),
                            format!("{e}{}{msg}", if msg.is_empty() { "" } else { ": " }),
                        ));
                    }
                    chunk(kind, &data)?;
                    if flags & REPLY_FLAG_DONE != 0 {
                        return Ok(());
                    }
                }
                m => return Err(bad(format!("bad reply magic {m:#x}"))),
            }
        }
    }

    /// Reads `buf.len()` bytes at `offset` (at most 32 MiB).
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let cookie = self.request(CMD_READ, offset, buf.len() as u32, &[])?;
        if self.meta.is_none() {
            // Simple replies: the data follows the reply header.
            self.replies(cookie, |_, _| Ok(()))?;
            return self.s.read_exact(buf);
        }
        self.replies(cookie, |kind, data| {
            let at = data
                .get(..8)
                .map(|b| u64::from_be_bytes(b.try_into().expect("8")));
            let Some(at) = at.filter(|a| *a >= offset) else {
                return if kind == REPLY_TYPE_NONE {
                    Ok(())
                } else {
                    Err(bad("chunk without offset"))
                };
            };
            let rel = (at - offset) as usize;
            match kind {
                REPLY_TYPE_OFFSET_DATA => {
                    let d = &data[8..];
                    buf.get_mut(rel..rel + d.len())
                        .ok_or_else(|| bad("data chunk past the request"))?
                        .copy_from_slice(d);
                }
                2 => {
                    // OFFSET_HOLE
                    let n = data
                        .get(8..12)
                        .map(|b| u32::from_be_bytes(b.try_into().expect("4")) as usize)
                        .unwrap_or(0);
                    buf.get_mut(rel..rel + n)
                        .ok_or_else(|| bad("hole past the request"))?
                        .fill(0);
                }
                _ => {}
            }
            Ok(())
        })
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        let cookie = self.request(CMD_WRITE, offset, data.len() as u32, data)?;
        self.replies(cookie, |_, _| Ok(()))
    }

    pub fn flush(&mut self) -> io::Result<()> {
        let cookie = self.request(CMD_FLUSH, 0, 0, &[])?;
        self.replies(cookie, |_, _| Ok(()))
    }

    /// Extents (length, holds data) covering [offset, offset+length) from `base:allocation`;
    /// the server may answer for less than asked. Without the context: one data extent.
    pub fn allocation(&mut self, offset: u64, length: u32) -> io::Result<Vec<(u64, bool)>> {
        let Some(id) = self.meta else {
            return Ok(vec![(length as u64, true)]);
        };
        let cookie = self.request(CMD_BLOCK_STATUS, offset, length, &[])?;
        let mut out = Vec::new();
        self.replies(cookie, |kind, data| {
            if kind == REPLY_TYPE_BLOCK_STATUS
                && data.len() >= 4
                && u32::from_be_bytes(data[..4].try_into().expect("4")) == id
            {
                for d in data[4..].chunks_exact(8) {
                    let len = u32::from_be_bytes(d[..4].try_into().expect("4")) as u64;
                    let flags = u32::from_be_bytes(d[4..].try_into().expect("4"));
                    out.push((len, flags & STATE_HOLE == 0));
                }
            }
            Ok(())
        })?;
        if out.is_empty() || out.iter().any(|e| e.0 == 0) {
            return Err(bad("empty block status answer"));
        }
        Ok(out)
    }

    /// Ends the session politely (NBD_CMD_DISC).
    pub fn close(mut self) {
        let _ = self.request(CMD_DISC, 0, 0, &[]);
    }
}

/// An NBD server address: `HOST:PORT` over TCP, or a Unix socket path (anything with a `/`).
pub enum Address {
    Tcp(String),
    Unix(std::path::PathBuf),
}

impl Address {
    /// The export's current size, asked with `OPT_INFO` (no attachment), then `OPT_ABORT`.
    pub fn probe_size(&self, export: &str) -> io::Result<u64> {
        let mut s = self.connect()?;
        if read_u64(&mut s)? != NBDMAGIC || read_u64(&mut s)? != IHAVEOPT {
            return Err(bad("not an NBD server"));
        }
        let hflags = read_u16(&mut s)?;
        let mut cflags = CLIENT_FIXED_NEWSTYLE;
        if hflags & FLAG_NO_ZEROES != 0 {
            cflags |= CLIENT_NO_ZEROES;
        }
        s.write_all(&cflags.to_be_bytes())?;
        let name = export.as_bytes();
        let mut q = Vec::with_capacity(8 + name.len());
        q.extend_from_slice(&(name.len() as u32).to_be_bytes());
        q.extend_from_slice(name);
        q.extend_from_slice(&0u16.to_be_bytes());
        send_option(&mut s, OPT_INFO, &q)?;
        let mut size = None;
        loop {
            let (_, kind, data) = read_option_reply(&mut s)?;
            match kind {
                REP_INFO if data.len() == 12 && data[..2] == INFO_EXPORT.to_be_bytes() => {
                    size = Some(u64::from_be_bytes(data[2..10].try_into().expect("8 bytes")));
                }
                REP_ACK => break,
                k if k & (1 << 31) != 0 => return Err(bad(format!("export {export:?} refused"))),
                _ => {}
            }
        }
        let _ = send_option(&mut s, OPT_ABORT, &[]);
        size.ok_or_else(|| bad("no export information"))
    }

    /// Connects and negotiates structured replies and `base:allocation` too.
    pub fn session(&self, export: &str) -> io::Result<Session> {
        let mut s = self.connect()?;
        let (info, meta) = negotiate_with(&mut s, export, true)?;
        // Requests of 32 MiB can take a while on a busy node; a dead one still ends the run.
        s.set_read_timeout(Some(Duration::from_secs(120)))?;
        Ok(Session {
            s,
            info,
            meta,
            cookie: 0,
        })
    }

    pub fn parse(s: &str) -> Address {
        if s.contains('/') {
            Address::Unix(s.into())
        } else {
            Address::Tcp(s.to_owned())
        }
    }

    /// Connects and negotiates; returns the socket, ready for transmission.
    pub fn open(&self, export: &str) -> io::Result<(std::os::fd::OwnedFd, ExportInfo)> {
        let mut s = self.connect()?;
        let info = negotiate(&mut s, export)?;
        s.set_read_timeout(None)?;
        let fd = match s {
            Stream::Tcp(t) => t.into(),
            Stream::Unix(u) => u.into(),
        };
        Ok((fd, info))
    }

    /// A connected stream with a per-step read timeout (TCP without Nagle's delay).
    fn connect(&self) -> io::Result<Stream> {
        match self {
            Address::Tcp(a) => {
                let addr = std::net::ToSocketAddrs::to_socket_addrs(a)?
                    .next()
                    .ok_or_else(|| bad(format!("{a}: no address")))?;
                let s = std::net::TcpStream::connect_timeout(&addr, STEP_TIMEOUT)
                    .map_err(|e| io::Error::new(e.kind(), format!("connect to {a}: {e}")))?;
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(STEP_TIMEOUT))?;
                Ok(Stream::Tcp(s))
            }
            Address::Unix(p) => {
                let s = std::os::unix::net::UnixStream::connect(p).map_err(|e| {
                    io::Error::new(e.kind(), format!("connect to {}: {e}", p.display()))
                })?;
                s.set_read_timeout(Some(STEP_TIMEOUT))?;
                Ok(Stream::Unix(s))
            }
        }
    }
}
