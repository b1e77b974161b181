#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| torus_tests::fuzzing::peer_frame(data));
