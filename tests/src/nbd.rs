//! A small blocking NBD client that speaks raw bytes, for tests that must send what real
//! clients never send (bad magic, wrong lengths) and for the durability test's own workload.
//! The wire constants are written out again here on purpose, from the NBD spec, not imported
//! from the server: a client that shares the server's constants cannot catch a wrong one.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_GO: u32 = 7;
pub const REP_ACK: u32 = 1;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;
pub const FLAG_FUA: u16 = 1;
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;

pub struct OptionReply {
    pub option: u32,
    pub kind: u32,
    pub data: Vec<u8>,
}

pub struct Client {
    pub s: TcpStream,
    pub size: u64,
    pub flags: u16,
}

pub fn read_u64(s: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

/// Reads the greeting and sends the client flags; returns the stream ready for options.
pub fn greet(s: &mut TcpStream, client_flags: u32) -> io::Result<u16> {
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    assert_eq!(read_u64(s)?, NBDMAGIC);
    assert_eq!(read_u64(s)?, IHAVEOPT);
    let mut f = [0u8; 2];
    s.read_exact(&mut f)?;
    s.write_all(&client_flags.to_be_bytes())?;
    Ok(u16::from_be_bytes(f))
}

pub fn send_option(s: &mut TcpStream, option: u32, data: &[u8]) -> io::Result<()> {
    let mut b = Vec::new();
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b)
}

pub fn read_option_reply(s: &mut TcpStream) -> io::Result<OptionReply> {
    assert_eq!(read_u64(s)?, REPLY_MAGIC, "option reply magic");
    let mut h = [0u8; 12];
    s.read_exact(&mut h)?;
    let len = u32::from_be_bytes(h[8..12].try_into().unwrap()) as usize;
    assert!(len < 1 << 20, "option reply of {len} bytes");
    let mut data = vec![0u8; len];
    s.read_exact(&mut data)?;
    Ok(OptionReply {
        option: u32::from_be_bytes(h[0..4].try_into().unwrap()),
        kind: u32::from_be_bytes(h[4..8].try_into().unwrap()),
        data,
    })
}

pub fn go_data(name: &str) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    d
}

/// One transmission request's bytes: header, then `payload`.
pub fn request(
    command: u16,
    flags: u16,
    cookie: u64,
    offset: u64,
    length: u32,
    payload: &[u8],
) -> Vec<u8> {
    let mut b = Vec::with_capacity(28 + payload.len());
    b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&command.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&offset.to_be_bytes());
    b.extend_from_slice(&length.to_be_bytes());
    b.extend_from_slice(payload);
    b
}

impl Client {
    /// Fixed newstyle, OPT_GO, simple replies.
    pub fn connect(port: u16, export: &str) -> io::Result<Client> {
        let mut s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_nodelay(true)?;
        greet(&mut s, 1 | 2)?;
        send_option(&mut s, OPT_GO, &go_data(export))?;
        let mut size = 0;
        let mut flags = 0;
        loop {
            let r = read_option_reply(&mut s)?;
            match r.kind {
                REP_ACK => break,
                3 if r.data.len() >= 12 && r.data[0..2] == [0, 0] => {
                    size = u64::from_be_bytes(r.data[2..10].try_into().unwrap());
                    flags = u16::from_be_bytes(r.data[10..12].try_into().unwrap());
                }
                3 => {}
                k => {
                    return Err(io::Error::other(format!(
                        "OPT_GO refused: {k:#x} {}",
                        String::from_utf8_lossy(&r.data)
                    )))
                }
            }
        }
        Ok(Client { s, size, flags })
    }

    pub fn send(
        &mut self,
        command: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> io::Result<()> {
        self.s
            .write_all(&request(command, flags, cookie, offset, length, payload))
    }

    /// Reads one simple reply header: (error, cookie).
    pub fn reply(&mut self) -> io::Result<(u32, u64)> {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h)?;
        let magic = u32::from_be_bytes(h[0..4].try_into().unwrap());
        if magic != SIMPLE_REPLY_MAGIC {
            return Err(io::Error::other(format!("reply magic {magic:#x}")));
        }
        Ok((
            u32::from_be_bytes(h[4..8].try_into().unwrap()),
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
        ))
    }

    pub fn write(&mut self, offset: u64, data: &[u8], flags: u16) -> io::Result<u32> {
        self.send(CMD_WRITE, flags, 1, offset, data.len() as u32, data)?;
        Ok(self.reply()?.0)
    }

    pub fn read(&mut self, offset: u64, len: u32) -> io::Result<Result<Vec<u8>, u32>> {
        self.send(CMD_READ, 0, 2, offset, len, &[])?;
        let (err, _) = self.reply()?;
        if err != 0 {
            return Ok(Err(err));
        }
        let mut v = vec![0u8; len as usize];
        self.s.read_exact(&mut v)?;
        Ok(Ok(v))
    }

    pub fn flush(&mut self) -> io::Result<u32> {
        self.send(CMD_FLUSH, 0, 3, 0, 0, &[])?;
        Ok(self.reply()?.0)
    }

    pub fn disconnect(mut self) {
        let _ = self.send(CMD_DISC, 0, 4, 0, 0, &[]);
    }
}
