#!/usr/bin/env bash
# Installs the Debian packages kvfabric builds and tests with. Idempotent: when everything is
# present it only checks (no apt-get update), so it is quick on a machine that has run it.
set -euo pipefail

packages=(
  build-essential cmake ninja-build pkg-config git
  libucx-dev ucx-utils libibverbs-dev librdmacm-dev
  libboost-dev libcxxopts-dev catch2 libyaml-cpp-dev libspdlog-dev libfmt-dev nlohmann-json3-dev
  libxxhash-dev libzstd-dev liblz4-dev
  clang libclang-rt-14-dev clang-format
  iproute2 procps python3 curl valgrind
  python3-dev pybind11-dev  # the kvfabric Python module (python/)
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if ((${#missing[@]} == 0)); then
  echo "setup-deps: all ${#packages[@]} packages present"
  exit 0
fi

echo "setup-deps: installing ${missing[*]}"
sudo_cmd=()
if [[ $(id -u) -ne 0 ]]; then sudo_cmd=(sudo); fi
export DEBIAN_FRONTEND=noninteractive
"${sudo_cmd[@]}" apt-get update -qq
"${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
echo "setup-deps: done"
