//! Compiles `acl_stub.c` into `$OUT_DIR/libascendcl.so` with the C compiler
//! the `cc` crate finds.

fn main() {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    println!("cargo:rerun-if-changed=acl_stub.c");
    println!("cargo:rerun-if-changed=../include/ascendcl.h");
    let compiler = cc::Build::new().pic(true).opt_level(1).get_compiler();
    let status = compiler
        .to_command()
        .args(["-shared", "-Wall", "-Wextra", "-Werror", "-o"])
        .arg(out.join("libascendcl.so"))
        .arg("acl_stub.c")
        .arg("-lpthread")
        .status()
        .expect("the C compiler runs");
    assert!(status.success(), "compiling acl_stub.c failed");
}
