#!/usr/bin/env bash
# Install Debian's chromium package (the headless browser of the console's
# end-to-end tests, driven by Playwright through executable_path; Playwright
# never downloads a browser here). Idempotent: run it again and it only checks.
# Used by .ci/run and by the test set-up when /usr/bin/chromium is missing.
set -euo pipefail

say() { echo "chromium: $*" >&2; }

if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    say "install Debian's chromium package (as root: apt-get install -y chromium)"
    exit 1
  fi
  say "installing chromium from Debian's packages"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
# It must start headless (as root it needs --no-sandbox, as the tests pass it).
/usr/bin/chromium --headless --no-sandbox --disable-gpu --disable-background-networking --no-first-run \
  --dump-dom about:blank >/dev/null 2>&1 || { say "/usr/bin/chromium does not start headless"; exit 1; }
say "$(/usr/bin/chromium --version)"
