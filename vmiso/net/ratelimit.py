"""Per-guest rate limits with what the kernel offers without the tc police action.

Inbound (to the guest) is the tap's egress: an HTB root qdisc whose one class has
``rate`` = average, ``ceil`` = peak, ``burst`` = burst (what libvirt does for inbound).
Outbound (from the guest) is the tap's ingress, which cannot queue: an ingress qdisc redirects
every frame (u32 match-all + mirred) to an ifb device of the tap's own, ``vmo<hash>``, and the
same HTB shapes it there (libvirt's outbound limit relies on police, absent on these kernels).
Shaping queues rather than drops, so TCP slows down smoothly instead of retransmitting.

Units are libvirt's: average/peak in kilobytes per second (tc's ``kbps``), burst in kilobytes.
The ifb is made with netlink; the qdiscs with one ``tc -batch -`` per direction.
"""
import errno

from .._proc import run
from ..errors import CommandFailed, NetworkError
from . import _nl, addr
from . import tap as tap_mod


def _htb(dev, limit):
    peak = limit.peak or limit.average
    burst = f" burst {limit.burst}kb cburst {limit.burst}kb" if limit.burst else ""
    return (f"qdisc replace dev {dev} root handle 1: htb default 1\n"
            f"class replace dev {dev} parent 1: classid 1:1 htb rate {limit.average}kbps ceil {peak}kbps{burst}\n")


def _tc(script, dev):
    try:
        run(["tc", "-batch", "-"], input=script, timeout=30)
    except CommandFailed as err:
        raise NetworkError(f"tc refused the rate limit on {dev}: {(err.stderr or '').strip()}") from err


def apply(tap, inbound=None, outbound=None):
    """Limit traffic to (``inbound``) and from (``outbound``) the guest behind ``tap``; each a
    vmiso.spec.RateLimit or None. On failure, removes what it set."""
    addr.validate_ifname(tap, "tap")
    try:
        if inbound is not None:
            _tc(_htb(tap, inbound), tap)
        if outbound is not None:
            ifb = _ensure_ifb(tap_mod.ifb_name(tap))
            _tc(_htb(ifb, outbound), ifb)
            _tc(f"qdisc replace dev {tap} ingress\n"
                f"filter replace dev {tap} parent ffff: protocol all prio 1 handle 800::800 u32 match u32 0 0 "
                f"action mirred egress redirect dev {ifb}\n", tap)
    except BaseException:
        remove(tap)
        raise


def _ensure_ifb(name):
    with _nl.iproute() as ipr, _nl.doing(f"creating ifb {name}"):
        if _nl.link_index(ipr, name) is None:
            ipr.link("add", ifname=name, kind="ifb")
        ipr.link("set", index=_nl.link_index(ipr, name), state="up")
    return name


def remove(tap):
    """Remove ``tap``'s limits: its ifb, and its qdiscs if the tap still exists. Idempotent."""
    ifb = tap_mod.ifb_name(tap)
    with _nl.iproute() as ipr, _nl.doing(f"removing the rate limits of {tap}"):
        index = _nl.link_index(ipr, ifb)
        if index is not None:
            try:
                ipr.link("del", index=index)
            except _nl.netlink_error_type() as err:
                if err.code != errno.ENODEV:
                    raise
        still_there = _nl.link_index(ipr, tap) is not None
    if still_there:
        # Deleting a qdisc that is not there fails harmlessly: -force keeps the batch going.
        run(["tc", "-force", "-batch", "-"], input=f"qdisc del dev {tap} root\nqdisc del dev {tap} ingress\n",
            timeout=30, check=False)


def show(tap):
    """``tc -j qdisc show`` of the tap and its ifb (for tests and ``vmiso net``)."""
    import json

    out = {}
    for dev in (tap, tap_mod.ifb_name(tap)):
        proc = run(["tc", "-j", "qdisc", "show", "dev", dev], timeout=30, check=False)
        out[dev] = json.loads(proc.stdout) if proc.returncode == 0 and proc.stdout.strip() else []
    return out
