"""The one door to netlink (pyroute2) and the one place its errors become vmiso errors.

Every function opens its own short-lived IPRoute socket: a socket is bound to the network
namespace of the thread that opened it, and vmiso's calls are few and far between (launch and
destroy), so a fresh socket is both correct after a namespace switch and cheap.
pyroute2 is imported here, on first use, never when vmiso is imported.
"""
import contextlib
import errno as errno_mod
import os

from ..errors import InvalidSpec, NetworkError, NotFound


@contextlib.contextmanager
def iproute():
    """An IPRoute socket for one operation; NetlinkErrors inside become NetworkError."""
    from pyroute2 import IPRoute

    try:
        ipr = IPRoute()
    except OSError as err:
        raise NetworkError(f"cannot open a netlink socket: {err}", err.errno) from err
    try:
        yield ipr
    finally:
        ipr.close()


def netlink_error_type():
    from pyroute2.netlink.exceptions import NetlinkError

    return NetlinkError


def translate(err, action):
    """A vmiso error for pyroute2/OS error ``err`` raised while doing ``action``."""
    code = getattr(err, "code", None) or getattr(err, "errno", None)
    message = f"{action}: {errno_mod.errorcode.get(code, code)} ({_strerror(code, err)})"
    if code == errno_mod.EINVAL:
        return InvalidSpec("network", message)
    return NetworkError(message, code)


def _strerror(code, err):
    return os.strerror(code) if isinstance(code, int) else str(err)


@contextlib.contextmanager
def doing(action):
    """Translate netlink and OS errors raised in the block, naming ``action``."""
    NetlinkError = netlink_error_type()
    try:
        yield
    except (NetlinkError, OSError) as err:
        raise translate(err, action) from err


def link_index(ipr, name):
    """The ifindex of ``name``, or None."""
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def get_link(ipr, name, what="interface"):
    """The link message of ``name``; NotFound if there is none."""
    index = link_index(ipr, name)
    if index is None:
        raise NotFound(what, name)
    return ipr.get_links(index)[0]


def kind(link):
    return link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")


def info_data(link):
    """IFLA_INFO_DATA of a link as a dict of attribute name -> value (empty when none)."""
    data = link.get_nested("IFLA_LINKINFO", "IFLA_INFO_DATA")
    return dict(data["attrs"]) if data else {}


def addresses(ipr, index):
    """IPv4 and IPv6 addresses of interface ``index`` as 'A/NN' strings."""
    return sorted(f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}" for a in ipr.get_addr(index=index))
