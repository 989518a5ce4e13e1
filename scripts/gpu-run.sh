#!/usr/bin/env bash
# gpu-run.sh: on the GPU machine, in one call: set up what the machine lacks (from .gpu-deps/, made
# by scripts/fetch-gpu-deps.sh on a networked machine), build kvfabric for sm_90, run the GPU and
# unit tests (kernel tests also under compute-sanitizer memcheck) and perf/bench-gpu.sh. Logs and
# results go under $OUT (or ./gpu-out when OUT is unset); a summary table is printed last.
# Usage: scripts/gpu-run.sh [build] [test] [sanitize] [bench] [quality] [host] [bench-args...]
#   (default: build test sanitize bench; quality: the KV codecs on the Llama-3-8B-shaped GPU
#   reference engine, then the placement bench on the profiles it measured; host: the host-memory
#   benches that the 2-core CPU machine cannot run without its CPU being the limit, on this
#   machine's cores: remote fetch between two network namespaces and compressed PD layers over
#   loopback tcp)
#   e.g. scripts/gpu-run.sh build bench --rounds 3
# Environment: KVF_GPU_BUILD (build dir, default build-gpu), BENCH_ARGS (extra args to bench-gpu.sh),
#   KVF_TEST_LABELS (ctest labels of the test phase, default "gpu|unit"), KVF_TEST_REGEX (only the
#   tests whose names match, as ctest -R), KVF_BUILD_TARGETS (build only these targets),
#   HOST_ROUNDS (rounds of each host bench, default 7), PD_CODEC_ARGS (extra bench-pd-codec.sh
#   arguments for the host phase, default "--workers 8 --slots 8 --slot-bytes 8M").
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
out=${OUT:-$root/gpu-out}
mkdir -p "$out"
build=${KVF_GPU_BUILD:-build-gpu}
deps=$root/.gpu-deps
# Never let NCCL (or anything else) use NVLink multicast on the shared host.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

phases=() bench_args=()
for a in "$@"; do
  case $a in build|test|sanitize|bench|quality|host) phases+=("$a") ;; *) bench_args+=("$a") ;; esac
done
((${#phases[@]})) || phases=(build test sanitize bench)
want() { local p; for p in "${phases[@]}"; do [[ $p == "$1" ]] && return 0; done; return 1; }
summary=()
note() { summary+=("$*"); echo "gpu-run: $*"; }

# --- what the machine lacks ---------------------------------------------------------------------
[[ -f $deps/READY ]] || { echo "gpu-run: $deps missing: run scripts/fetch-gpu-deps.sh here first and carry .gpu-deps" >&2; exit 2; }
sysroot=$deps/root
mkdir -p "$sysroot"
for d in "$deps"/debs/*.deb; do dpkg -x "$d" "$sysroot"; done
ucx=$deps/libucx
for f in "$ucx"/lib/*.so.0.0.0 "$ucx"/lib/ucx/*.so.0.0.0; do
  ln -sf "$(basename "$f")" "${f%.0.0}"; ln -sf "$(basename "$f")" "${f%.0.0.0}"
done
pc=$deps/pkgconfig
mkdir -p "$pc"
for f in "$ucx"/lib/pkgconfig/*.pc; do sed "s|^prefix *=.*|prefix = $ucx|" "$f" >"$pc/$(basename "$f")"; done
for f in "$sysroot"/usr/lib/x86_64-linux-gnu/pkgconfig/*.pc; do sed "s|^prefix=.*|prefix=$sysroot/usr|" "$f" >"$pc/$(basename "$f")"; done
export PKG_CONFIG_PATH=$pc${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}
export LD_LIBRARY_PATH=$ucx/lib:$sysroot/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export PATH=$ucx/bin:$PATH
{ nvidia-smi; nvidia-smi topo -m; ucx_info -v; ucx_info -d | grep -E "Transport|Memory domain" | sort | uniq -c; } >"$out/machine.txt" 2>&1
note "GPUs: $(nvidia-smi --query-gpu=name --format=csv,noheader | sort | uniq -c | xargs)"

# --- build ---------------------------------------------------------------------------------------
if want build; then
  start=$SECONDS
  if cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CUDA_ARCHITECTURES=90 \
       >"$out/build.log" 2>&1 &&
     cmake --build "$build" -j "$(nproc)" ${KVF_BUILD_TARGETS:+--target $KVF_BUILD_TARGETS} >>"$out/build.log" 2>&1; then
    note "build: ok in $((SECONDS - start)) s"
  else
    note "build: FAILED (tail of build.log follows)"; tail -40 "$out/build.log"; printf '%s\n' "${summary[@]}"; exit 1
  fi
fi
bin=$root/$build/bin

# --- tests ---------------------------------------------------------------------------------------
if want test; then
  (cd "$build" && ctest -L "${KVF_TEST_LABELS:-gpu|unit}" ${KVF_TEST_REGEX:+-R "$KVF_TEST_REGEX"} --output-on-failure --timeout 300) >"$out/tests.log" 2>&1
  note "tests (unit+gpu): $(grep -E 'tests passed|tests failed' "$out/tests.log" | tail -1)"
  # Every check the script tests made, passed or failed (ctest keeps passing tests' output only
  # in LastTest.log), so a call shows what each test asserted, not just that it passed.
  grep -hE "ok: |FAIL \(" "$build/Testing/Temporary/LastTest.log" >"$out/test-checks.log" 2>/dev/null
  note "test checks: $(grep -c "ok: " "$out/test-checks.log") passed, $(grep -c "FAIL (" "$out/test-checks.log") failed (test-checks.log)"
  grep -E "Failed|\*\*\*|SKIP" "$out/tests.log" | head -20
fi
if want sanitize; then
  : >"$out/sanitize.log"
  # test_cuda_memory's [api-errors] cases make CUDA calls fail on purpose (refused IPC opens):
  # memcheck counts those as errors, so they run only in the plain test phase.
  for t in "test_paged_copy_cuda" "test_kv_codec_cuda" "test_cuda_memory ~[api-errors]" "test_gpu_reference_model ~[perf]"; do
    read -r exe filter <<<"$t"
    [[ -x $bin/$exe ]] || { note "sanitize: $exe not built"; continue; }
    # shellcheck disable=SC2086
    if compute-sanitizer --tool memcheck --error-exitcode 9 "$bin/$exe" $filter >>"$out/sanitize.log" 2>&1; then
      note "memcheck $exe${filter:+ $filter}: clean"
    else
      note "memcheck $exe${filter:+ $filter}: FAILED (rc $?)"
    fi
  done
  grep -E "ERROR SUMMARY" "$out/sanitize.log" | head
fi

# --- benchmarks ----------------------------------------------------------------------------------
if want bench; then
  # Only the summary (rewritten after each cell) and the per-run figures (bench-gpu.tsv) come back:
  # the device tool returns at most 8 files.
  KVF_BIN=$bin perf/bench-gpu.sh --out "$out/bench-gpu.md" ${BENCH_ARGS:-} "${bench_args[@]}" \
    2>&1 | tee "$out/bench.log" | tail -60
  note "bench: see bench-gpu.md"
fi
# --- codec quality on the GPU reference engine, and placement on what it measured ---------------
if want quality; then
  # QUALITY_PROMPTS x QUALITY_STEPS next tokens per codec after a 512-token compressed prefix.
  if "$bin/kvfabric-codec-quality" --gpu 0 --shape llama3-8b --prompts "${QUALITY_PROMPTS:-24}" --prefix-chunks 2 \
       --steps "${QUALITY_STEPS:-24}" --json "$out/quality.json" --profiles-out "$out/profiles.json" \
       >"$out/quality.log" 2>&1; then
    note "quality: $(grep -c . "$out/profiles.json") lines of profiles"
    grep -A20 "^codec " "$out/quality.log"
    "$bin/kvfabric-placement-bench" --profiles "$out/profiles.json" --json "$out/placement.json" \
      >"$out/placement.log" 2>&1 && note "placement: see placement.log" || note "placement: FAILED"
    tail -12 "$out/placement.log"
  else
    note "quality: FAILED (rc $?): $(tail -n 3 "$out/quality.log")"
  fi
fi
# --- host benches on this machine's cores --------------------------------------------------------
if want host; then
  # `ip` and `tc` from the carried Debian iproute2, run through the loader with its libraries, so
  # nothing that `ip netns exec` starts inherits them.
  netroot=$(mktemp -d) netbin=$(mktemp -d)
  for d in "$deps"/net-debs/*.deb; do dpkg -x "$d" "$netroot"; done
  for t in ip tc; do
    exe=$(ls "$netroot"/{bin,sbin,usr/bin,usr/sbin}/$t 2>/dev/null | head -1)
    [[ -n $exe ]] && printf '#!/bin/sh\nexec /lib64/ld-linux-x86-64.so.2 --library-path %s %s "$@"\n' \
      "$netroot/usr/lib/x86_64-linux-gnu:$netroot/lib/x86_64-linux-gnu" "$exe" >"$netbin/$t" && chmod +x "$netbin/$t"
  done
  if PATH=$netbin:$PATH KVF_BIN=$bin timeout 300 perf/bench-remote-fetch.sh --rounds "${HOST_ROUNDS:-7}" \
       >"$out/host-fetch.log" 2>&1; then
    note "host: remote fetch $(grep -E '^ratio' "$out/host-fetch.log")"
  else
    note "host: remote fetch FAILED (rc $?): $(tail -n 3 "$out/host-fetch.log")"
  fi
  # shellcheck disable=SC2086
  if KVF_BIN=$bin BENCH_TIMEOUT_S=60 timeout 300 perf/bench-pd-codec.sh --rounds "${HOST_ROUNDS:-7}" --iters 3 \
       ${PD_CODEC_ARGS:---workers 8 --slots 8 --slot-bytes 8M} >"$out/host-pd-codec.log" 2>&1; then
    note "host: compressed PD $(grep -E '^ratio' "$out/host-pd-codec.log" | head -1)"
  else
    note "host: compressed PD FAILED (rc $?): $(tail -n 3 "$out/host-pd-codec.log")"
  fi
  rm -rf "$netroot" "$netbin"
fi
echo "==== gpu-run summary ===="
printf '%s\n' "${summary[@]}"
[[ -f $out/bench-gpu.md ]] && cat "$out/bench-gpu.md"
exit 0
