//! The bodies of torus's fuzz targets: each takes arbitrary bytes, feeds them to a decoder
//! that meets untrusted input, and must return (never panic, hang or allocate without bound).
//! `tests/fuzz/` runs them under libFuzzer (`cargo +nightly fuzz run --fuzz-dir tests/fuzz
//! TARGET`); `tests/tests/fuzz_corpora.rs` runs them on stable over valid seeds, thousands of
//! seeded mutations of them, and every file saved in `tests/fuzz/corpus/TARGET/`.

use torus_frontend::exports::{Exports, Volume};
use torus_frontend::nbd::handshake::{negotiate, Script};

/// A fuzz target: its name (the libFuzzer binary's) and its body.
pub type Target = (&'static str, fn(&[u8]));

pub const TARGETS: &[Target] = &[
    ("nbd_handshake", nbd_handshake),
    ("peer_frame", peer_frame),
    ("journal_page", journal_page),
    ("checkpoint", checkpoint),
    ("superblock", superblock),
];

/// The NBD server's handshake (option haggling) with a client that sends `data`.
pub fn nbd_handshake(data: &[u8]) {
    let exports = Exports::default();
    exports.insert(Volume::new("default", 1, 1 << 30, false));
    exports.insert(Volume::new("db@snap", 2 | 1 << 24, 1 << 20, true));
    let mut s = Script::new(data.to_vec());
    let _ = negotiate(&mut s, &exports);
}

/// A node-to-node frame: header, then the body it announces.
pub fn peer_frame(data: &[u8]) {
    use torus_net::wire::{decode_body, decode_header, HEADER_LEN};
    let Some(h) = data.get(..HEADER_LEN) else {
        return;
    };
    let Ok(header) = decode_header(h.try_into().expect("header length")) else {
        return;
    };
    let body = &data[HEADER_LEN..];
    if header.len != body.len() {
        return; // a real reader waits for exactly `len` bytes
    }
    let mut buf = torus_engine::AlignedBuf::zeroed(body.len());
    buf[..body.len()].copy_from_slice(body);
    let _ = decode_body(&header, buf);
}

/// One journal page as recovery reads it.
pub fn journal_page(data: &[u8]) {
    let mut page = vec![0u8; torus_engine::layout::PAGE_SIZE];
    let n = data.len().min(page.len());
    page[..n].copy_from_slice(&data[..n]);
    let _ = torus_engine::journal::decode_page(&page);
}

/// A checkpoint: its header page, then as much body as the header asks for.
pub fn checkpoint(data: &[u8]) {
    use torus_engine::checkpoint::{decode_body, decode_header};
    let page_size = torus_engine::layout::PAGE_SIZE;
    let mut page = vec![0u8; page_size];
    let n = data.len().min(page_size);
    page[..n].copy_from_slice(&data[..n]);
    let Some(h) = decode_header(&page, 1 << 20) else {
        return;
    };
    let _ = decode_body(&h, data.get(page_size..).unwrap_or(&[]));
}

/// A superblock page.
pub fn superblock(data: &[u8]) {
    let mut page = vec![0u8; torus_engine::layout::PAGE_SIZE];
    let n = data.len().min(page.len());
    page[..n].copy_from_slice(&data[..n]);
    let _ = torus_engine::layout::Superblock::decode(&page);
}
