#!/usr/bin/env bash
# Configures and builds kvfabric into build/ (executables in build/bin/). Extra args go to cmake.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
build_dir=${KVF_BUILD_DIR:-build}
jobs=${KVF_JOBS:-$(nproc)}
if [[ ! -f $build_dir/build.ninja ]]; then
  cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=${KVF_BUILD_TYPE:-RelWithDebInfo} "$@"
fi
cmake --build "$build_dir" -j "$jobs"
