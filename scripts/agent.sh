#!/usr/bin/env bash
# Start, stop or show the vmiso agent of the default work dir without systemd (scripts/daemons.sh's
# habit): `bash scripts/agent.sh start|stop|status`. With systemd, systemctl does it (the unit is
# scripts/vmiso-agent.service). Options for the agent: $VMISO_AGENT_ARGS (e.g. "--policy FILE").
set -euo pipefail
cd "$(dirname "$0")/.."

SOCKET=${VMISO_AGENT_SOCKET:-/run/vmiso/agent.sock}
LOG=/var/log/vmiso-agent.log
log() { printf 'agent: %s\n' "$*" >&2; }
answers() { .venv/bin/python -c 'import sys; from vmiso.testing.agentd import answers; sys.exit(0 if answers(sys.argv[1]) else 1)' "$SOCKET"; }
pid() { .venv/bin/python -c 'import json,sys; print(json.load(open(sys.argv[1]))["pid"])' "${VMISO_WORKDIR:-/var/lib/vmiso}/agent.json" 2>/dev/null; }

if [ -d /run/systemd/system ]; then
  case "${1:-status}" in
    start) systemctl start vmiso-agent ;;
    stop) systemctl stop vmiso-agent ;;
    *) systemctl status vmiso-agent ;;
  esac
  exit
fi

case "${1:-status}" in
  start)
    if answers; then log "already serving on $SOCKET"; exit 0; fi
    bash scripts/daemons.sh
    log "starting vmiso agent on $SOCKET (log: $LOG)"
    # shellcheck disable=SC2086
    setsid .venv/bin/vmiso agent --socket "$SOCKET" ${VMISO_AGENT_ARGS:-} </dev/null >>"$LOG" 2>&1 &
    for _ in $(seq 1 300); do answers && exit 0; sleep 0.1; done
    log "the agent did not start serving within 30 s (see $LOG)"; exit 1 ;;
  stop)
    p=$(pid) || { log "not running"; exit 0; }
    answers || { log "not running"; exit 0; }
    kill -TERM "$p"
    for _ in $(seq 1 200); do kill -0 "$p" 2>/dev/null || exit 0; sleep 0.1; done
    log "pid $p did not stop within 20 s"; exit 1 ;;
  status)
    if answers; then log "serving on $SOCKET (pid $(pid))"; else log "not running"; exit 3; fi ;;
  *) log "usage: scripts/agent.sh start|stop|status"; exit 2 ;;
esac
