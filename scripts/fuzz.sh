#!/usr/bin/env bash
# Builds every cargo-fuzz target in fuzz/ and runs each for SECONDS (default
# 60), two at a time, each from its corpus (fuzz/corpus/<target>, kept out
# of git) and its hand-written seeds (fuzz/seeds/<target>). Prints the
# executions per target and fails on any crash, hang or memory blow-up;
# the input that did it is left in fuzz/artifacts/<target>/.
#
#   bash scripts/fuzz.sh [SECONDS]
#
# Needs a nightly toolchain (`cargo +nightly`); without one, the stable
# toolchain is used with RUSTC_BOOTSTRAP=1, which lets it take the nightly
# flags (-Zsanitizer) cargo-fuzz passes. Installs cargo-fuzz when missing.
# FUZZ_JOBS (default 2) fuzzers run at once; FUZZ_TARGETS (space-separated)
# runs only those targets.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-60}
jobs=${FUZZ_JOBS:-2}
case "$seconds" in '' | *[!0-9]*) echo "usage: $0 [SECONDS]" >&2; exit 2 ;; esac

if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  cargo=(cargo +nightly)
  rustc=(rustc +nightly)
else
  echo "no nightly toolchain: using stable with RUSTC_BOOTSTRAP=1"
  export RUSTC_BOOTSTRAP=1
  cargo=(cargo)
  rustc=(rustc)
fi
if ! command -v cargo-fuzz >/dev/null; then
  # About 3 CPU-minutes.
  cargo install cargo-fuzz --locked
fi

build_start=$SECONDS
"${cargo[@]}" fuzz build
build_seconds=$((SECONDS - build_start))

triple=$("${rustc[@]}" -vV | sed -n 's/^host: //p')
bin_dir=fuzz/target/$triple/release
if [ -n "${FUZZ_TARGETS:-}" ]; then
  read -r -a targets <<<"$FUZZ_TARGETS"
else
  mapfile -t targets < <("${cargo[@]}" fuzz list)
fi
logs=$(mktemp -d)
# The targets' own temporary files (the config target's fixture directory).
scratch=$logs/tmp
mkdir "$scratch"
trap 'rm -rf "$logs"' EXIT

run_one() {
  local target=$1
  local corpus=fuzz/corpus/$target seeds=fuzz/seeds/$target
  mkdir -p "$corpus" "fuzz/artifacts/$target"
  local inputs=("$corpus")
  [ -d "$seeds" ] && inputs+=("$seeds")
  # -timeout: one input running 30 s is a hang. -rss_limit_mb: the machine
  # is shared. The first directory is where new inputs are kept.
  local rc=0
  TMPDIR=$scratch "$bin_dir/$target" "${inputs[@]}" \
    -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=30 \
    -print_final_stats=1 -artifact_prefix="fuzz/artifacts/$target/" \
    >"$logs/$target.log" 2>&1 || rc=$?
  echo "$rc" >"$logs/$target.rc"
}

run_start=$SECONDS
running=0
for target in "${targets[@]}"; do
  if [ "$running" -ge "$jobs" ]; then
    wait -n || true
    running=$((running - 1))
  fi
  echo "fuzzing $target for ${seconds}s"
  run_one "$target" &
  running=$((running + 1))
done
wait || true
run_seconds=$((SECONDS - run_start))

failed=0
echo
printf '%-20s %14s %10s  %s\n' target executions exec/s result
for target in "${targets[@]}"; do
  log=$logs/$target.log
  rc=$(cat "$logs/$target.rc" 2>/dev/null || echo "?")
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  per_second=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  if [ "$rc" = 0 ]; then
    result=ok
  else
    result="FAILED (exit $rc)"
    failed=1
  fi
  printf '%-20s %14s %10s  %s\n' "$target" "${execs:-?}" "${per_second:-?}" "$result"
done
echo "build ${build_seconds}s, fuzzing ${run_seconds}s (${#targets[@]} targets, ${jobs} at a time, ${seconds}s each)"

if [ "$failed" = 1 ]; then
  for target in "${targets[@]}"; do
    if [ "$(cat "$logs/$target.rc" 2>/dev/null)" != 0 ]; then
      echo
      echo "=== $target: end of the fuzzer's output"
      tail -n 80 "$logs/$target.log"
      echo "inputs kept in fuzz/artifacts/$target/:"
      ls -l "fuzz/artifacts/$target/"
    fi
  done
  echo
  echo "reproduce with: ${cargo[*]} fuzz run TARGET fuzz/artifacts/TARGET/crash-..."
  exit 1
fi
