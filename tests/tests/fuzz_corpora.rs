//! The fuzz targets (tests/src/fuzzing.rs) on stable: valid seeds, seeded mutations of them,
//! random bytes, and every input libFuzzer saved under tests/fuzz/corpus/TARGET/. Any panic
//! fails the test and prints the seed that replays it (TORUS_TEST_SEED=N).

use std::sync::Arc;
use torus_tests::fuzzing::TARGETS;
use torus_tests::*;

/// Mutations per seed input, and random inputs per target.
const MUTATIONS: usize = 20000;
const RANDOM: usize = 10000;

fn option(code: u32, data: &[u8]) -> Vec<u8> {
    let mut b = 0x4948_4156_454F_5054u64.to_be_bytes().to_vec();
    b.extend_from_slice(&code.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

fn name_and_no_info(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    d
}

fn seeds(target: &str) -> Vec<Vec<u8>> {
    match target {
        "nbd_handshake" => {
            let flags = 3u32.to_be_bytes().to_vec();
            let meta = {
                let mut d = 7u32.to_be_bytes().to_vec();
                d.extend_from_slice(b"default");
                d.extend_from_slice(&1u32.to_be_bytes());
                d.extend_from_slice(&15u32.to_be_bytes());
                d.extend_from_slice(b"base:allocation");
                d
            };
            vec![
                [flags.clone(), option(7, &name_and_no_info("default"))].concat(),
                [
                    flags.clone(),
                    option(8, &[]),
                    option(10, &meta),
                    option(6, &name_and_no_info("db@snap")),
                    option(3, &[]),
                    option(7, &name_and_no_info("")),
                ]
                .concat(),
                [flags.clone(), option(1, b"default")].concat(),
                [flags, option(2, &[])].concat(),
            ]
        }
        "peer_frame" => {
            use torus_net::wire::{encode_frame, Data, Entry};
            let mut data = torus_engine::AlignedBuf::zeroed(4096);
            data.fill(0x5a);
            let entry = Entry {
                op: 2,
                volume: 1,
                id: 9,
                offset: 8192,
                len: 4096,
                epoch: 3,
                writer: 4,
                ..Entry::default()
            };
            let mut out = Vec::new();
            encode_frame(
                &mut [
                    (
                        entry,
                        Some(Data {
                            buf: Arc::new(data),
                            start: 0,
                            len: 4096,
                        }),
                    ),
                    (
                        Entry {
                            op: 4,
                            id: 10,
                            ..Entry::default()
                        },
                        None,
                    ),
                ],
                &mut out,
            );
            vec![out]
        }
        "journal_page" => {
            use torus_engine::journal::{encode_page, Record};
            let mut page = vec![0u8; 4096];
            encode_page(
                &mut page,
                7,
                6,
                &[
                    Record::Map {
                        volume: 1,
                        block: 5,
                        slot: 9,
                        crc: 0xdead,
                    },
                    Record::Unmap {
                        volume: 1,
                        block: 6,
                    },
                    Record::Clone {
                        from: 1,
                        to: 1 | 1 << 24,
                    },
                    Record::DropVolume { volume: 2 },
                ],
            );
            vec![page]
        }
        "checkpoint" => {
            let entries: Vec<_> = (0..300u64)
                .map(|i| {
                    (
                        1 + (i % 3) as u32,
                        i,
                        torus_engine::block_map::Entry {
                            slot: i as u32,
                            crc: i as u32 * 7,
                        },
                    )
                })
                .collect();
            vec![torus_engine::checkpoint::encode(4, 100, &entries).to_vec()]
        }
        "superblock" => {
            // The first page of a real store.
            let dir = TempDir::new("fuzz-superblock");
            let path = dir.path().join("blocks");
            let e = torus_engine::Engine::open(
                &torus_engine::EngineConfig {
                    path: path.clone(),
                    create_size: 64 << 20,
                    cores: 2,
                    fill: torus_engine::Fill::Sparse,
                },
                |_| Box::new(torus_engine::NoService),
            )
            .unwrap();
            e.stop().unwrap();
            drop(e);
            let bytes = std::fs::read(&path).unwrap();
            vec![bytes[..4096].to_vec()]
        }
        other => panic!("no seeds for {other}"),
    }
}

fn mutate(rng: &mut Rng, input: &[u8]) -> Vec<u8> {
    let mut m = input.to_vec();
    match rng.below(4) {
        0 => {
            for _ in 0..1 + rng.below(8) {
                if !m.is_empty() {
                    let at = rng.below(m.len() as u64) as usize;
                    m[at] ^= 1 << rng.below(8);
                }
            }
        }
        1 => m.truncate(rng.below(m.len() as u64 + 1) as usize),
        2 => {
            let at = rng.below(m.len() as u64 + 1) as usize;
            let mut extra = vec![0u8; rng.below(64) as usize];
            rng.fill(&mut extra);
            m.splice(at..at, extra);
        }
        _ => {
            // A length or count field set to something large.
            if m.len() >= 4 {
                let at = rng.below(m.len() as u64 - 3) as usize;
                let v = [u32::MAX, 1 << 31, 0, 4097, 0x7fff_ffff][rng.below(5) as usize];
                m[at..at + 4].copy_from_slice(&v.to_be_bytes());
            }
        }
    }
    m
}

/// The five fuzz targets (NBD handshake, node-to-node frame, journal page, checkpoint, superblock)
/// on valid seeds, 20000 seeded mutations of each seed input (bit flips, truncation, inserted
/// bytes, a 4-byte field set to an edge value such as u32::MAX), 10000 random inputs of up to 9000
/// bytes per target, and every input libFuzzer saved in tests/fuzz/corpus/; any panic fails it. It
/// prints its seed.
#[test]
fn fuzz_targets_survive_seeds_mutations_and_saved_corpora() {
    let seed = seed();
    eprintln!("fuzz corpora seed: {seed} (replay with TORUS_TEST_SEED={seed})");
    let mut rng = Rng(seed);
    let corpus_root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let mut total = 0;
    for (name, target) in TARGETS {
        let seeds = seeds(name);
        let mut inputs: Vec<Vec<u8>> = seeds.clone();
        for s in &seeds {
            for _ in 0..MUTATIONS {
                inputs.push(mutate(&mut rng, s));
            }
        }
        for _ in 0..RANDOM {
            let mut r = vec![0u8; rng.below(9000) as usize];
            rng.fill(&mut r);
            inputs.push(r);
        }
        let saved = std::fs::read_dir(corpus_root.join(name))
            .map(|d| {
                d.filter_map(|e| std::fs::read(e.ok()?.path()).ok())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        eprintln!(
            "{name}: {} seeds, {} saved corpus inputs",
            seeds.len(),
            saved.len()
        );
        inputs.extend(saved);
        for input in &inputs {
            target(input);
        }
        total += inputs.len();
    }
    eprintln!(
        "fuzz corpora: {total} inputs over {} targets, no panic",
        TARGETS.len()
    );
}
