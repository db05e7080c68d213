#!/usr/bin/env bash
# Optional extra prose for the default corpus: Debian's Python documentation sources (~11 MB of
# English, PSF licence). Installed only where apt-get can run as root; otherwise the corpus is
# built without it. Set CORPUS_APT=0 to never try.
set -u
[ "${CORPUS_APT:-1}" = "0" ] && exit 0
ls -d /usr/share/doc/python3*/html/_sources >/dev/null 2>&1 && exit 0
command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ] || { echo "note: Python docs not installed (needs apt-get as root); corpus built without them"; exit 0; }
pkg=$(apt-cache search --names-only '^python3\.[0-9]+-doc$' 2>/dev/null | awk '{print $1}' | sort -V | tail -1)
if [ -z "$pkg" ]; then
  apt-get update -qq >/dev/null 2>&1 || true
  pkg=$(apt-cache search --names-only '^python3\.[0-9]+-doc$' 2>/dev/null | awk '{print $1}' | sort -V | tail -1)
fi
[ -n "$pkg" ] || { echo "note: no python3.X-doc package found; corpus built without it"; exit 0; }
echo "installing $pkg for the default corpus's natural-language part"
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$pkg" >/dev/null 2>&1 \
  || echo "note: could not install $pkg; corpus built without it"
exit 0
