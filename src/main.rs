//! The `ascend-quant` command: parses arguments, calls the library, maps
//! failures to stable exit codes (0 ok, 1 bad input or usage, 2 runtime).

fn main() {
    one_malloc_arena();
    std::process::exit(ascend_quant::cli::main_with_args(std::env::args_os()));
}

/// glibc gives every thread that allocates its own arena, and each arena
/// keeps the memory freed into it. The engine's worker threads allocate layer
/// outputs of every size, so three arenas each held tens of megabytes that no
/// one used: `calibrate` on MobileNetV2 peaked at 189 MB of RSS, 118 MB with
/// one arena, and no slower (docs/engine.md, "Memory"). A user's
/// `MALLOC_ARENA_MAX` still wins.
fn one_malloc_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only changes the allocator's settings; it is called
        // before any other thread exists.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}
