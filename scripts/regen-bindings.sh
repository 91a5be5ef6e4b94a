#!/usr/bin/env bash
# Regenerates sys/src/bindings.rs from sys/include/ascendcl.h with bindgen.
# Installs libclang (Debian's libclang-dev) when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! ldconfig -p 2>/dev/null | grep -q 'libclang'; then
  apt-get update -qq && apt-get install -y -qq libclang-dev
fi
touch sys/src/bindings.rs
REGEN_BINDINGS=1 cargo test -q -p ascendcl-sys --test bindings_fresh -- --nocapture
echo "regenerated sys/src/bindings.rs"
