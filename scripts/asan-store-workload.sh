#!/usr/bin/env bash
# The store workload test (tests/integration/store_workload.sh) under AddressSanitizer and UBSan:
# configures a build of its own (KVF_SANITIZE=ON, without CUDA and tests: neither is needed here),
# builds only kvfabricd and kvfabric-store-workload, and runs the workload with them
# (KVF_STORE_BIN); any sanitizer report from the daemon or an engine process fails it. ctest runs it
# as asan.store_workload with BUILD_DIR = <build>/asan-store.
#   scripts/asan-store-workload.sh [BUILD_DIR]      (default: build-asan; KVF_BIN: build/bin)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dir=${1:-$root/build-asan}
jobs=${KVF_JOBS:-$(nproc)}
export KVF_BIN=${KVF_BIN:-$root/build/bin}
export KVF_SOURCE=${KVF_SOURCE:-$root}

started=$(date +%s)
if [[ ! -f $dir/CMakeCache.txt ]]; then
  generator=()
  command -v ninja >/dev/null && generator=(-G Ninja)
  mkdir -p "$dir"
  # Debug at -O0, -g1 (line tables, for the reports' stack traces): with UBSan, GCC 12 takes about
  # 6x as long at -O2 -g on the Boost.Beast and Asio files (5 min for control/http_server.cpp alone
  # on a 2-core machine, under 1 min at -O0), and -O0 loses no sanitizer check.
  cmake -S "$root" -B "$dir" "${generator[@]}" -DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_FLAGS_DEBUG=-g1 \
    -DKVF_SANITIZE=ON -DKVF_WITH_CUDA=OFF -DBUILD_TESTING=OFF >"$dir/configure.log" 2>&1 ||
    { cat "$dir/configure.log"; exit 1; }
fi
cmake --build "$dir" -j "$jobs" --target kvfabricd kvfabric-store-workload
echo "asan-store-workload: sanitized kvfabricd and kvfabric-store-workload built in $(($(date +%s) - started)) s"

KVF_STORE_BIN=$dir/bin exec bash "$root/tests/integration/store_workload.sh"
