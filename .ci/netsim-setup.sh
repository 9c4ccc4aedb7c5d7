#!/usr/bin/env bash
# Prepares the simulated-internet tests (internal/netsim) on a possibly fresh
# Debian machine, as root, without questions; safe to run again: ip(8) and
# nft(8), when missing. The tests create network namespaces of their own and
# fail in CI (CI=true) where they cannot.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

missing=()
command -v ip >/dev/null || missing+=(iproute2)
command -v nft >/dev/null || missing+=(nftables)
if [ ${#missing[@]} -gt 0 ]; then
  echo "netsim-setup: installing ${missing[*]}"
  apt-get update -q
  apt-get install -y -q "${missing[@]}"
fi
echo "netsim-setup: $(ip -V); $(nft --version)"
