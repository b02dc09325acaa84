#!/usr/bin/env bash
# Best-effort system packages for the tests: Debian's prometheus (server and promtool)
# and prometheus-alertmanager (amtool, to check deploy/alertmanager). Without root or apt the tests that need them say so and skip.
set -uo pipefail
if command -v prometheus >/dev/null && command -v promtool >/dev/null && command -v amtool >/dev/null; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  (apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus prometheus-alertmanager) >/tmp/graceful-apt.log 2>&1 \
    && echo "installed prometheus $(prometheus --version 2>&1 | head -1)" \
    || echo "warning: could not install prometheus (see /tmp/graceful-apt.log); its tests will skip" >&2
else
  echo "note: prometheus not installed and no root/apt; its tests will skip" >&2
fi
# The package starts a system service on :9090 where systemd runs; tests use their own ports.
exit 0
