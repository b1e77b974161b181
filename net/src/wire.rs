//! The node-to-node wire protocol over raw TCP.
//!
//! One connection per (sending node, receiving core): it carries requests one way and replies
//! the other. Everything travels in frames; a frame is a batch, so many writes to one peer
//! cost one frame, one checksum and one send.
//!
//! ```text
//! frame   = header(32) body(len)
//! header  = magic u32 "TRPF" | version u16 | reserved u16 | len u32 | count u32
//!           | body_crc u32 | reserved u64 | header_crc u32        (little endian)
//! body    = count × entry(48) | zero padding to a 4 KiB boundary (only when data follows)
//!           | the data of each entry, in order
//! entry   = op u8 | flags u8 | status u16 | volume u32 | id u64 | offset u64 | len u32
//!           | data_len u32 | epoch u64 | writer u64
//! listing = n × (volume u32 | block u64 | crc32c u32)        (the data of a `List` or `Dirty`
//!           reply, little endian)
//! ```
//!
//! Both checksums are crc32c. Data starts 4 KiB-aligned in the receive buffer, so a 4 KiB
//! write goes from the socket to the disk with `O_DIRECT` and no copy. A frame with a bad
//! magic, version, length or checksum closes the connection; nothing in it is acted on.

use torus_engine::{AlignedBuf, BlockError};

pub const MAGIC: u32 = 0x4652_5054; // "TPRF" read as little-endian bytes
pub const VERSION: u16 = 1;
pub const HEADER_LEN: usize = 32;
pub const ENTRY_LEN: usize = 48;
/// Largest body accepted: a full batch of writes plus headers.
pub const BODY_MAX: usize = 72 << 20;
/// A hello's body at most: its entry, padded to 4 KiB, and a node name of up to 256 bytes.
pub const HELLO_MAX: usize = 8192;
/// Entries in one frame at most.
pub const COUNT_MAX: usize = 8192;
/// One block of a listing (`encode_list`): volume, block, crc32c.
pub const LIST_ENTRY_LEN: usize = 16;
const _: () = assert!(LIST_ENTRY_LEN == 4 + 8 + 4);
const ALIGN: usize = 4096;

/// Operations. `C*` ask the receiver to coordinate as the PG's primary (write locally and on
/// every replica); the others act on the receiver's own store only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    Hello = 1,
    Write = 2,
    Zero = 3,
    Flush = 4,
    Read = 5,
    Status = 6,
    List = 7,
    /// The blocks of the PGs in the body's bitmap written here while catching up (they are
    /// newer here than anywhere): a restarted holder reviving a lost PG copies them.
    Dirty = 8,
    CWrite = 10,
    CZero = 11,
    CRead = 12,
    CStatus = 13,
    Reply = 64,
}

impl Op {
    pub fn from_u8(v: u8) -> Option<Op> {
        Some(match v {
            1 => Op::Hello,
            2 => Op::Write,
            3 => Op::Zero,
            4 => Op::Flush,
            5 => Op::Read,
            6 => Op::Status,
            7 => Op::List,
            8 => Op::Dirty,
            10 => Op::CWrite,
            11 => Op::CZero,
            12 => Op::CRead,
            13 => Op::CStatus,
            64 => Op::Reply,
            _ => return None,
        })
    }
}

pub const FLAG_FUA: u8 = 1;
/// On `Read`: a block this node wrote while catching up (see `Op::Dirty`), served although
/// the node is not a clean holder.
pub const FLAG_DIRTY: u8 = 2;

/// A reply's status: the `status` field of its entry, as a code on the wire (`as_u16`,
/// `from_u16`). The codes are frozen (`status_codes_are_frozen`); a code this node does not
/// know, from a newer peer, is `Unknown`: taken as a hard error, like EIO, and passed on
/// unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Status {
    Ok = 0,
    Eio = 1,
    Enospc = 2,
    Einval = 3,
    /// Ask again after refreshing the map: not the primary, an old map epoch, not enough
    /// replicas up, or the peer went away.
    Retry = 4,
    /// The write carries an older writer epoch than one already seen for this volume.
    Fenced = 5,
    Shutdown = 6,
    NoVolume = 7,
    /// A code no variant above names.
    Unknown(u16),
}

impl Status {
    /// The status a peer sent; never fails (see `Unknown`).
    pub const fn from_u16(code: u16) -> Status {
        match code {
            0 => Status::Ok,
            1 => Status::Eio,
            2 => Status::Enospc,
            3 => Status::Einval,
            4 => Status::Retry,
            5 => Status::Fenced,
            6 => Status::Shutdown,
            7 => Status::NoVolume,
            other => Status::Unknown(other),
        }
    }

    /// The code on the wire.
    pub const fn as_u16(self) -> u16 {
        match self {
            Status::Ok => 0,
            Status::Eio => 1,
            Status::Enospc => 2,
            Status::Einval => 3,
            Status::Retry => 4,
            Status::Fenced => 5,
            Status::Shutdown => 6,
            Status::NoVolume => 7,
            Status::Unknown(code) => code,
        }
    }

    /// The status of an engine's answer: `Ok`, or its error's.
    pub fn of<T>(result: &Result<T, BlockError>) -> Status {
        match result {
            Ok(_) => Status::Ok,
            Err(e) => Status::from(*e),
        }
    }
}

impl From<BlockError> for Status {
    fn from(e: BlockError) -> Status {
        match e {
            BlockError::Io => Status::Eio,
            BlockError::NoSpace => Status::Enospc,
            BlockError::Invalid => Status::Einval,
            BlockError::NoVolume => Status::NoVolume,
            BlockError::ShuttingDown => Status::Shutdown,
        }
    }
}

/// The engine's error for a status that is not `Ok`: one the engine has a name for, else
/// `Io` (`Retry` and `Fenced` past their retries, or a code this node does not know).
impl From<Status> for BlockError {
    fn from(s: Status) -> BlockError {
        match s {
            Status::Enospc => BlockError::NoSpace,
            Status::Einval => BlockError::Invalid,
            Status::NoVolume => BlockError::NoVolume,
            Status::Shutdown => BlockError::ShuttingDown,
            Status::Ok | Status::Eio | Status::Retry | Status::Fenced | Status::Unknown(_) => {
                BlockError::Io
            }
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Entry {
    pub op: u8,
    pub flags: u8,
    pub status: u16,
    pub volume: u32,
    pub id: u64,
    pub offset: u64,
    pub len: u32,
    pub data_len: u32,
    pub epoch: u64,
    pub writer: u64,
}

impl Entry {
    fn encode(&self, out: &mut Vec<u8>) {
        out.push(self.op);
        out.push(self.flags);
        out.extend_from_slice(&self.status.to_le_bytes());
        out.extend_from_slice(&self.volume.to_le_bytes());
        out.extend_from_slice(&self.id.to_le_bytes());
        out.extend_from_slice(&self.offset.to_le_bytes());
        out.extend_from_slice(&self.len.to_le_bytes());
        out.extend_from_slice(&self.data_len.to_le_bytes());
        out.extend_from_slice(&self.epoch.to_le_bytes());
        out.extend_from_slice(&self.writer.to_le_bytes());
    }

    fn decode(b: &[u8]) -> Entry {
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        Entry {
            op: b[0],
            flags: b[1],
            status: u16_at(2),
            volume: u32_at(4),
            id: u64_at(8),
            offset: u64_at(16),
            len: u32_at(24),
            data_len: u32_at(28),
            epoch: u64_at(32),
            writer: u64_at(40),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("bad magic {0:#010x}")]
    Magic(u32),
    #[error("unsupported protocol version {0} (this node speaks {VERSION})")]
    Version(u16),
    #[error("header checksum mismatch")]
    HeaderChecksum,
    #[error("body of {0} bytes is over the {BODY_MAX}-byte limit")]
    TooLong(usize),
    #[error("hello of {0} bytes is over the {HELLO_MAX}-byte limit")]
    HelloTooLong(usize),
    #[error("{0} entries is over the {COUNT_MAX} limit")]
    TooMany(usize),
    #[error("body checksum mismatch")]
    BodyChecksum,
    #[error("entries and data do not add up to the body length")]
    Layout,
    #[error("a block listing of {0} bytes is not a whole number of {LIST_ENTRY_LEN}-byte entries")]
    ListLength(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub len: usize,
    pub count: usize,
    pub body_crc: u32,
}

pub fn decode_header(h: &[u8; HEADER_LEN]) -> Result<Header, FrameError> {
    let magic = u32::from_le_bytes(h[0..4].try_into().expect("4"));
    if magic != MAGIC {
        return Err(FrameError::Magic(magic));
    }
    let crc = u32::from_le_bytes(h[28..32].try_into().expect("4"));
    if crc32c::crc32c(&h[..28]) != crc {
        return Err(FrameError::HeaderChecksum);
    }
    let version = u16::from_le_bytes([h[4], h[5]]);
    if version != VERSION {
        return Err(FrameError::Version(version));
    }
    let len = u32::from_le_bytes(h[8..12].try_into().expect("4")) as usize;
    let count = u32::from_le_bytes(h[12..16].try_into().expect("4")) as usize;
    if len > BODY_MAX {
        return Err(FrameError::TooLong(len));
    }
    if count > COUNT_MAX {
        return Err(FrameError::TooMany(count));
    }
    Ok(Header {
        len,
        count,
        body_crc: u32::from_le_bytes(h[16..20].try_into().expect("4")),
    })
}

fn data_start(count: usize, any_data: bool) -> usize {
    let entries = count * ENTRY_LEN;
    if any_data {
        entries.div_ceil(ALIGN) * ALIGN
    } else {
        entries
    }
}

/// An aligned buffer for a frame's body of `len` bytes (whole pages, so the data in it can be
/// written to the disk as it is).
pub fn body_buffer(len: usize) -> AlignedBuf {
    AlignedBuf::zeroed(len.div_ceil(ALIGN).max(1) * ALIGN)
}

/// A frame's entries, each with where its data starts in the body: inline for a handful (a
/// frame received allocates nothing for them).
pub type Entries = smallvec::SmallVec<[(Entry, usize); 8]>;

/// A decoded frame: its entries, and for each the byte range of its data in `body`.
pub struct Frame {
    pub body: std::sync::Arc<AlignedBuf>,
    pub entries: Entries,
}

/// Checks the body against its header and splits it into entries. `body` holds at least
/// `header.len` bytes (the rest is padding of the aligned buffer).
pub fn decode_body(header: &Header, body: AlignedBuf) -> Result<Frame, FrameError> {
    let (entries, _) = split_body(header, &body[..header.len])?;
    Ok(Frame {
        body: std::sync::Arc::new(body),
        entries,
    })
}

/// Checks a frame's body (`header.len` bytes, wherever they are) against its header and
/// splits it into entries; also returns how many bytes of data the entries carry (0: a
/// frame of replies or requests without data, which needs no buffer of its own).
pub fn split_body(header: &Header, bytes: &[u8]) -> Result<(Entries, usize), FrameError> {
    if bytes.len() != header.len {
        return Err(FrameError::Layout);
    }
    if crc32c::crc32c(bytes) != header.body_crc {
        return Err(FrameError::BodyChecksum);
    }
    if header.count * ENTRY_LEN > header.len {
        return Err(FrameError::Layout);
    }
    let mut entries = Entries::with_capacity(header.count);
    let mut data_total = 0usize;
    for i in 0..header.count {
        let e = Entry::decode(&bytes[i * ENTRY_LEN..(i + 1) * ENTRY_LEN]);
        data_total = data_total
            .checked_add(e.data_len as usize)
            .ok_or(FrameError::Layout)?;
        entries.push((e, 0));
    }
    let mut at = data_start(header.count, data_total > 0);
    if at.checked_add(data_total) != Some(header.len) {
        return Err(FrameError::Layout);
    }
    for (e, start) in entries.iter_mut() {
        *start = at;
        at += e.data_len as usize;
    }
    Ok((entries, data_total))
}

/// Data to send after an entry: a byte range of a shared buffer.
pub struct Data {
    pub buf: std::sync::Arc<AlignedBuf>,
    pub start: usize,
    pub len: usize,
}

/// Encodes one frame from entries (with `data_len` filled in from their data) into `out`.
pub fn encode_frame(items: &mut [(Entry, Option<Data>)], out: &mut Vec<u8>) {
    out.clear();
    out.resize(HEADER_LEN, 0);
    let mut data_total = 0usize;
    for (e, d) in items.iter_mut() {
        e.data_len = d.as_ref().map_or(0, |d| d.len) as u32;
        data_total += e.data_len as usize;
        e.encode(out);
    }
    let start = HEADER_LEN + data_start(items.len(), data_total > 0);
    out.resize(start, 0);
    for (_, d) in items.iter() {
        if let Some(d) = d {
            out.extend_from_slice(&d.buf[d.start..d.start + d.len]);
        }
    }
    let len = out.len() - HEADER_LEN;
    let body_crc = crc32c::crc32c(&out[HEADER_LEN..]);
    let h = &mut out[..HEADER_LEN];
    h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    h[4..6].copy_from_slice(&VERSION.to_le_bytes());
    h[8..12].copy_from_slice(&(len as u32).to_le_bytes());
    h[12..16].copy_from_slice(&(items.len() as u32).to_le_bytes());
    h[16..20].copy_from_slice(&body_crc.to_le_bytes());
    let crc = crc32c::crc32c(&h[..28]);
    h[28..32].copy_from_slice(&crc.to_le_bytes());
}

/// A block listing (volume, block, crc32c) as the data of a reply; None when empty. EINVAL
/// when it would not fit in a frame.
pub fn encode_list(list: &[(u32, u64, u32)]) -> Result<Option<Data>, Status> {
    let bytes = list.len() * LIST_ENTRY_LEN;
    if bytes > BODY_MAX - (64 << 10) {
        return Err(Status::Einval);
    }
    let mut buf = AlignedBuf::zeroed(bytes.div_ceil(4096).max(1) * 4096);
    for (i, (v, b, c)) in list.iter().enumerate() {
        let at = i * LIST_ENTRY_LEN;
        buf[at..at + 4].copy_from_slice(&v.to_le_bytes());
        buf[at + 4..at + 12].copy_from_slice(&b.to_le_bytes());
        buf[at + 12..at + 16].copy_from_slice(&c.to_le_bytes());
    }
    Ok((bytes > 0).then(|| Data {
        buf: std::sync::Arc::new(buf),
        start: 0,
        len: bytes,
    }))
}

/// The blocks of a listing made by `encode_list`. A length that is not a whole number of
/// entries is refused, not read up to its last whole entry: catch-up unmaps here the blocks
/// a source's listing lacks (`replication::catch_up_plan`).
pub fn decode_list(b: &[u8]) -> Result<Vec<(u32, u64, u32)>, FrameError> {
    if !b.len().is_multiple_of(LIST_ENTRY_LEN) {
        return Err(FrameError::ListLength(b.len()));
    }
    Ok(b.chunks_exact(LIST_ENTRY_LEN)
        .map(|c| {
            (
                u32::from_le_bytes(c[0..4].try_into().expect("4")),
                u64::from_le_bytes(c[4..12].try_into().expect("8")),
                u32::from_le_bytes(c[12..16].try_into().expect("4")),
            )
        })
        .collect())
}

/// Reads one frame. Errors: the connection's I/O error, or a `FrameError` as `InvalidData`.
pub async fn read_frame<R: tokio::io::AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Frame> {
    read_frame_within(r, BODY_MAX).await
}

/// Reads the first frame of an incoming connection, which must be a hello: a body longer than
/// `HELLO_MAX` is refused before anything is allocated for it (whoever connects has not said
/// who they are yet).
pub async fn read_hello<R: tokio::io::AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Frame> {
    read_frame_within(r, HELLO_MAX).await
}

async fn read_frame_within<R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
    limit: usize,
) -> std::io::Result<Frame> {
    use tokio::io::AsyncReadExt;
    let mut h = [0u8; HEADER_LEN];
    r.read_exact(&mut h).await?;
    let header = decode_header(&h).map_err(invalid)?;
    if header.len > limit {
        return Err(invalid(FrameError::HelloTooLong(header.len)));
    }
    let mut body = body_buffer(header.len);
    r.read_exact(&mut body[..header.len]).await?;
    decode_body(&header, body).map_err(invalid)
}

fn invalid(e: FrameError) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(items: &mut [(Entry, Option<Data>)]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_frame(items, &mut out);
        out
    }

    fn decode(bytes: &[u8]) -> Result<Frame, FrameError> {
        let h: [u8; HEADER_LEN] = bytes[..HEADER_LEN].try_into().unwrap();
        let header = decode_header(&h)?;
        let mut body = body_buffer(header.len);
        let avail = (bytes.len() - HEADER_LEN).min(header.len);
        body[..avail].copy_from_slice(&bytes[HEADER_LEN..HEADER_LEN + avail]);
        decode_body(&header, body)
    }

    fn sample() -> Vec<u8> {
        let mut data = AlignedBuf::zeroed(8192);
        data[..]
            .iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = i as u8);
        let data = std::sync::Arc::new(data);
        let e = |id| Entry {
            op: Op::Write as u8,
            id,
            volume: 3,
            offset: id * 4096,
            len: 4096,
            epoch: 9,
            ..Entry::default()
        };
        frame(&mut [
            (
                e(1),
                Some(Data {
                    buf: data.clone(),
                    start: 0,
                    len: 4096,
                }),
            ),
            (e(2), None),
            (
                e(3),
                Some(Data {
                    buf: data,
                    start: 4096,
                    len: 4096,
                }),
            ),
        ])
    }

    #[test]
    fn batch_roundtrip_with_aligned_data() {
        let f = decode(&sample()).unwrap();
        assert_eq!(f.entries.len(), 3);
        let (e, start) = f.entries[2];
        assert_eq!(e.id, 3);
        assert_eq!(e.data_len, 4096);
        assert_eq!(start % 4096, 0);
        assert_eq!(f.body[start], 0);
        assert_eq!(f.body[f.entries[0].1 + 5], 5);
        assert_eq!(f.entries[1].0.data_len, 0);
    }

    #[test]
    fn every_damaged_field_is_refused() {
        let good = sample();
        let mut bad = good.clone();
        bad[0] ^= 1;
        assert!(matches!(decode(&bad), Err(FrameError::Magic(_))));
        let mut bad = good.clone();
        bad[4] = 9; // version, with a recomputed header checksum
        let crc = crc32c::crc32c(&bad[..28]);
        bad[28..32].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(decode(&bad).err(), Some(FrameError::Version(9)));
        let mut bad = good.clone();
        bad[9] ^= 0x40; // length without fixing the checksum
        assert_eq!(decode(&bad).err(), Some(FrameError::HeaderChecksum));
        let mut bad = good.clone();
        bad[8..12].copy_from_slice(&(BODY_MAX as u32 + 1).to_le_bytes());
        let crc = crc32c::crc32c(&bad[..28]);
        bad[28..32].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(decode(&bad), Err(FrameError::TooLong(_))));
        let mut bad = good.clone();
        let n = bad.len();
        bad[n - 1] ^= 0x80; // payload bit
        assert_eq!(decode(&bad).err(), Some(FrameError::BodyChecksum));
    }

    #[test]
    fn lying_data_lengths_are_refused() {
        let mut bad = sample();
        // Entry 0's data_len claims more than the body holds; fix both checksums.
        let at = HEADER_LEN + 28;
        bad[at..at + 4].copy_from_slice(&(1u32 << 30).to_le_bytes());
        let crc = crc32c::crc32c(&bad[HEADER_LEN..]);
        bad[16..20].copy_from_slice(&crc.to_le_bytes());
        let crc = crc32c::crc32c(&bad[..28]);
        bad[28..32].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(decode(&bad).err(), Some(FrameError::Layout));
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut x: u64 = 0x1234_5678;
        for _ in 0..20000 {
            let mut b = sample();
            for _ in 0..4 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let i = (x as usize) % b.len();
                b[i] = (x >> 32) as u8;
            }
            let _ = decode(&b);
        }
    }

    #[test]
    fn status_codes_are_frozen() {
        // Nodes of different builds talk to each other: a code never changes meaning.
        let codes = [
            (Status::Ok, 0),
            (Status::Eio, 1),
            (Status::Enospc, 2),
            (Status::Einval, 3),
            (Status::Retry, 4),
            (Status::Fenced, 5),
            (Status::Shutdown, 6),
            (Status::NoVolume, 7),
        ];
        for (status, code) in codes {
            assert_eq!(status.as_u16(), code, "{status:?}");
            assert_eq!(Status::from_u16(code), status);
        }
    }

    #[test]
    fn an_unknown_status_code_is_kept_not_refused() {
        for code in 0..=u16::MAX {
            let status = Status::from_u16(code);
            assert_eq!(status.as_u16(), code, "passed on unchanged");
            assert_eq!(matches!(status, Status::Unknown(_)), code > 7, "{code}");
        }
        assert_eq!(BlockError::from(Status::Unknown(9)), BlockError::Io);
    }

    #[test]
    fn engine_errors_cross_the_wire_and_come_back() {
        use BlockError::*;
        for e in [Io, NoSpace, Invalid, NoVolume, ShuttingDown] {
            assert_eq!(BlockError::from(Status::from(e)), e);
        }
        assert_eq!(Status::of(&Ok::<(), BlockError>(())), Status::Ok);
        assert_eq!(Status::of(&Err::<(), _>(NoSpace)), Status::Enospc);
        for s in [Status::Retry, Status::Fenced] {
            assert_eq!(BlockError::from(s), Io, "{s:?} past its retries");
        }
    }

    #[test]
    fn a_block_listing_roundtrips_in_little_endian() {
        let list = vec![(3, 7, 0xdead_beef), (u32::MAX, 1 << 40, 9)];
        let d = encode_list(&list).unwrap().expect("not empty");
        let bytes = &d.buf[d.start..d.start + d.len];
        assert_eq!(bytes.len(), 2 * LIST_ENTRY_LEN);
        assert_eq!(bytes[..4], 3u32.to_le_bytes());
        assert_eq!(decode_list(bytes), Ok(list));
        assert!(
            encode_list(&[]).unwrap().is_none(),
            "an empty listing sends no data"
        );
        assert_eq!(decode_list(&[]), Ok(Vec::new()));
    }

    #[test]
    fn a_block_listing_cut_mid_entry_is_refused_not_shortened() {
        let list = vec![(1, 2, 3), (4, 5, 6)];
        let d = encode_list(&list).unwrap().expect("not empty");
        let bytes = &d.buf[d.start..d.start + d.len];
        for cut in 1..LIST_ENTRY_LEN {
            let short = &bytes[..bytes.len() - cut];
            assert_eq!(
                decode_list(short),
                Err(FrameError::ListLength(short.len())),
                "{cut} bytes short"
            );
        }
        let long = [bytes, &[0u8; 5]].concat();
        assert_eq!(decode_list(&long), Err(FrameError::ListLength(long.len())));
    }
}
