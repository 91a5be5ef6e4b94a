#!/usr/bin/env bash
# Installs what building and testing ascend-quant needs on a fresh machine.
# The Rust toolchain comes from rustup; protoc comes from the protoc-bin-vendored
# crate. The one system package is libclang (Debian's libclang-dev): the test
# sys/tests/bindings_fresh.rs runs bindgen to check the committed AscendCL
# bindings against the header. Python (onnx, onnxruntime) is only for
# regenerating fixtures and benchmarks, never for the tests.
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
if ! ldconfig -p 2>/dev/null | grep -q 'libclang[-.0-9]*\.so'; then
  sudo_cmd=""
  if [ "$(id -u)" != 0 ]; then sudo_cmd="sudo"; fi
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq libclang-dev >/dev/null
fi
cargo fetch --locked >/dev/null
echo "setup: ok ($(cargo --version))"
