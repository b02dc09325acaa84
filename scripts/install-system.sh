#!/usr/bin/env bash
# Best-effort system packages for the tests: Debian's prometheus (server and promtool),
# prometheus-alertmanager (amtool, to check deploy/alertmanager), redis-server (the
# Redis prediction log is tested against a real server) and postgresql (so is the
# PostgreSQL registry; Debian keeps its server binaries in /usr/lib/postgresql/*/bin). Without root or apt the tests
# that need them say so and skip.
# Under CI=true (or 1) those tests fail instead of skipping, so here a failed install is an
# error (exit 1, which stops scripts/test.sh and .ci/run) rather than a warning.
set -uo pipefail
TOOLS="prometheus promtool amtool redis-server initdb postgres"
PACKAGES="prometheus prometheus-alertmanager redis-server postgresql"
missing() {
  local m="" t
  for t in $TOOLS; do
    command -v "$t" >/dev/null || compgen -G "/usr/lib/postgresql/*/bin/$t" >/dev/null || m="$m $t"
  done
  echo "${m# }"
}
case "${CI:-}" in true|TRUE|True|1) ci=1 ;; *) ci=0 ;; esac
if [ -z "$(missing)" ]; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  # $PACKAGES unquoted: one word per package
  if (apt-get update -qq && apt-get install -y -qq --no-install-recommends $PACKAGES) >/tmp/graceful-apt.log 2>&1; then
    echo "installed $(prometheus --version 2>&1 | head -1); $(redis-server --version 2>&1 | head -1)"
    why="apt-get install $PACKAGES did not provide: $(missing)"
  else
    why="apt-get install $PACKAGES failed (see /tmp/graceful-apt.log); missing: $(missing)"
  fi
else
  why="$(missing) not installed and no root/apt-get to install them (apt-get install $PACKAGES)"
fi
if [ -n "$(missing)" ]; then
  if [ "$ci" = 1 ]; then
    echo "error: CI=${CI}: $why; the tests that need them would fail" >&2
    exit 1
  fi
  echo "warning: $why; their tests will skip" >&2
fi
# The packages start system services (prometheus on :9090, redis-server on :6379,
# postgresql on :5432) where systemd runs; tests start their own on free ports.
exit 0
