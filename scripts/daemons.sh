#!/usr/bin/env bash
# Start virtlogd and libvirtd when they are not running, then wait until libvirtd really answers
# (a socket file left by a killed daemon is no proof). Used by setup.sh and by tests that kill it.
#
# Without systemd, libvirtd runs under tini as a subreaper. QEMU processes are orphans (libvirt
# daemonises them), so whoever reaps orphans decides how soon libvirt sees a VM gone: on hosts
# whose PID 1 reaps late (some container and microVM inits; docs/performance.md) that delay was
# added to every task's teardown. tini reaps at once.
set -euo pipefail

log() { printf 'daemons: %s\n' "$*" >&2; }

if [ -d /run/systemd/system ]; then
  systemctl start virtlogd libvirtd
else
  if ! pgrep -x virtlogd >/dev/null; then
    log "starting virtlogd"
    virtlogd -d
  fi
  if ! pgrep -x libvirtd >/dev/null; then
    log "starting libvirtd (under tini, a prompt subreaper)"
    mkdir -p /var/log/libvirt
    setsid tini -s -- libvirtd </dev/null >>/var/log/libvirt/libvirtd-vmiso.log 2>&1 &
  fi
fi

for _ in $(seq 1 300); do
  virsh -c qemu:///system version >/dev/null 2>&1 && exit 0
  sleep 0.1
done
log "libvirtd does not answer on qemu:///system (see /var/log/libvirt/libvirtd-vmiso.log)"
exit 1
