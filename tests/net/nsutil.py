"""Throwaway network namespaces for tests: made with unique names, entered by this thread with
setns(2), always deleted. Nothing here touches the host's own interfaces."""
import contextlib
import ctypes
import os
import secrets
import subprocess

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd):
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def unique(prefix):
    return prefix + secrets.token_hex(4)  # prefix of at most 7 bytes: names stay <= 15


@contextlib.contextmanager
def netns(prefix="vmtn"):
    """A new named network namespace (lo up); deleted afterwards with everything in it."""
    name = unique(prefix)
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@contextlib.contextmanager
def inside(name):
    """Run the block (this thread, and the processes it starts) in namespace ``name``."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(target)
        os.close(home)


def ip_json(*args, ns=None):
    """``ip -j ARGS`` (in ``ns``, or the current namespace) parsed."""
    import json

    argv = ["ip", *(["-n", ns] if ns else []), "-j", *args]
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    return json.loads(out) if out.strip() else []


def run(*argv, ns=None, check=True, **kw):
    prefix = ["ip", "netns", "exec", ns] if ns else []
    return subprocess.run([*prefix, *argv], check=check, capture_output=True, text=True, **kw)


def run_json(*argv, ns=None):
    import json

    out = run(*argv, ns=ns).stdout
    return json.loads(out) if out.strip() else []
