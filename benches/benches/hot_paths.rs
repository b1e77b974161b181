//! Micro-benchmarks of the hot paths behind the fio figures: checksum of a 4 KiB block, NBD
//! request header decode and reply encode, journal page encode/decode, and a round trip
//! through a core mailbox between two threads.
//!
//!   cargo bench -p torus-bench --bench hot_paths

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use torus_engine::journal::{decode_page, encode_page, Record, RECORDS_PER_PAGE};
use torus_engine::mailbox::{Mailbox, Message};
use torus_engine::{Completion, Output};
use torus_frontend::nbd::protocol::{simple_reply, RequestHeader, CMD_WRITE, REQUEST_MAGIC};

fn checksum(c: &mut Criterion) {
    let block = vec![0x5au8; 4096];
    let mut g = c.benchmark_group("crc32c");
    g.throughput(Throughput::Bytes(4096));
    g.bench_function("4KiB", |b| b.iter(|| crc32c::crc32c(black_box(&block))));
    g.finish();
}

fn nbd_codec(c: &mut Criterion) {
    let h = RequestHeader {
        magic: REQUEST_MAGIC,
        flags: 0,
        command: CMD_WRITE,
        cookie: 7,
        offset: 4096,
        length: 4096,
    };
    let bytes = h.encode();
    c.bench_function("nbd/request_decode", |b| {
        b.iter(|| RequestHeader::decode(black_box(&bytes)))
    });
    c.bench_function("nbd/simple_reply_encode", |b| {
        b.iter(|| simple_reply(black_box(0), black_box(7)))
    });
}

fn journal(c: &mut Criterion) {
    let records: Vec<Record> = (0..RECORDS_PER_PAGE as u64)
        .map(|i| Record::Map {
            volume: 1,
            block: i,
            slot: i as u32,
            crc: 9,
        })
        .collect();
    let mut page = vec![0u8; 4096];
    let mut g = c.benchmark_group("journal");
    g.throughput(Throughput::Elements(RECORDS_PER_PAGE as u64));
    g.bench_function("encode_page", |b| {
        b.iter(|| encode_page(black_box(&mut page), 10, 10, black_box(&records)))
    });
    encode_page(&mut page, 10, 10, &records);
    g.bench_function("decode_page", |b| b.iter(|| decode_page(black_box(&page))));
    g.finish();
}

fn mailbox(c: &mut Criterion) {
    let (to_echo, echo_rx) = Mailbox::new().expect("mailbox");
    let (to_bench, bench_rx) = Mailbox::new().expect("mailbox");
    let to_bench = std::sync::Arc::new(to_bench);
    let back = to_bench.clone();
    let echo = std::thread::spawn(move || {
        while let Ok(m) = echo_rx.recv() {
            match m {
                Message::Done(c) if c.token == u64::MAX => return,
                m => back.send(m),
            }
        }
    });
    c.bench_function("mailbox/round_trip", |b| {
        b.iter(|| {
            to_echo.send(Message::Done(Completion {
                token: 1,
                output: Ok(Output::Done),
            }));
            bench_rx.recv().expect("echo")
        })
    });
    to_echo.send(Message::Done(Completion {
        token: u64::MAX,
        output: Ok(Output::Done),
    }));
    let _ = echo.join();
}

criterion_group!(benches, checksum, nbd_codec, journal, mailbox);
criterion_main!(benches);
