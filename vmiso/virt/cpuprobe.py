"""Whether vmiso spares libvirt its one-query-per-CPU-feature probe at every domain start.

When QEMU has the ``unavailable-features`` CPU property (QEMU >= 4.1), libvirt reads the
guest's CPU after starting QEMU with one QMP ``qom-get`` per boolean property of the vCPU
object: about 400 round trips, most of every ``createXML`` under libvirt 9.0 with QEMU 7.2 (the
numbers: docs/performance.md, "libvirt's CPU probe").
Without that capability, libvirt uses the path it has always used for older QEMUs: two
``qom-get`` calls (``feature-words``, ``filtered-features``) read the same x86 feature set.

vmiso takes that path by removing the capability from the domain's own copy of QEMU's
capabilities (``<qemu:capabilities><qemu:del capability='cpu-unavailable-features'/>``). The
trade: libvirt marks such a domain tainted ("custom-hypervisor-feature": one warning line in
libvirtd's log per start) and documents the element as meant for experiments. The only other
use of the capability in libvirt refuses MSR features in a ``<cpu>`` definition, which vmiso
never writes. ``VMISO_CPU_PROBE=full`` turns the shortcut off; ``vmiso doctor`` says which is
in use and why.
"""
import os
from dataclasses import dataclass

from ..errors import InvalidSpec

ENV = "VMISO_CPU_PROBE"
SETTINGS = ("quick", "full")
CAPABILITY = "cpu-unavailable-features"
# <qemu:capabilities> is parsed since libvirt 5.5; the per-feature probe needs QEMU's
# "unavailable-features" (4.1). Below these versions there is nothing to spare.
MIN_LIBVIRT = 5_005_000
MIN_QEMU = 4_001_000


@dataclass(frozen=True)
class CpuProbe:
    quick: bool   # True: the domain XML removes CAPABILITY, libvirt makes 2 queries instead of ~400
    reason: str   # in words an operator can act on


def setting(value=None):
    """``value`` ("quick" or "full"), else $VMISO_CPU_PROBE, else "quick"; InvalidSpec if unknown."""
    value = value if value is not None else (os.environ.get(ENV) or "quick")
    if value not in SETTINGS:
        raise InvalidSpec(ENV, f"{value!r} is not one of {', '.join(SETTINGS)}")
    return value


def choose(libvirt_version, qemu_version, wanted="quick"):
    """The CPU probe for vmiso's (x86_64) domains on this libvirt and QEMU (versions as libvirt's
    integers, major * 1e6 + minor * 1e3 + micro), given the ``wanted`` setting()."""
    if wanted == "full":
        return CpuProbe(False, f"{ENV}=full: libvirt queries every CPU feature at each start")
    if libvirt_version < MIN_LIBVIRT or qemu_version < MIN_QEMU:
        return CpuProbe(False, "this libvirt/QEMU reads the guest CPU in 2 queries already")
    return CpuProbe(True, f"libvirt reads the guest CPU in 2 queries, not ~400 (domains are tainted "
                          f"custom-hypervisor-feature; {ENV}=full turns this off)")
