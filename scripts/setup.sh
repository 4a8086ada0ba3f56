#!/usr/bin/env bash
# One set-up path for the docs (docs/operations.md), CI and tests: Debian packages, the venv, /dev/kvm, the daemons.
# Idempotent: every step checks before it acts, so a second run takes about a second.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf 'setup: %s\n' "$*" >&2; }

DEB_PACKAGES=(
  libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-dev pkg-config
  qemu-system-x86 qemu-utils busybox-static cpio e2fsprogs nftables iproute2
  cloud-init kmod lz4
  slurm-wlm munge tini genisoimage
  # the lean micro kernel is compiled from Debian's linux-source (vmiso/image/lean.py), then
  # stripped (strip, from binutils) into the micro image
  gcc libc6-dev make flex bison bc perl libelf-dev libssl-dev xz-utils patch binutils
  # container images (vmiso/image/oci): skopeo transfers them; umoci and docker-registry are the
  # tests' reference unpacker and registry
  skopeo umoci docker-registry
  # Debian's own Python, which ordinary users can run: their client (client.sh) and the unit tier
  # run as an ordinary user (unit-as-user.sh) are venvs of it, the latter with compiled extensions
  python3 python3-venv python3-dev
)

if [ "$(id -u)" != 0 ]; then
  log "must run as root (installs Debian packages, starts libvirtd)"; exit 1
fi

missing=()
for p in "${DEB_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# /dev/kvm: group kvm, mode 0660, as udev sets it. Without this libvirt's capability cache never
# matches and every createXML re-probes QEMU (tens of seconds: docs/performance.md).
if [ -e /dev/kvm ]; then
  chgrp kvm /dev/kvm && chmod 0660 /dev/kvm
fi

# Daemons: systemd where it runs, by hand otherwise (virtlogd first: createXML needs its socket).
bash scripts/daemons.sh

# The venv with vmiso installed editable, extensions built. Re-run pip only when inputs changed.
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || { log "creating .venv"; "$PY" -m venv .venv; }
stamp=.venv/.vmiso-setup-stamp
inputs=$( (cat setup.py requirements-dev.txt vmiso/_fast/*.pyx 2>/dev/null || true) | sha256sum | cut -d" " -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$inputs" ]; then
  log "installing Python packages into .venv"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -r requirements-dev.txt
  .venv/bin/pip install -q --no-build-isolation -e .
  echo "$inputs" > "$stamp"
fi

# Local users (docs/operations.md, "The agent"). Members of group vmiso may run VMs through the agent.
getent group vmiso >/dev/null || { log "creating group vmiso"; groupadd --system vmiso; }
# A local user's QEMU runs as that user with QEMU's group (Isolator.launch(uid=)). libvirt gives
# every domain a 0750 directory of its own under /var/lib/libvirt/qemu, which Debian makes 0750
# too: such a QEMU cannot pass it to read its master key. Fedora's packaging makes it 0751.
[ -d /var/lib/libvirt/qemu ] && chmod o+x /var/lib/libvirt/qemu

# The client ordinary users run (/opt/vmiso, on PATH as /usr/local/bin/vmiso).
bash scripts/client.sh

# The agent's systemd unit where systemd runs (started by `make agent`, not here: see docs/operations.md).
if [ -d /run/systemd/system ]; then
  sed "s|@VMISO@|$PWD/.venv/bin/vmiso|" scripts/vmiso-agent.service > /etc/systemd/system/vmiso-agent.service
  systemctl daemon-reload
fi
log "ready"
