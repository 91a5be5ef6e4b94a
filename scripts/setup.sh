#!/usr/bin/env bash
# Installs what building and testing ascend-quant needs on a fresh Debian
# machine that has only Rust (rustup); the README's test command runs it first:
#
#   scripts/setup.sh && cargo test --workspace
#
# - the rustfmt and clippy components (CI checks formatting and lints);
# - a C compiler and linker (rustc links with `cc`; the AscendCL stub is C);
# - libclang (Debian's libclang-dev): sys/tests/bindings_fresh.rs runs bindgen
#   to check the committed AscendCL bindings against the header.
# protoc comes from the protoc-bin-vendored crate. Python (onnx, onnxruntime)
# is only for regenerating fixtures and benchmarks, never for the tests.
# Packages are installed with apt-get (through sudo when not root), and only
# when something is missing: a second run installs nothing.
set -euo pipefail
if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found; install Rust with rustup first" >&2
  exit 1
fi
for component in rustfmt clippy; do
  if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
    rustup component add "$component"
  fi
done

# Whether libclang is where clang-sys (bindgen) looks: LIBCLANG_PATH, the
# loader's cache, or LLVM's and Debian's library folders. `ldconfig` is called
# by its full path: a non-root user's PATH often lacks /sbin.
have_libclang() {
  local dirs=("${LIBCLANG_PATH:-}" /usr/lib/llvm-*/lib /usr/lib/*-linux-gnu /usr/lib /usr/lib64 /usr/local/lib)
  local d f
  for d in "${dirs[@]}"; do
    [ -n "$d" ] && [ -d "$d" ] || continue
    for f in "$d"/libclang.so "$d"/libclang-[0-9]*.so* "$d"/libclang.so.[0-9]*; do
      [ -e "$f" ] && return 0
    done
  done
  local ldconfig
  for ldconfig in /sbin/ldconfig /usr/sbin/ldconfig "$(command -v ldconfig || true)"; do
    if [ -x "$ldconfig" ] && "$ldconfig" -p 2>/dev/null | grep -Eq 'libclang(-[0-9.]+)?\.so'; then
      return 0
    fi
  done
  return 1
}

packages=()
if ! command -v cc >/dev/null 2>&1; then
  packages+=(gcc libc6-dev)
fi
if ! have_libclang; then
  packages+=(libclang-dev)
fi
if [ ${#packages[@]} -gt 0 ]; then
  sudo_cmd=()
  if [ "$(id -u)" != 0 ]; then sudo_cmd=(sudo); fi
  echo "setup: installing ${packages[*]} with apt-get"
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "${packages[@]}" >/dev/null
fi
cargo fetch --locked >/dev/null
echo "setup: ok ($(cargo --version), $(cc --version | head -1))"
