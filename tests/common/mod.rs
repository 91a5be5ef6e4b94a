//! Helpers shared by the integration tests: fixture paths and the command.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// The digits fixtures folder.
pub fn digits() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/digits")
}

/// The `ascend-quant` binary, with the stub runtime's knobs and CANN's
/// environment cleared so nothing leaks in from the caller.
pub fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ascend-quant"));
    c.env_remove("ASCEND_STUB_FAIL")
        .env_remove("ASCEND_HOME_PATH")
        .env_remove("ASCEND_TOOLKIT_HOME")
        .env_remove("ASCEND_QUANT_ACL_LIB");
    c
}

/// `calibrate --model digits_cnn.onnx --data calib_x.npy --output OUT` (add more arguments after).
pub fn calibrate_digits(output: &Path) -> Command {
    let mut c = bin();
    c.arg("calibrate")
        .arg("--model")
        .arg(digits().join("digits_cnn.onnx"))
        .arg("--data")
        .arg(digits().join("calib_x.npy"))
        .arg("--output")
        .arg(output);
    c
}
