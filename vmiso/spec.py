"""The data vmiso takes and gives: frozen dataclasses, validated when they are made.

TaskSpec and Resources come in (from the agent or the CLI); Termination, ContainerStatus and
(later) ResourceStatistics go out. Field names follow Mesos where Mesos has one.
"""
import math
import os
import posixpath
import re
import signal
from dataclasses import asdict, dataclass, field
from typing import Optional, Union

from .errors import InvalidSpec

# Container ids become paths, domain names and interface-name hashes: a strict pattern, checked
# before an id touches anything. First character alphanumeric (no '-', '.', '..'), at most 64.
CONTAINER_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# user[:group], each a name (as useradd takes them) or a number
USER_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,31})?")
ACCELS = ("auto", "kvm", "tcg")

MAX_CPUS = 256
MIN_MEM_MIB = 64
MAX_MEM_MIB = 4 * 1024 * 1024  # 4 TiB: anything above is a typo, not a VM
MAX_DISK_GIB = 64 * 1024
# The guest's kernel refuses to exec an argument longer than MAX_ARG_STRLEN (32 pages, NUL
# included) and an argv + environment over a quarter of the 8 MiB stack: refuse both here, with a
# clear error, instead of a task that fails with "Argument list too long" inside the VM. The
# wrapper passes the task's environment as arguments to the shell that execs it, so argv and
# env share one budget, less room for the wrapper's own arguments and environment.
MAX_ARG_BYTES = 32 * 4096 - 1
MAX_ARGV_BYTES = 2 * 1024 * 1024 - 64 * 1024  # argv and env together, each string's NUL counted


def validate_container_id(container_id):
    """Return ``container_id`` if it matches CONTAINER_ID_RE, raise InvalidSpec otherwise."""
    if not isinstance(container_id, str) or not CONTAINER_ID_RE.fullmatch(container_id):
        raise InvalidSpec(
            "container_id",
            f"{container_id!r} is not a valid id (1-64 of A-Z a-z 0-9 _ . -, starting with a letter or digit)",
        )
    return container_id


def _number(name, value, low, high, integral=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidSpec(name, f"must be a number, not {type(value).__name__}")
    if not math.isfinite(value) or not low <= value <= high:
        raise InvalidSpec(name, f"{value!r} is outside {low}..{high}")
    if integral and value != int(value):
        raise InvalidSpec(name, f"{value!r} must be a whole number")
    return value


@dataclass(frozen=True)
class Resources:
    """What a task may use. ``cpus`` may be fractional (a CPU quota on ceil(cpus) vCPUs);
    ``mem_mib`` is guest RAM; ``disk_gib`` is the root disk's virtual size (None: the base's)."""

    cpus: float = 1.0
    mem_mib: int = 256
    disk_gib: Optional[float] = None

    def __post_init__(self):
        _number("cpus", self.cpus, 0.01, MAX_CPUS)
        _number("mem_mib", self.mem_mib, MIN_MEM_MIB, MAX_MEM_MIB, integral=True)
        if self.disk_gib is not None:
            _number("disk_gib", self.disk_gib, 1 / 1024, MAX_DISK_GIB)

    @property
    def vcpus(self):
        return max(1, math.ceil(self.cpus))

    @property
    def disk_bytes(self):
        return None if self.disk_gib is None else int(self.disk_gib * 1024**3)


MAX_RATE_KBPS = 100 * 1024 * 1024  # 100 GiB/s: above that, a typo


@dataclass(frozen=True)
class RateLimit:
    """One direction's limit, in libvirt's ``<bandwidth>`` units: ``average`` and ``peak`` in
    kilobytes per second, ``burst`` in kilobytes (how much may pass at ``peak`` at once)."""

    average: int
    peak: Optional[int] = None
    burst: Optional[int] = None

    def __post_init__(self):
        _number("average", self.average, 1, MAX_RATE_KBPS, integral=True)
        if self.peak is not None:
            _number("peak", self.peak, self.average, MAX_RATE_KBPS, integral=True)
        if self.burst is not None:
            _number("burst", self.burst, 1, MAX_RATE_KBPS, integral=True)


@dataclass(frozen=True)
class NetworkSpec:
    """A task's NIC: a tap on ``bridge``, one the operator made or adopted with ``vmiso net
    bridge create``. ``ip`` is ``A.B.C.D/NN`` (None: allocated from the bridge's subnet), ``mac``
    None: derived; a given one must be locally administered unicast (checked here, before
    anything is made). Whether a task may choose either at all is the bridge's policy, checked
    when the address is leased (vmiso.net.ipam). ``vlan`` (1-4094) is the port's untagged VLAN;
    ``isolated`` makes it a bridge isolated port. ``inbound`` limits traffic to the guest,
    ``outbound`` traffic from it."""

    bridge: str
    vlan: Optional[int] = None
    ip: Optional[str] = None
    mac: Optional[str] = None
    isolated: bool = False
    inbound: Optional[RateLimit] = None
    outbound: Optional[RateLimit] = None

    def __post_init__(self):
        from .net import addr  # pure rules; no netlink

        addr.validate_ifname(self.bridge, "bridge")
        if self.vlan is not None:
            _number("vlan", self.vlan, 1, 4094, integral=True)
        if self.ip is not None:
            object.__setattr__(self, "ip", str(addr.parse_cidr(self.ip, "ip")))
        if self.mac is not None:
            object.__setattr__(self, "mac", addr.guest_mac(self.mac, "mac"))
        if not isinstance(self.isolated, bool):
            raise InvalidSpec("isolated", "must be True or False")
        for name in ("inbound", "outbound"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), RateLimit):
                raise InvalidSpec(name, "must be a vmiso.spec.RateLimit")


MAX_VOLUMES = 16  # each is a PCI device on the root bus, which has about 28 free slots
MESOS_SANDBOX = "/mnt/mesos/sandbox"  # where a Mesos container task finds its sandbox
# Guest paths a volume may not cover: the kernel's file systems and vmiso's own files there.
GUEST_RESERVED = ("/proc", "/sys", "/dev", "/run/vmiso")


@dataclass(frozen=True)
class Volume:
    """A host directory shared into the guest at ``guest`` (virtio-9p, vmiso/virt/volumes.py).
    ``readonly`` is enforced by QEMU on the host, whatever the guest mounts. Both paths must be
    absolute; ``guest`` is normalised and may not be ``/`` nor under GUEST_RESERVED. That the
    host directory exists, lies outside vmiso's work dir and is reachable by QEMU's user is
    checked at launch, before anything is made."""

    host: str
    guest: str
    readonly: bool = False

    def __post_init__(self):
        for label, value in (("HOST", self.host), ("GUEST", self.guest)):
            if not isinstance(value, str) or "\0" in value or not value.startswith("/"):
                raise InvalidSpec("volumes", f"{label} {value!r} is not an absolute path")
        if ".." in self.guest.split("/"):
            raise InvalidSpec("volumes", f"GUEST {self.guest!r} contains '..'")
        guest = "/" + posixpath.normpath(self.guest).lstrip("/")  # normpath keeps a leading "//"
        if guest == "/" or any(guest == r or guest.startswith(r + "/") for r in GUEST_RESERVED):
            raise InvalidSpec("volumes", f"GUEST {self.guest!r} may not be / nor under {', '.join(GUEST_RESERVED)}")
        object.__setattr__(self, "guest", guest)
        if not isinstance(self.readonly, bool):
            raise InvalidSpec("volumes", "readonly must be True or False")


def _volumes(volumes, sandbox):
    """The volumes as a tuple of Volume (``(host, guest[, readonly])`` tuples accepted), the
    sandbox's last; no GUEST twice. Idempotent: the volumes of a TaskSpec hold its sandbox
    already, and ``dataclasses.replace`` of one runs this again."""
    if isinstance(volumes, (str, bytes, Volume)):
        raise InvalidSpec("volumes", "must be a list of vmiso.Volume")
    out = tuple(v if isinstance(v, Volume) else Volume(*v) for v in volumes)
    if sandbox is not None and Volume(sandbox, MESOS_SANDBOX) not in out:
        out += (Volume(sandbox, MESOS_SANDBOX),)
    if len(out) > MAX_VOLUMES:
        raise InvalidSpec("volumes", f"{len(out)} volumes; at most {MAX_VOLUMES}")
    seen = set()
    for v in out:
        if v.guest in seen:
            raise InvalidSpec("volumes", f"GUEST {v.guest} is given twice")
        seen.add(v.guest)
    return out


def _stdin(value):
    """TaskSpec.stdin: None (empty), bytes, a path, or a binary file object."""
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, (str, os.PathLike)) or callable(getattr(value, "read", None)):
        return value
    raise InvalidSpec("stdin", f"must be bytes, a path or a binary file object, not {type(value).__name__}")


def _argv_item(i, item):
    if isinstance(item, str):
        try:
            encoded = item.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError as err:
            raise InvalidSpec(f"command[{i}]", "is not encodable as bytes") from err
    elif isinstance(item, bytes):
        encoded = item
    else:
        raise InvalidSpec(f"command[{i}]", f"must be str or bytes, not {type(item).__name__}")
    if b"\0" in encoded:
        raise InvalidSpec(f"command[{i}]", "contains a NUL byte (impossible in an argv)")
    return encoded


def check_exec_size(argv, env):
    """The guest kernel's exec limits (see MAX_ARG_BYTES): InvalidSpec unless ``argv`` (bytes
    items) and ``env`` ({name: str}) fit."""
    sizes = [len(a) for a in argv]
    for i, size in enumerate(sizes):
        if size > MAX_ARG_BYTES:
            raise InvalidSpec(f"command[{i}]", f"is {size} bytes; one argument may hold at most "
                                               f"{MAX_ARG_BYTES} (put a longer script in a file)")
    for name, value in env.items():
        size = len(name) + 1 + len(value.encode("utf-8", "surrogateescape"))
        if size > MAX_ARG_BYTES:
            raise InvalidSpec("env", f"{name} is {size} bytes; one variable may hold at most {MAX_ARG_BYTES}")
        sizes.append(size)
    total = sum(sizes) + len(sizes)
    if total > MAX_ARGV_BYTES:
        raise InvalidSpec("command", f"the command and its environment are {total} bytes; at most "
                                     f"{MAX_ARGV_BYTES} together (put more data in a file)")


def _argv(name, value):
    """A tuple of argv items (str or bytes) from ``value``, or None."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)):
        raise InvalidSpec(name, "must be a list of arguments, not a string (use TaskSpec.shell for a shell line)")
    value = tuple(value)
    for i, item in enumerate(value):
        _argv_item(i, item)
    return value


# Stop signals as docker takes them (--stop-signal, an image's StopSignal). Guest and host are
# x86_64 Linux, so Python's numbers are the guest's and its names are docker's Linux table. The
# real-time ones count as glibc and docker count them: the kernel's first two are libc's own.
SIGTERM = int(signal.SIGTERM)  # what a stop sends unless the spec or the image names another
MAX_SIGNAL = 64
_RTMIN, _RTMAX = 34, MAX_SIGNAL
_SIGNAL_NAMES = {name[3:]: int(number) for name, number in signal.Signals.__members__.items()
                 if not name.startswith("SIGRT")}
_RT_RE = re.compile(r"RTMIN(?:\+([0-9]{1,2}))?|RTMAX(?:-([0-9]{1,2}))?")


def parse_signal(value, name="stop_signal") -> int:
    """The number of signal ``value``, as docker's --stop-signal reads it: a name with or without
    SIG, in any case ("SIGQUIT", "quit"), SIGRTMIN+N or SIGRTMAX-N, or a number 1..64 (an int or
    its digits). InvalidSpec naming ``name`` for anything else, 0 included."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise InvalidSpec(name, f"must be a signal name or number, not {type(value).__name__}")
    if isinstance(value, str) and re.fullmatch(r"[0-9]{1,3}", value):
        value = int(value)
    if isinstance(value, int):
        if not 1 <= value <= MAX_SIGNAL:
            raise InvalidSpec(name, f"{value} is not a signal number (1..{MAX_SIGNAL})")
        return int(value)  # a plain int, also for a signal.Signals member
    text = value.upper()
    text = text[3:] if text.startswith("SIG") else text
    if text in _SIGNAL_NAMES:
        return _SIGNAL_NAMES[text]
    rt = _RT_RE.fullmatch(text)
    if rt is not None:
        number = _RTMIN + int(rt.group(1) or 0) if text.startswith("RTMIN") else _RTMAX - int(rt.group(2) or 0)
        if _RTMIN <= number <= _RTMAX:
            return number
    raise InvalidSpec(name, f"{value[:40]!r} is not a signal (a name such as SIGQUIT or QUIT, SIGRTMIN+N, "
                            f"or a number 1..{MAX_SIGNAL})")


@dataclass(frozen=True)
class TaskSpec:
    """One task: ``command`` is an argv (str or bytes items; never parsed by a shell unless it
    is one, e.g. ``TaskSpec.shell("echo hi")``). With a container image, ``command`` None runs
    the image's default (its Cmd), a command replaces Cmd, ``entrypoint`` replaces the image's
    Entrypoint (``[]`` clears it) and ``user`` ("uid[:gid]" or names from the image's own
    /etc/passwd and /etc/group) its User, as ``docker run`` does; micro and disk images need a
    command and take neither. ``stop_signal`` (docker's --stop-signal: a name or a number, kept
    as its number) is what a graceful stop sends the task; None: the image's StopSignal, else
    SIGTERM."""

    command: Optional[tuple] = None
    env: dict = field(default_factory=dict)
    resources: Resources = field(default_factory=Resources)
    image: str = "micro"
    image_format: Optional[str] = None
    timeout: Optional[float] = None
    workdir: Optional[str] = None
    network: Optional[NetworkSpec] = None
    # Data in and out (docs/cli.md, "Data in and out"): host directories shared into the guest;
    # a Mesos sandbox, a host directory mounted at MESOS_SANDBOX (also $MESOS_SANDBOX and the
    # default working directory); the task's stdin: bytes, a path or a binary file object, read
    # as the guest takes it (None: empty).
    volumes: tuple = ()
    sandbox: Optional[str] = None
    stdin: object = None
    entrypoint: Optional[tuple] = None
    user: Optional[str] = None
    stop_signal: Optional[Union[int, str]] = None  # a name or a number when given; its number once made

    def __post_init__(self):
        object.__setattr__(self, "command", _argv("command", self.command))
        if self.command == ():
            raise InvalidSpec("command", "must not be empty (None runs a container image's default command)")
        object.__setattr__(self, "entrypoint", _argv("entrypoint", self.entrypoint))
        if self.user is not None and (not isinstance(self.user, str) or not USER_RE.fullmatch(self.user)):
            raise InvalidSpec("user", f"{self.user!r} is not uid[:gid] or name[:group]")
        object.__setattr__(self, "env", dict(self.env))
        object.__setattr__(self, "volumes", _volumes(self.volumes, self.sandbox))
        if self.sandbox is not None:  # as the Mesos containerizer does for a container task
            self.env["MESOS_SANDBOX"] = MESOS_SANDBOX
            if self.workdir is None:
                object.__setattr__(self, "workdir", MESOS_SANDBOX)
        object.__setattr__(self, "stdin", _stdin(self.stdin))
        for name, value in self.env.items():
            if not isinstance(name, str) or not ENV_NAME_RE.fullmatch(name):
                raise InvalidSpec("env", f"{name!r} is not a valid variable name")
            if not isinstance(value, str) or "\0" in value:
                raise InvalidSpec("env", f"value of {name} must be a string without NUL")
        argv = [_argv_item(i, a) for i, a in enumerate((self.entrypoint or ()) + (self.command or ()))]
        check_exec_size(argv, self.env)
        if not isinstance(self.resources, Resources):
            raise InvalidSpec("resources", "must be a vmiso.Resources")
        if self.timeout is not None:
            _number("timeout", self.timeout, 0.001, 10 * 365 * 86400)
        if self.image_format not in (None, "qcow2", "raw"):
            raise InvalidSpec("image_format", f"{self.image_format!r} is not qcow2 or raw")
        if self.workdir is not None and (not self.workdir.startswith("/") or "\0" in self.workdir):
            raise InvalidSpec("workdir", "must be an absolute path")
        if self.network is not None and not isinstance(self.network, NetworkSpec):
            raise InvalidSpec("network", "must be a vmiso.NetworkSpec")
        if self.stop_signal is not None:
            object.__setattr__(self, "stop_signal", parse_signal(self.stop_signal))

    @classmethod
    def shell(cls, script, **kwargs):
        """A task that runs ``script`` with /bin/sh -c."""
        return cls(command=("/bin/sh", "-c", script), **kwargs)


# Terminal states (Mesos TaskState names without the TASK_ prefix).
FINISHED, FAILED, KILLED, LOST = "FINISHED", "FAILED", "KILLED", "LOST"

# Reasons a task ended.
R_GUEST_EXITED = "guest-exited"        # the wrapper reported an exit code
R_NO_EXIT_STATUS = "no-exit-status"    # the guest powered off without reporting one
R_VM_CRASHED = "vm-crashed"            # QEMU died, or the domain vanished under us
R_DESTROYED = "destroyed"              # vmiso was asked to kill it
R_TIMEOUT = "timeout"                  # TaskSpec.timeout ran out
R_LAUNCH_FAILED = "launch-failed"
R_IO_ERROR = "io-error"                # the VM was paused by a disk error and vmiso stopped it


@dataclass(frozen=True)
class Termination:
    """How a container ended. ``exit_code`` is None when the task never reported one."""

    state: str
    reason: str
    exit_code: Optional[int] = None
    message: str = ""

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, data):
        return cls(**{k: data[k] for k in ("state", "reason", "exit_code", "message") if k in data})


@dataclass(frozen=True)
class ContainerStatus:
    """What status() reports: the domain, the state, and the termination once there is one."""

    container_id: str
    state: str  # LAUNCHING, RUNNING, PAUSED, or a terminal state
    domain: str
    accel: str
    pid: Optional[int] = None
    started_at: Optional[float] = None
    termination: Optional[Termination] = None
    image: str = ""
    ip: Optional[str] = None    # the guest's address (A.B.C.D/NN) when it has a network
    mac: Optional[str] = None
    owner: str = ""             # the agent id that launched it (only that agent may change it)
    uid: Optional[int] = None   # the local user it belongs to (launch(uid=)); None: the operator's
    cpus: Optional[float] = None  # its allocation (launch, then update())
    mem_mib: Optional[int] = None

    def to_dict(self):
        data = asdict(self)
        data["termination"] = self.termination.to_dict() if self.termination else None
        return data


@dataclass(frozen=True)
class ResourceStatistics:
    """What usage() reports, with Mesos' field names. Everything is the host's view of the VM
    (QEMU's process and cgroup), never a guess from inside the guest: memory includes QEMU's own
    overhead, network counters are the guest's view of its tap (tap TX = guest RX). A field the
    host cannot give is None; ``to_dict()`` leaves those out, as Mesos' optional fields."""

    timestamp: float
    processes: Optional[int] = None
    threads: Optional[int] = None
    cpus_user_time_secs: Optional[float] = None
    cpus_system_time_secs: Optional[float] = None
    cpus_limit: Optional[float] = None
    cpus_nr_periods: Optional[int] = None
    cpus_nr_throttled: Optional[int] = None
    cpus_throttled_time_secs: Optional[float] = None
    mem_total_bytes: Optional[int] = None
    mem_rss_bytes: Optional[int] = None
    mem_cache_bytes: Optional[int] = None
    mem_anon_bytes: Optional[int] = None
    mem_file_bytes: Optional[int] = None
    mem_swap_bytes: Optional[int] = None
    mem_limit_bytes: Optional[int] = None
    disk_used_bytes: Optional[int] = None
    disk_limit_bytes: Optional[int] = None
    net_rx_packets: Optional[int] = None
    net_rx_bytes: Optional[int] = None
    net_rx_errors: Optional[int] = None
    net_rx_dropped: Optional[int] = None
    net_tx_packets: Optional[int] = None
    net_tx_bytes: Optional[int] = None
    net_tx_errors: Optional[int] = None
    net_tx_dropped: Optional[int] = None

    def to_dict(self):
        # Flat fields only: __dict__ is what asdict() would copy, without its deep-copy cost.
        return {k: v for k, v in self.__dict__.items() if v is not None}
