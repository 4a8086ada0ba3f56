"""Batch reader of every VM's counters (procfs, cgroup v1/v2, /proc/net/dev), pure Python
(twin of vmiso/_fast/stats.pyx: same names, same results, same errors).

A ``VM`` holds open file descriptors (opened once, read with pread at offset 0 on every call)
and says what each file is: a kind (how to parse it) and, for one-number files, the slot of the
record it fills. ``read_batch(vms, out, net_fd)`` fills ``out`` (int64, ``len(vms) * NFIELDS``)
with one record per VM, -1 where a value is not available, and returns ``[(index, StatsError)]``
for the VMs that could not be read: one vanished VM never fails the others.

Limits are not counters: a file whose kind carries ``K_LIMIT`` (the CFS quota and period,
memory.max) changes only when someone changes the limit, so it is read when the VM is opened
and again by ``VM.refresh_limits()``, never by ``read_batch``, which copies the values kept from
the last read into the record. The caller decides when to refresh (the Collector: after vmiso's
own update() and every LIMITS_TTL seconds, see accounting/usage.py).

Network counters come from one read of /proc/net/dev per batch (the kernel's dev_get_stats, as
/sys/class/net/<if>/statistics/* shows them), turned into the guest's point of view: what its
tap receives, the guest sent.
"""
import os

from vmiso.errors import StatsError

# The slots, kinds and limits (layout.py): this module's names, as they are stats.pyx's.
from .layout import *  # noqa: F403
from .layout import (  # the names used here
    BUF_SIZE,
    CPU_KEYS,
    F_CFS_PERIOD_US,
    F_CFS_QUOTA_US,
    K_CPU_KV,
    K_FSTAT,
    K_INT,
    K_LIMIT,
    K_MEM_KV,
    K_PROC_STAT,
    KINDS,
    MAX_FILES,
    MEM_KEYS,
    NET_COLUMNS,
    NFIELDS,
    PROC_STAT_FIELDS,
    UNLIMITED,
)

_INT64_MAX = (1 << 63) - 1
_MALFORMED = "malformed contents"


class VM:
    """The open files of one VM. ``entries``: (path, kind, slot) each; ``tap``: its tap's name
    (str) or None. Raises StatsError when a file cannot be opened or a limit file read (nothing
    stays open then)."""

    def __init__(self, key, entries, tap=None):
        if getattr(self, "_files", None) is not None:  # initialised again: close, do not leak
            self.close()
        entries = list(entries)
        if len(entries) > MAX_FILES:
            raise ValueError(f"at most {MAX_FILES} files per VM")
        self.key = key
        self.tap = tap
        self._tap = None if tap is None else tap.encode()  # as /proc/net/dev names it
        self.paths = tuple(str(path) for path, _, _ in entries)
        self._files = []   # the counters, read by every read_batch: (fd, kind, slot, path)
        self._limits = []  # the K_LIMIT files, read by refresh_limits(): (fd, kind, slot, path)
        self._kept = ()    # (slot, value) from the last refresh_limits(), copied into every record
        for path, kind, slot in entries:
            if kind not in KINDS or not 0 <= slot < NFIELDS:
                self.close()
                raise ValueError(f"bad kind {kind} or slot {slot} for {path}")
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as err:
                self.close()
                raise StatsError.from_errno(path, err.errno) from err
            (self._limits if kind & K_LIMIT else self._files).append((fd, kind & ~K_LIMIT, slot, str(path)))
        try:
            self.refresh_limits()
        except StatsError:
            self.close()
            raise

    @property
    def closed(self):
        return self._files is None

    def refresh_limits(self):
        """Read the limit files again; read_batch reports these values until the next refresh.
        Raises StatsError as read_batch would (the values kept stay as they were)."""
        if self._files is None:
            raise _closed(self)
        scratch = [-1] * NFIELDS
        _read_files(self._limits, scratch, 0)
        # Records start as -1: only the values a limit file set need copying.
        self._kept = tuple((slot, value) for slot, value in enumerate(scratch) if value != -1)

    def close(self):
        files, self._files = self._files, None
        for fd, _, _, _ in (files or []) + self._limits:
            os.close(fd)
        self._limits = []

    def __del__(self):
        if getattr(self, "_files", None) is not None:
            self.close()


def _closed(vm):
    return StatsError(vm.paths[0] if vm.paths else "<vm>", "reader closed")


def _int(data, path):
    """The integer ``data`` holds (bytes, maybe with a newline); "max" is UNLIMITED."""
    text = data.strip()
    if text == b"max":
        return UNLIMITED
    if not text or not (text.isdigit() or (text[:1] == b"-" and text[1:].isdigit())) or len(text) > 20:
        raise StatsError(path, _MALFORMED)
    value = int(text)
    if not -_INT64_MAX <= value <= _INT64_MAX:
        raise StatsError(path, _MALFORMED)
    return value


def _key_values(data, keys, rec, base, path):
    for line in data.split(b"\n"):
        if not line:
            continue
        key, _, value = line.partition(b" ")
        slot = keys.get(key)
        if slot is not None:
            rec[base + slot] = _int(value, path)


def _proc_stat(data, rec, base, path):
    # The command name is in parentheses and may hold anything: fields start after the last ')'.
    end = data.rfind(b")")
    fields = data[end + 1:].split() if end >= 0 else []
    if len(fields) < 22:
        raise StatsError(path, _MALFORMED)
    for index, slot in PROC_STAT_FIELDS:
        rec[base + slot] = _int(fields[index], path)


def _cpu_max(data, rec, base, path):
    parts = data.split()
    if len(parts) != 2:
        raise StatsError(path, _MALFORMED)
    quota = _int(parts[0], path)
    rec[base + F_CFS_QUOTA_US] = -1 if quota == UNLIMITED else quota
    rec[base + F_CFS_PERIOD_US] = _int(parts[1], path)


def _read_vm(vm, rec, base):
    if vm._files is None:
        raise _closed(vm)
    for slot, value in vm._kept:
        rec[base + slot] = value
    _read_files(vm._files, rec, base)


def _read_files(files, rec, base):
    for fd, kind, slot, path in files:
        if kind == K_FSTAT:
            try:
                rec[base + slot] = os.fstat(fd).st_blocks * 512
            except OSError as err:
                raise StatsError.from_errno(path, err.errno) from err
            continue
        data = _pread(fd, path)
        if kind == K_INT:
            rec[base + slot] = _int(data, path)
        elif kind == K_CPU_KV:
            _key_values(data, CPU_KEYS, rec, base, path)
        elif kind == K_MEM_KV:
            _key_values(data, MEM_KEYS, rec, base, path)
        elif kind == K_PROC_STAT:
            _proc_stat(data, rec, base, path)
        else:
            _cpu_max(data, rec, base, path)


def _pread(fd, path):
    try:
        data = os.pread(fd, BUF_SIZE, 0)
    except OSError as err:
        raise StatsError.from_errno(path, err.errno) from err
    if not data:
        raise StatsError(path, "empty read (the VM is gone)")
    if len(data) == BUF_SIZE:
        raise StatsError(path, "larger than expected")
    return data


def _read_all(fd):
    chunks, offset = [], 0
    while True:
        chunk = os.pread(fd, 65536, offset)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        offset += len(chunk)


def _net(vms, rec, net_fd, failed):
    """Fill the network slots of every VM read from one read of /proc/net/dev. A line that is
    not in the format we know leaves that VM's counters unavailable."""
    taps = {vm._tap: i for i, vm in enumerate(vms) if vm._tap is not None and i not in failed}
    if not taps:
        return
    for line in _read_all(net_fd).split(b"\n")[2:]:
        name, sep, rest = line.partition(b":")
        index = taps.get(name.strip()) if sep else None
        if index is None:
            continue
        columns = rest.split()
        if len(columns) < 16:
            continue  # not the format we know: leave the counters unavailable
        try:
            values = [_int(columns[column], "/proc/net/dev") for column, _ in NET_COLUMNS]
        except StatsError:
            continue
        base = index * NFIELDS
        for (_, slot), value in zip(NET_COLUMNS, values):
            rec[base + slot] = value


def read_batch(vms, out, net_fd=-1):
    """Read every VM of ``vms`` into ``out``; return [(index, StatsError)] for those that failed."""
    rec = memoryview(out).cast("B").cast("q")
    if len(rec) < len(vms) * NFIELDS:
        raise ValueError(f"out holds {len(rec)} values; {len(vms) * NFIELDS} needed")
    errors = []
    for i, vm in enumerate(vms):
        base = i * NFIELDS
        rec[base:base + NFIELDS] = _MISSING
        try:
            _read_vm(vm, rec, base)
        except StatsError as err:
            rec[base:base + NFIELDS] = _MISSING
            errors.append((i, err))
    if net_fd >= 0:
        _net(vms, rec, net_fd, {i for i, _ in errors})
    return errors


_MISSING = memoryview(bytes(b"\xff" * 8 * NFIELDS)).cast("q")
