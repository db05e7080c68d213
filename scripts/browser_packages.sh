#!/usr/bin/env bash
# Headless Chromium for the demo's browser test (tests/test_demo.py): Debian's `chromium` and
# `chromium-driver`, installed only where apt-get can run as root; elsewhere that one test skips
# and says why. Set BROWSER_APT=0 to never try.
set -u
[ "${BROWSER_APT:-1}" = "0" ] && exit 0
command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 && exit 0
command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ] \
  || { echo "note: no Chromium and no root apt-get: the demo's browser test will skip"; exit 0; }
echo "installing Debian's chromium + chromium-driver for the demo's browser test"
if ! apt-cache show chromium-driver >/dev/null 2>&1; then apt-get update -qq >/dev/null 2>&1 || true; fi
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null 2>&1 \
  || echo "note: could not install chromium; the demo's browser test will skip"
exit 0
