"""What the running kernel can do for vmiso's networking, detected before anything is changed.

Bridge VLAN filtering (CONFIG_BRIDGE_VLAN_FILTERING) is optional in Linux and missing on some
hosts (the development machines among them). A kernel without it still reports a bridge's
``vlan_filtering`` flag over netlink but never its VLAN attributes (default PVID, protocol), so
an existing bridge answers the question exactly; without one, the kernel's config does.
"""
import gzip
import os

from ..errors import KernelFeatureMissing
from . import _nl

VLAN_FILTERING = "bridge VLAN filtering (CONFIG_BRIDGE_VLAN_FILTERING)"
_CONFIG_KEY = "CONFIG_BRIDGE_VLAN_FILTERING"


def _kernel_config_says(key):
    """True/False from /proc/config.gz or /boot/config-<release>; None when neither is readable."""
    candidates = (("/proc/config.gz", gzip.open), (f"/boot/config-{os.uname().release}", open))
    for path, opener in candidates:
        try:
            with opener(path, "rt") as f:
                return any(line.startswith(f"{key}=y") for line in f)
        except OSError:
            continue
    return None


def vlan_filtering_available(bridge_link=None):
    """Whether the kernel can filter VLANs on bridges. ``bridge_link``: a bridge's netlink
    message, the exact answer; else the kernel config; unknown counts as available (the kernel
    then answers the request itself, and its EOPNOTSUPP is translated the same way)."""
    if bridge_link is not None:
        return "IFLA_BR_VLAN_DEFAULT_PVID" in _nl.info_data(bridge_link)
    answer = _kernel_config_says(_CONFIG_KEY)
    return True if answer is None else answer


def require_vlan_filtering(what, bridge_link=None):
    """Raise KernelFeatureMissing (naming the feature) when VLAN filtering is unavailable."""
    if not vlan_filtering_available(bridge_link):
        raise KernelFeatureMissing(VLAN_FILTERING, f"{what} needs VLANs on a bridge")
