//! The `ascend-quant` command: parses arguments, calls the library, maps
//! failures to stable exit codes (0 ok, 1 bad input or usage, 2 runtime).

fn main() {
    std::process::exit(ascend_quant::cli::main_with_args(std::env::args_os()));
}
