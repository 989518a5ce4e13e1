#!/usr/bin/env bash
# ctest fuzz.frame_decoder: writes a fresh seed corpus into the build tree (libFuzzer adds the
# inputs it finds to its first corpus directory, so never point it at the source tree), then fuzzes.
# usage: run_fuzz.sh <corpus generator> <fuzzer> <work dir> <seconds>
set -euo pipefail
gen=$1 fuzzer=$2 work=$3 seconds=$4
rm -rf "$work"
mkdir -p "$work/corpus" "$work/artifacts"
"$gen" "$work/corpus"
exec "$fuzzer" -max_total_time="$seconds" -seed=1 -rss_limit_mb=2048 -print_final_stats=1 \
  -artifact_prefix="$work/artifacts/" "$work/corpus"
