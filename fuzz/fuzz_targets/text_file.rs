//! Fuzzes reading a text file of sentences (see tests/parsers/mod.rs).
#![no_main]

#[path = "../../tests/parsers/mod.rs"]
mod parsers;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = parsers::text_file(data);
});
