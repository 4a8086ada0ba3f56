"""Choose the accelerator: KVM where it really works, TCG otherwise.

"/dev/kvm opens" is no proof (on hosts without nested virtualisation it opens, and a KVM guest
then hangs in its firmware): the CPU must have the vmx or svm flag, /dev/kvm must open read-write
and answer KVM_GET_API_VERSION with 12.
"""
import fcntl
import os
from dataclasses import dataclass

from ..errors import InvalidSpec

KVM_GET_API_VERSION = 0xAE00
KVM_API_VERSION = 12


@dataclass(frozen=True)
class Accel:
    name: str         # "kvm" or "tcg"
    reason: str       # why, in words an operator can act on
    forced: bool = False

    @property
    def domain_type(self):
        """libvirt's domain type for this accelerator."""
        return "kvm" if self.name == "kvm" else "qemu"


def _cpu_flags(cpuinfo="/proc/cpuinfo"):
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def probe(cpuinfo="/proc/cpuinfo", device="/dev/kvm"):
    """The best accelerator this host really offers, with the reason."""
    flags = _cpu_flags(cpuinfo)
    if not flags & {"vmx", "svm"}:
        return Accel("tcg", "the CPU has no vmx/svm flag (no hardware virtualisation, or nested "
                            "virtualisation not exposed to this machine): guests run under TCG emulation")
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as err:
        return Accel("tcg", f"{device} cannot be opened ({err.strerror}): guests run under TCG emulation")
    try:
        version = fcntl.ioctl(fd, KVM_GET_API_VERSION)
    except OSError as err:
        return Accel("tcg", f"{device} does not answer KVM_GET_API_VERSION ({err.strerror})")
    finally:
        os.close(fd)
    if version != KVM_API_VERSION:
        return Accel("tcg", f"{device} reports KVM API {version}, not {KVM_API_VERSION}")
    return Accel("kvm", f"the CPU has {'vmx' if 'vmx' in flags else 'svm'} and {device} answers KVM API 12")


_probed = None


def choose(requested="auto"):
    """The accelerator for ``requested`` ('auto', 'kvm' or 'tcg'); 'auto' probes once per process."""
    global _probed
    if requested == "tcg":
        return Accel("tcg", "TCG forced by the caller", forced=True)
    if requested == "kvm":
        return Accel("kvm", "KVM forced by the caller", forced=True)
    if requested != "auto":
        raise InvalidSpec("accel", f"{requested!r} is not auto, kvm or tcg")
    if _probed is None:
        _probed = probe()
    return _probed
