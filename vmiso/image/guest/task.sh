#!/bin/sh
# vmiso task wrapper (the guest side of the task contract; same file for micro and cloud-init).
# Usage: task.sh DIR. DIR holds the task as data, never as shell text: argv and env are files of
# base64 lines (one argument / one NAME=VALUE each), nonce is this launch's random marker.
# The task's stdout goes to the task channel (/dev/ttyS1), its stderr to /dev/ttyS2; the last
# thing written to the task channel is "VMISO-<nonce> EXIT <code>\n"; then the VM powers off (or
# resets, without ACPI). A line "VMISO-<nonce> TERM" read from the task channel (the host's stop
# request: vmiso kill with a grace period) sends SIGTERM to the task, as docker stop does;
# "VMISO-<nonce> SIG <n>" (n 1..64) sends signal n, the task's own stop signal.
# Data in: "volumes" lists host directories (virtio-9p tags) to mount before the task runs;
# "stdin" names the virtio-serial port that is the task's stdin (without it: /dev/null).
d=${1:?usage: task.sh DIR}
out=/dev/ttyS1
err=/dev/ttyS2
# Raw mode: no "\n" -> "\r\n" translation, so the host receives the task's bytes exactly.
for tty in "$out" "$err"; do stty -F "$tty" raw -echo 2>/dev/null; done
IFS= read -r nonce <"$d/nonce"  # a builtin: every fork counts under TCG

# decode B64: sets $v to the decoded bytes, trailing newlines included (the x guards them).
decode() { v=$(printf '%s' "$1" | base64 -d; echo x); v=${v%x}; }

# The task's environment is never exported into this shell: a task variable named like one of
# ours (d, out, err, nonce, workdir, PATH, IFS, ...) would change what the wrapper does. Its
# NAME=VALUE pairs go first in the positional parameters, then "--" (no pair is "--": every
# pair holds "="), then the argv; the shell that execs the task exports them last of all.
# A container image's task (the seed has "oci": uid gid groups hostname address, plain values
# vmiso checked): the image's root is /dev/vda. vmiso-exec reads the task's argv, env and
# working directory from $d itself (a decode here costs a fork per item), chroots into the
# image's root, adds /proc, /sys, /dev, /tmp, /etc/hostname and /etc/hosts, takes the task's
# user and working directory and execs the task; nothing of vmiso's is left in the task's view.
workdir=/
image_root=
set --
if [ -s "$d/oci" ]; then
  image_root=/run/vmiso/root
  IFS=' ' read -r uid gid groups host address dns <"$d/oci"
else
  if [ -s "$d/workdir" ]; then decode "$(cat "$d/workdir")"; workdir=$v; fi
  while IFS= read -r line; do decode "$line"; set -- "$@" "$v"; done < "$d/env"
  set -- "$@" --
  while IFS= read -r line; do decode "$line"; set -- "$@" "$v"; done < "$d/argv"
  unset line v
fi

# mount_volumes ROOT: each "TAG ro|rw BASE64(GUEST)" line of the seed's volumes file, mounted at
# ROOT/GUEST (ROOT: empty, or a container image's root), parents first. QEMU enforces ro on the
# host; the guest's option only makes writes fail early. msize: the largest the kernel's virtio
# transport takes (fewer, larger 9p requests); cache=mmap: reads and writes go straight to the
# host (what the task writes is there at once), and shared writable mmap works.
mount_volumes() {
  [ -s "$d/volumes" ] || return 0
  while IFS=' ' read -r tag mode path; do
    decode "$path"
    mkdir -p "$1$v" 2>"$err" &&
      mount -t 9p -o "trans=virtio,version=9p2000.L,msize=512000,cache=mmap,$mode" "$tag" "$1$v" 2>"$err" ||
      { echo "vmiso: cannot mount volume $tag at $v" >"$err"; return 1; }
  done <"$d/volumes"
}
# The stdin port: the virtio-serial port whose name the seed gives (/dev/vportNpM; no udev here).
stdin=/dev/null
if [ -s "$d/stdin" ]; then
  IFS= read -r port <"$d/stdin"
  for f in /sys/class/virtio-ports/*/name; do
    IFS= read -r name <"$f" && [ "$name" = "$port" ] && { p=${f%/name}; stdin=/dev/${p##*/}; }
  done
fi

# The stop listener: in the background, so the task itself runs in the foreground (a background
# command would start with SIGINT and SIGQUIT ignored). The task writes its own pid before it
# execs, for the listener to signal it and nothing else.
pidfile=/run/vmiso-task.pid
: >"$pidfile"
# Only the two request lines count, the signal a number 1..64 matched by pattern (no arithmetic,
# no eval): anything else on the channel's input is ignored.
listen_for_stop() {
  while IFS= read -r line; do
    case $line in
      "VMISO-$nonce TERM") sig=TERM ;;
      "VMISO-$nonce SIG "[1-9] | "VMISO-$nonce SIG "[1-5][0-9] | "VMISO-$nonce SIG "6[0-4]) sig=${line##* } ;;
      *) continue ;;
    esac
    if IFS= read -r pid <"$pidfile" && [ -n "$pid" ]; then
      kill -"$sig" "$pid" 2>/dev/null
    fi
  done <"$out"
}
listen_for_stop &
listener=$!

# report_exit CODE: the exit line, the last bytes of the task channel. The listener is killed
# and reaped first: busybox's sh catches SIGCHLD without SA_RESTART, so a child that ends while
# the line is being written interrupts the write (EINTR) and the line is lost without a word.
# SIGKILL, because an ignored SIGTERM is inherited and "wait" would then never return.
report_exit() {
  kill -KILL "$listener" 2>/dev/null
  wait "$listener" 2>/dev/null
  printf 'VMISO-%s EXIT %d\n' "$nonce" "$1" >"$out"
}

ready=yes
if [ -n "$image_root" ]; then
  mkdir -p "$image_root" && mount -t ext4 /dev/vda "$image_root" 2>"$err" || ready=no
fi
if [ "$ready" = yes ] && mount_volumes "$image_root" && cd "$workdir" 2>"$err"; then
  echo VMISO-TASK-START >/dev/ttyS0 2>/dev/null  # the host's "task started" marker (vmiso bench)
  if [ -n "$image_root" ]; then
    /usr/lib/vmiso/vmiso-exec "$d" "$image_root" "$pidfile" "$uid" "$gid" "$groups" "$host" "$address" "$dns" \
      <"$stdin" >"$out" 2>"$err"
  else
    # $$ and "$@" belong to the inner shell, which uses no variable of its own: it exports the
    # pairs up to "--" and execs the rest (the task's PATH finds the command, as in docker). No
    # pid file (a read-only /run): the task runs anyway, only without a graceful stop.
    sh -c 'echo $$ >"$0" 2>/dev/null
      while [ "$1" != -- ]; do export "$1"; shift; done; shift
      exec "$@"' "$pidfile" "$@" <"$stdin" >"$out" 2>"$err"
  fi
  code=$?
else
  code=126
fi
: >"$pidfile"  # the task is gone: a late stop request must not hit a reused pid
report_exit "$code"
# stty applies its settings with TCSADRAIN: it returns once both ports have sent every byte.
stty -F "$out" raw 2>/dev/null
stty -F "$err" raw 2>/dev/null
sync
# A kernel without ACPI (micro's lean one) cannot power off, only halt: it resets instead, and
# vmiso's domains (on_reboot=destroy) end on a reset just as on a power-off.
[ -d /sys/firmware/acpi ] && poweroff -f
reboot -f
