//! Feeds arbitrary bytes to the pgoutput decoder: it must return `Ok` or
//! `Err`, never panic, and whatever it accepts must decode the same way twice.
//!
//! Run with `cargo +nightly fuzz run -s none pgoutput` from the repository
//! root; it starts from the seed corpus in `fuzz/corpus/pgoutput`.
//! fuzz/README.md says why `-s none` and how to add what it finds.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use walrelay::pg::pgoutput::Message;

fuzz_target!(|data: &[u8]| {
    let input = Bytes::copy_from_slice(data);
    if let Ok(message) = Message::parse(input.clone()) {
        assert_eq!(Message::parse(input).ok(), Some(message));
    }
});
