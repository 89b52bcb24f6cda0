#!/usr/bin/env bash
# Debian's Chromium for the browser test of `lit-longctx serve` (tests/serve/test_browser.py drives it with
# Playwright; `playwright install` downloads its own browser build, which cannot be reached from CI). Idempotent.
set -euo pipefail
if [ ! -x /usr/lib/chromium/chromium ] && ! command -v chromium >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
