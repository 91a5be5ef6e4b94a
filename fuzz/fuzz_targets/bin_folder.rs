//! Fuzzes the bin folder parser (see tests/parsers/mod.rs).
#![no_main]

#[path = "../../tests/parsers/mod.rs"]
mod parsers;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = parsers::bin_folder(data);
});
