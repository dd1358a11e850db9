#!/usr/bin/env bash
# The project's one test command (README, .ci/run): install, then run every test.
# nginx, Prometheus, Chromium and a Java runtime (Spark) come from Debian's packages where apt-get can install them;
# the tests that need them skip with a visible reason where they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m pip install -q -e '.[dev]'

if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  missing=()
  command -v nginx >/dev/null 2>&1 || missing+=(nginx)
  command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)
  command -v envsubst >/dev/null 2>&1 || missing+=(gettext-base)
  command -v java >/dev/null 2>&1 || missing+=(default-jre-headless)  # Spark's tests
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]} from Debian's packages"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
       --no-install-recommends "${missing[@]}" >/dev/null) \
      || echo "could not install ${missing[*]}: the tests that need them will skip"
  fi
fi

ruff check .
if [ "$#" -gt 0 ]; then
  python3 -m pytest "$@"
  exit
fi
# One pytest process per test module. A single process that had run every module's servers,
# OpenVINO and ONNX Runtime networks and compiled kernels died with SIGSEGV inside the
# interpreter two thirds of the way through (always at the same test, never when that module
# ran alone): a native library's state spoiled by the modules before. Until that is found,
# modules do not share a process (about a minute more in all).
status=0
for module in tests/test_*.py; do
  python3 -m pytest -q "$module" || status=1
done
exit "$status"
