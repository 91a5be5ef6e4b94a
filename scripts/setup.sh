#!/usr/bin/env bash
# Installs what building and testing ascend-quant needs on a fresh machine.
# The Rust toolchain comes from rustup; protoc comes from the protoc-bin-vendored
# crate, so no system package is required today. Python (onnx, onnxruntime) is
# only for regenerating fixtures and benchmarks, never for the tests.
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
cargo fetch --locked >/dev/null
echo "setup: ok ($(cargo --version))"
