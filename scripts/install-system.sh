#!/usr/bin/env bash
# Best-effort system packages for the tests: Debian's prometheus (server and promtool)
# and prometheus-alertmanager (amtool, to check deploy/alertmanager). Without root or apt the tests that need them say so and skip.
# Under CI=true (or 1) those tests fail instead of skipping, so here a failed install is an
# error (exit 1, which stops scripts/test.sh and .ci/run) rather than a warning.
set -uo pipefail
TOOLS="prometheus promtool amtool"
missing() {
  local m="" t
  for t in $TOOLS; do command -v "$t" >/dev/null || m="$m $t"; done
  echo "${m# }"
}
case "${CI:-}" in true|TRUE|True|1) ci=1 ;; *) ci=0 ;; esac
if [ -z "$(missing)" ]; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  if (apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus prometheus-alertmanager) >/tmp/graceful-apt.log 2>&1; then
    echo "installed prometheus $(prometheus --version 2>&1 | head -1)"
    why="apt-get install prometheus prometheus-alertmanager did not provide: $(missing)"
  else
    why="apt-get install prometheus prometheus-alertmanager failed (see /tmp/graceful-apt.log); missing: $(missing)"
  fi
else
  why="$(missing) not installed and no root/apt-get to install them (apt-get install prometheus prometheus-alertmanager)"
fi
if [ -n "$(missing)" ]; then
  if [ "$ci" = 1 ]; then
    echo "error: CI=${CI}: $why; the tests that need them would fail" >&2
    exit 1
  fi
  echo "warning: $why; their tests will skip" >&2
fi
# The package starts a system service on :9090 where systemd runs; tests use their own ports.
exit 0
