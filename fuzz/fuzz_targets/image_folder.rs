//! Fuzzes reading a folder of images (see tests/parsers/mod.rs).
#![no_main]

#[path = "../../tests/parsers/mod.rs"]
mod parsers;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = parsers::image_folder(data);
});
