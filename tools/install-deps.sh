#!/usr/bin/env bash
# Installs the Debian packages cowtap needs to build, test and run. Idempotent:
# asks dpkg first and runs apt-get only for what is missing.
# The list includes clang and its runtime for `make fuzz`.
set -euo pipefail

packages=(
  build-essential cmake ninja-build pkg-config
  libxen-dev libspdlog-dev libfmt-dev libgtest-dev libgmock-dev libbenchmark-dev
  liburing-dev zlib1g-dev libzstd-dev libcli11-dev nlohmann-json3-dev
  qemu-utils clang libclang-rt-14-dev
  libsystemd-dev
  libnbd-bin fio
  libdevmapper-dev
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

echo "install-deps: installing ${missing[*]}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null; then SUDO=sudo; else
    echo "install-deps: need root (or sudo) to install: ${missing[*]}" >&2; exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
