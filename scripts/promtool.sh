#!/usr/bin/env bash
# Install Debian's prometheus package for its promtool (the tests check deploy/'s rules and config
# with it). The package also installs a Prometheus server and may start it: stop it again, so
# nothing keeps running (or holds port 9090) after the install.
set -euo pipefail
if command -v promtool >/dev/null 2>&1; then
  echo "promtool: $(promtool --version 2>&1 | head -1)"
  exit 0
fi
echo "promtool: installing Debian's prometheus package"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# policy-rc.d exit 101: "do not start services" while the package installs.
policy=/usr/sbin/policy-rc.d
made_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && made_policy=1
fi
trap '[ "$made_policy" = 1 ] && rm -f "$policy"' EXIT
apt-get install -y -qq --no-install-recommends prometheus >/dev/null
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
  systemctl stop prometheus
fi
promtool --version 2>&1 | head -1
