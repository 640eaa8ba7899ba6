#!/usr/bin/env bash
# make setup: install everything xtransit needs on Debian 12, as root. Idempotent: a second run
# installs nothing, relinks nothing and rebuilds nothing unless an input changed.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=$ROOT/.venv

APT_PACKAGES=(
  # bcc and its Python module (Debian's, not PyPI's unrelated `bcc`), BPF toolchain
  python3-bpfcc libbpfcc-dev bpfcc-tools clang llvm libbpf-dev libxdp-dev xdp-tools bpftool
  # native module build
  gcc make pkg-config libssl-dev python3-dev python3-venv
  # network tooling used by tests, demo and benchmarks
  iproute2 iputils-ping tcpdump netsniff-ng iperf3 nftables ethtool
  # strongSwan test peer (../shared/peers/strongswan/README.md)
  strongswan-charon strongswan-swanctl libcharon-extra-plugins
  libstrongswan-standard-plugins libstrongswan-extra-plugins
  # shared state across nodes
  etcd-server etcd-client
  # headers for bcc when the running kernel has none
  linux-headers-amd64
)

say() { printf 'setup: %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
  say "must run as root (apt-get, kernel headers link)"; exit 1
fi

# --- apt: only what is missing --------------------------------------------------------------
missing=()
for p in "${APT_PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null | grep -qx installed; then
    missing+=("$p")
  fi
done
if [ ${#missing[@]} -gt 0 ]; then
  say "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- kernel headers for bcc -----------------------------------------------------------------
KREL=$(uname -r)
if [ ! -e "/lib/modules/$KREL/build" ]; then
  hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
  if [ -z "$hdr" ]; then say "no /usr/src/linux-headers-*-amd64 after installing linux-headers-amd64"; exit 1; fi
  common=${hdr%-amd64}-common
  mkdir -p "/lib/modules/$KREL"
  ln -sfn "$hdr" "/lib/modules/$KREL/build"
  [ -e "/lib/modules/$KREL/source" ] || ln -sfn "$common" "/lib/modules/$KREL/source"
  say "no headers for kernel $KREL: linked build -> $hdr, source -> $common"
fi

# --- virtualenv -----------------------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV"
  /usr/bin/python3 -m venv "$VENV"
fi
# bcc from Debian, and nothing else of Debian's dist-packages: a folder holding only `bcc`.
BCC_DIR=$VENV/debian-bcc
PYVER=$("$VENV/bin/python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
PTH=$VENV/lib/python$PYVER/site-packages/xtransit-debian-bcc.pth
if [ "$(readlink "$BCC_DIR/bcc" 2>/dev/null)" != /usr/lib/python3/dist-packages/bcc ]; then
  mkdir -p "$BCC_DIR"
  ln -sfn /usr/lib/python3/dist-packages/bcc "$BCC_DIR/bcc"
  say "linked Debian's bcc into the virtualenv"
fi
if [ "$(cat "$PTH" 2>/dev/null)" != "$BCC_DIR" ]; then
  echo "$BCC_DIR" > "$PTH"
fi

# --- the project, editable, with dev extras; the native modules are built by this install ---
# Rebuilt only when an input changed (hash of pyproject, setup.py and native/ sources).
stamp=$VENV/.xtransit-install
want=$(cat pyproject.toml setup.py $(ls native/*.c native/*.h native/*.py 2>/dev/null) | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "pip install -e .[dev]"
  log=$VENV/pip-install.log
  if ! "$VENV/bin/pip" install -q --disable-pip-version-check -e ".[dev]" >"$log" 2>&1; then
    grep -v '^WARNING: Location' "$log" | tail -n 40; say "pip install failed (full log: $log)"; exit 1
  fi
  "$VENV/bin/python" -c 'import pipeline' >/dev/null
  echo "$want" > "$stamp"
fi
say "ready"
