#!/usr/bin/env bash
# Prepares the browser tests (internal/browsertest) on a possibly fresh Debian
# machine, as root, without questions; safe to run again:
#   - Debian's chromium and libnss3-tools (certutil), when missing;
#   - examples/browser's npm packages, exactly as package-lock.json says;
#   - the page's bundle, examples/browser/dist.
# Chromium is Debian's: nothing here downloads a browser of its own.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive

missing=()
command -v certutil >/dev/null || missing+=(libnss3-tools)
[ -x /usr/lib/chromium/chromium ] || command -v chromium >/dev/null || missing+=(chromium)
command -v npm >/dev/null || missing+=(nodejs npm)
if [ ${#missing[@]} -gt 0 ]; then
  echo "browser-setup: installing ${missing[*]}"
  apt-get update -q
  apt-get install -y -q "${missing[@]}"
fi

cd examples/browser
# npm ci starts from an empty node_modules; skip it when the installed tree
# is the locked one already.
stamp=node_modules/.browser-setup.lock.sha256
if [ "$(cat "$stamp" 2>/dev/null)" != "$(sha256sum package-lock.json)" ]; then
  npm ci --no-audit --no-fund
  sha256sum package-lock.json >"$stamp"
fi
npm run --silent build
echo "browser-setup: $(/usr/lib/chromium/chromium --version 2>/dev/null || chromium --version 2>/dev/null); page built in examples/browser/dist"
