#!/usr/bin/env bash
# The unit tier as an ordinary user with no libvirtd in reach: proves that `pytest -m "not system"`
# needs neither root nor a daemon (issue #17). Run as root (`make test-unit-user`); it
#  - creates the user vmiso-unit (useradd -m) if missing, and checks it is in no group that reaches
#    libvirt, /dev/kvm or the vmiso agent;
#  - keeps a venv from Debian's /usr/bin/python3 in /opt/vmiso-unit (root's Python, under /root, is
#    out of an ordinary user's reach) with the unit tier's packages (requirements-dev.txt without
#    the linters) and vmiso's Cython extensions built by that Python; each is redone only when its
#    inputs change (a second run spends its time in the tests alone);
#  - copies the working tree (tracked and untracked, not ignored files: what `git status` shows,
#    uncommitted edits included) into a fresh directory the user owns, adds the extensions;
#  - runs the unit tier there as that user, with the extensions and with VMISO_NO_EXTENSIONS=1,
#    in a mount namespace whose /run/libvirt and /run/vmiso are empty tmpfs and with
#    LIBVIRT_AUTOSTART=0 (no per-user libvirtd is spawned): a test that silently needs libvirtd
#    (or a running agent) fails here.
# Prints each variant's wall time. Extra arguments go to pytest (e.g. --durations=20).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf 'unit-as-user: %s\n' "$*" >&2; }
USER_NAME=${VMISO_UNIT_USER:-vmiso-unit}
PREFIX=${VMISO_UNIT_PREFIX:-/opt/vmiso-unit}
PY=/usr/bin/python3

if [ "$(id -u)" != 0 ]; then
  log "must run as root (creates the user, the venv under $PREFIX, a mount namespace)"; exit 1
fi

# Debian's own Python with venv and headers, qemu-img, busybox and the compiler come from
# setup.sh, which `make test-unit-user` runs first.

id "$USER_NAME" >/dev/null 2>&1 || { log "creating user $USER_NAME"; useradd -m -s /bin/bash "$USER_NAME"; }
home=$(getent passwd "$USER_NAME" | cut -d: -f6)

umask 022
pyver=$("$PY" -c 'import sys; print(sys.version)')
# The packages: the unit tier imports vmiso's runtime dependencies, pytest and hypothesis; the
# linters (ruff, mypy) are `make lint`'s, run from root's venv.
reqs=$(grep -v -E '^(ruff|mypy)\b' requirements-dev.txt)
deps_in=$(printf '%s\n%s\n' "$pyver" "$reqs" | sha256sum | cut -d" " -f1)
if [ ! -f "$PREFIX/.deps-stamp" ] || [ "$(cat "$PREFIX/.deps-stamp")" != "$deps_in" ]; then
  log "installing the unit tier's packages into $PREFIX"
  [ -x "$PREFIX/bin/python" ] || "$PY" -m venv "$PREFIX"
  printf '%s\n' "$reqs" > "$PREFIX/requirements.txt"
  "$PREFIX/bin/pip" install -q -r "$PREFIX/requirements.txt"
  rm -f "$PREFIX/.ext-stamp"  # a new Cython or Python: rebuild the extensions
  echo "$deps_in" > "$PREFIX/.deps-stamp"
fi

# The working tree as git sees it: tracked files that exist and untracked ones not ignored.
export_tree() {
  git ls-files -z --cached --others --exclude-standard \
    | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
    | tar --null -T - -cf - | tar -xf - -C "$1"
}

# A short path: pytest's tmp_path is under it (--basetemp), and a test's unix sockets must fit in
# 108 bytes (/tmp/pytest-of-vmiso-unit/pytest-N/ would be 6 bytes longer than root's).
run=$(mktemp -d /tmp/vu.XXXXXX)
trap 'rm -rf "$run"' EXIT

ext_in=$( (echo "$pyver"; cat setup.py vmiso/_fast/*.pyx; cat vmiso/_fast/*.pxd 2>/dev/null || true) \
  | sha256sum | cut -d" " -f1)
if [ ! -f "$PREFIX/.ext-stamp" ] || [ "$(cat "$PREFIX/.ext-stamp")" != "$ext_in" ]; then
  log "building the Cython extensions with $PY"
  mkdir "$run/build"
  export_tree "$run/build"
  (cd "$run/build" && "$PREFIX/bin/python" setup.py -q build_ext --inplace >/dev/null)
  rm -rf "$PREFIX/ext" && mkdir "$PREFIX/ext"
  cp "$run/build"/vmiso/_fast/*.so "$PREFIX/ext/"
  rm -rf "$run/build"
  echo "$ext_in" > "$PREFIX/.ext-stamp"
fi

tree=$run/tree
mkdir "$tree"
export_tree "$tree"
cp "$PREFIX"/ext/*.so "$tree/vmiso/_fast/"
chown -R "$USER_NAME:" "$run"

# As the user, with a clean environment; vmiso is imported from the copy (PYTHONPATH reaches the
# tests' own `python -m vmiso` subprocesses too), never from an installed one. libvirtd's sockets
# and a running vmiso agent's (/run/vmiso, made 0755 as the agent makes it) are hidden.
mkdir -p /run/libvirt /run/vmiso
as_user() {
  # shellcheck disable=SC2016  # $0, $1 and $@ are the inner shell's
  unshare --mount --propagation private -- sh -c '
    for d in /run/libvirt /run/vmiso; do mount -t tmpfs -o mode=0755,size=1m vmiso-unit-hidden "$d" || exit; done
    cd "$0" && u=$1 && shift && exec runuser -u "$u" -- "$@"' "$tree" "$USER_NAME" \
    env -i HOME="$home" USER="$USER_NAME" LOGNAME="$USER_NAME" LANG=C.UTF-8 \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONPATH="$tree" LIBVIRT_AUTOSTART=0 "$@"
}

# The copy must be what runs, with its extensions, as someone who cannot reach libvirtd.
check='import grp, os, vmiso, vmiso._fast as f, libvirt
assert os.geteuid() != 0
groups = {grp.getgrgid(g).gr_name for g in os.getgroups()}
assert not groups & {"root", "libvirt", "libvirt-qemu", "kvm", "vmiso"}, groups
assert vmiso.__file__.startswith(os.environ["PYTHONPATH"] + "/"), vmiso.__file__
for pyx in os.listdir(os.path.dirname(f.__file__)):
    if pyx.endswith(".pyx"):
        assert f.implementation(pyx[:-4]) == "cython", pyx
try:
    libvirt.open("qemu:///system")
except libvirt.libvirtError:
    pass
else:
    raise SystemExit("libvirtd answered the unprivileged user")'
if ! out=$(as_user "$PREFIX/bin/python" -c "$check" 2>&1); then
  printf '%s\n' "$out" >&2; log "the test user's set-up is wrong"; exit 1
fi

status=0
for variant in extensions no-extensions; do
  extra=()
  [ "$variant" = no-extensions ] && extra=(VMISO_NO_EXTENSIONS=1)
  log "unit tier as $USER_NAME ($variant)"
  start=$EPOCHREALTIME
  as_user "${extra[@]}" "$PREFIX/bin/python" -m pytest -q -m "not system" --basetemp="$run/t" tests "$@" || status=1
  log "$variant: $(awk "BEGIN { printf \"%.1f\", $EPOCHREALTIME - $start }") s wall as $USER_NAME"
done
exit $status
