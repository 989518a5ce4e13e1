#!/usr/bin/env bash
# fetch-gpu-deps.sh: gathers, on this (networked) machine, what the GPU machine lacks to build and
# run kvfabric, into .gpu-deps/ (git-ignored; carried by the device call):
#   - UCX built with CUDA (PyPI's libucx-cu13 wheel: headers, libraries, ucx_perftest). The GPU
#     machine's own UCX 1.16 runtime has no headers and no CUDA transports.
#   - xxhash headers (Debian's libxxhash-dev and libxxhash0; the GPU machine has neither).
#   - iproute2 (ip, tc) and the libraries it links, for the host benches between network
#     namespaces (gpu-run.sh's host phase): the GPU machine has no `ip`.
# Static archives and duplicate .so copies are dropped so the carried tree stays small.
# Idempotent: does nothing when .gpu-deps/READY exists (delete it to refetch).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
deps=$root/.gpu-deps
[[ -f $deps/READY ]] && { echo "fetch-gpu-deps: $deps is ready"; exit 0; }
rm -rf "$deps" && mkdir -p "$deps/debs"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

echo "fetch-gpu-deps: downloading libucx-cu13 from PyPI"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d "$tmp" "libucx-cu13==1.22.0"
(cd "$tmp" && unzip -q libucx_cu13-*.whl 'libucx/*' 'libucx_cu13.libs/*')
mkdir -p "$deps/libucx/lib/ucx" "$deps/libucx/bin"
cp -r "$tmp/libucx/include" "$deps/libucx/"
cp -r "$tmp/libucx_cu13.libs" "$deps/"
cp "$tmp"/libucx/bin/{ucx_perftest,ucx_info} "$deps/libucx/bin/"
cp -r "$tmp/libucx/etc" "$deps/libucx/"
# One file per library (the wheel stores .so, .so.0 and .so.0.0.0 as three copies); the links are
# made again on the GPU machine by scripts/gpu-run.sh.
for f in "$tmp"/libucx/lib/*.so.0.0.0; do cp "$f" "$deps/libucx/lib/"; done
for f in "$tmp"/libucx/lib/ucx/*.so.0.0.0; do cp "$f" "$deps/libucx/lib/ucx/"; done
cp -r "$tmp/libucx/lib/pkgconfig" "$deps/libucx/lib/"

echo "fetch-gpu-deps: downloading Debian's libxxhash-dev"
(cd "$deps/debs" && apt-get download -q libxxhash-dev libxxhash0 >/dev/null)
echo "fetch-gpu-deps: downloading Debian's iproute2 and its libraries"
mkdir -p "$deps/net-debs"
(cd "$deps/net-debs" && apt-get download -q iproute2 libbpf1 libelf1 libmnl0 libcap2 libdb5.3 libtirpc3 \
  libxtables12 libselinux1 libpcre2-8-0 libgssapi-krb5-2 libkrb5-3 libk5crypto3 libkrb5support0 libkeyutils1 \
  libcom-err2 >/dev/null)
touch "$deps/READY"
du -sh "$deps"
