#!/usr/bin/env bash
# Install the vmiso client ordinary users run: a venv made from Debian's /usr/bin/python3 (the
# machine's own Python may be out of their reach, e.g. under /root), holding vmiso alone (the
# client needs no libvirt; no extensions), readable by everyone, linked as /usr/local/bin/vmiso.
# Idempotent: reinstalls only when vmiso's sources changed. Run by setup.sh and the system tests.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf 'client: %s\n' "$*" >&2; }
CLIENT=${VMISO_CLIENT_PREFIX:-/opt/vmiso}
inputs=$( (cat setup.py; find vmiso -name '*.py' -o -name '*.sh' | sort | xargs cat) | sha256sum | cut -d" " -f1)
if [ ! -f "$CLIENT/.vmiso-client-stamp" ] || [ "$(cat "$CLIENT/.vmiso-client-stamp")" != "$inputs" ]; then
  log "installing the client for ordinary users into $CLIENT"
  umask 022
  [ -x "$CLIENT/bin/python" ] || /usr/bin/python3 -m venv "$CLIENT"
  out=$(VMISO_NO_EXTENSIONS=1 "$CLIENT/bin/pip" install -q --no-deps --no-build-isolation --no-index \
    --force-reinstall . 2>&1) || { printf '%s\n' "$out" >&2; exit 1; }
  # pip's notice about setup.py installs concerns packaging, not this install: kept out of the log
  printf '%s\n' "$out" | grep -v -e "DEPRECATION: vmiso is being installed using the legacy" -e '^$' >&2 || true
  "$CLIENT/bin/vmiso" --help >/dev/null  # fails the install if the client cannot start
  echo "$inputs" > "$CLIENT/.vmiso-client-stamp"
fi
# On PATH for everyone, unless something else is there already.
if [ ! -e /usr/local/bin/vmiso ] || [ "$(readlink /usr/local/bin/vmiso)" = "$CLIENT/bin/vmiso" ]; then
  ln -sfn "$CLIENT/bin/vmiso" /usr/local/bin/vmiso
fi
