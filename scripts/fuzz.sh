#!/usr/bin/env bash
# Runs every cargo-fuzz target for SECONDS each (default 60), one after the
# other, starting from the committed seeds (fuzz/seeds/<target>) plus what
# earlier runs found (fuzz/corpus/<target>, not committed). Needs the nightly
# toolchain and cargo-fuzz (`cargo install cargo-fuzz`). Prints the number of
# executions per target; a crash stops the script with the reproducer in
# fuzz/artifacts/<target>/.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#   FUZZ_RUNS=1000000 scripts/fuzz.sh 3600   # stop each target after that many executions
#   FUZZ_SANITIZER=address scripts/fuzz.sh    # with AddressSanitizer (default: none)
#
# The parsers are safe Rust, so what fuzzing finds is panics, hangs (-timeout)
# and memory blow-ups (-rss_limit_mb, -malloc_limit_mb); none of that needs a
# sanitizer, and without one the targets build and run several times faster.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(model model_run record json_config retrain_config retrain_simple_config simple_config npy bin_folder text_file)
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: cargo-fuzz is missing; install it with: cargo install cargo-fuzz" >&2
  exit 1
fi
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t"
  cp -n fuzz/seeds/"$t"/* "fuzz/corpus/$t/" 2>/dev/null || true
  log="fuzz/artifacts/$t.log"
  mkdir -p fuzz/artifacts
  echo "fuzz: $t for ${seconds}s"
  cargo +nightly fuzz run --sanitizer "${FUZZ_SANITIZER:-none}" "$t" "fuzz/corpus/$t" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -malloc_limit_mb=1024 -max_len=131072 -timeout=20 \
    -print_final_stats=1 ${FUZZ_RUNS:+-runs="$FUZZ_RUNS"} 2>"$log" || { tail -40 "$log"; exit 1; }
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')
  echo "fuzz: $t: $runs executions, no crash"
done
