//! Fuzzes running a model on the CPU executor every command uses (see tests/parsers/mod.rs).
#![no_main]

#[path = "../../tests/parsers/mod.rs"]
mod parsers;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = parsers::model_run(data);
});
