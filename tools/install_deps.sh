#!/usr/bin/env bash
# Installs ftune's build and test dependencies from Debian/Ubuntu packages (needs root
# or sudo). Safe to run again: apt-get skips what is already installed.
set -euo pipefail
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
PKGS=(
  build-essential cmake ninja-build pkg-config
  libopenmpi-dev openmpi-bin
  libhdf5-dev hdf5-tools
  libtomlplusplus-dev libcli11-dev doctest-dev nlohmann-json3-dev
  libpcre2-dev libutf8proc-dev
  python3 python3-numpy python3-matplotlib
  slurmctld slurmd slurm-client munge
)
# FTUNE_CUDA_COMPILE_CHECK=1 (CI): also Debian's CUDA 11.8 toolkit and its host compiler, for
# tools/ci_compile_cuda.sh. They live in Debian's contrib/non-free components, which this adds.
if [ "${FTUNE_CUDA_COMPILE_CHECK:-0}" = 1 ]; then
  PKGS+=(nvidia-cuda-toolkit g++-11)
  if ! dpkg-query -W -f='${Status}' nvidia-cuda-toolkit 2>/dev/null | grep -q "install ok installed"; then
    . /etc/os-release
    if [ "${ID:-}" = debian ]; then
      echo "[ftune] enabling Debian contrib/non-free for nvidia-cuda-toolkit"
      printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: %s\nComponents: contrib non-free\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
        "$VERSION_CODENAME" | $SUDO tee /etc/apt/sources.list.d/ftune-cuda.sources > /dev/null
    fi
  fi
fi
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "[ftune] installing: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
