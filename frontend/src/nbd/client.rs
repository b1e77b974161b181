//! The client side of the fixed newstyle handshake, enough to hand a negotiated socket to
//! the kernel's NBD client (`torusblk nbd`): `OPT_GO` for one export, simple replies only (the
//! kernel speaks neither structured replies nor extended headers).

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
    let name = export.as_bytes();
    let mut out = Vec::with_capacity(32 + name.len());
    out.extend_from_slice(&cflags.to_be_bytes());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&OPT_GO.to_be_bytes());
    out.extend_from_slice(&(4 + name.len() as u32 + 2).to_be_bytes());
    out.extend_from_slice(&(name.len() as u32).to_be_bytes());
    out.extend_from_slice(name);
    out.extend_from_slice(&0u16.to_be_bytes()); // no information requests
    s.write_all(&out)?;
    let mut info = None;
    loop {
        if read_u64(s)? != OPTION_REPLY_MAGIC {
            return Err(bad("bad option reply magic"));
        }
        let option = read_u32(s)?;
        let kind = read_u32(s)?;
        let len = read_u32(s)?;
        if option != OPT_GO {
            return Err(bad(format!("reply to option {option}, not OPT_GO")));
        }
        if len > 64 * 1024 {
            return Err(bad(format!("option reply of {len} bytes")));
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data)?;
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
    info.ok_or_else(|| bad("server acknowledged OPT_GO without export information"))
}

/// An NBD server address: `HOST:PORT` over TCP, or a Unix socket path (anything with a `/`).
pub enum Address {
    Tcp(String),
    Unix(std::path::PathBuf),
}

impl Address {
    pub fn parse(s: &str) -> Address {
        if s.contains('/') {
            Address::Unix(s.into())
        } else {
            Address::Tcp(s.to_owned())
        }
    }

    /// Connects and negotiates; returns the socket, ready for transmission.
    pub fn open(&self, export: &str) -> io::Result<(std::os::fd::OwnedFd, ExportInfo)> {
        match self {
            Address::Tcp(a) => {
                let addr = std::net::ToSocketAddrs::to_socket_addrs(a)?
                    .next()
                    .ok_or_else(|| bad(format!("{a}: no address")))?;
                let mut s = std::net::TcpStream::connect_timeout(&addr, STEP_TIMEOUT)
                    .map_err(|e| io::Error::new(e.kind(), format!("connect to {a}: {e}")))?;
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(STEP_TIMEOUT))?;
                let info = negotiate(&mut s, export)?;
                s.set_read_timeout(None)?;
                Ok((s.into(), info))
            }
            Address::Unix(p) => {
                let mut s = std::os::unix::net::UnixStream::connect(p).map_err(|e| {
                    io::Error::new(e.kind(), format!("connect to {}: {e}", p.display()))
                })?;
                s.set_read_timeout(Some(STEP_TIMEOUT))?;
                let info = negotiate(&mut s, export)?;
                s.set_read_timeout(None)?;
                Ok((s.into(), info))
            }
        }
    }
}
