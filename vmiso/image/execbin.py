"""vmiso-exec, the static helper that starts a task inside a container image's root (its source:
guest/vmiso-exec.c). Compiled by the micro build into micro's root, outside any image.

Static, so it needs nothing from the image or from micro's busybox; stripped, so the bytes
depend only on the source, the compiler and the C library, which is what ``identity()`` feeds
into micro's content key.
"""
from importlib import resources

from .._proc import run
from ..errors import HostError

SOURCE = "vmiso-exec.c"
GUEST_PATH = "usr/lib/vmiso/vmiso-exec"  # in micro's root; the wrapper runs it from there
CFLAGS = ("-static", "-Os", "-Wall", "-Wextra", "-Werror")


def source():
    return resources.files("vmiso.image").joinpath("guest", SOURCE).read_bytes()


def identity():
    """What the binary's bytes depend on besides the source: compiler and C library versions."""
    try:
        compiler = run(["gcc", "--version"], timeout=30).stdout.splitlines()[0]
        libc = run(["dpkg-query", "-W", "-f=${Version}", "libc6-dev"], timeout=30).stdout
    except (OSError, HostError) as err:
        raise HostError("gcc and libc6-dev are needed to build the micro guest (run 'make setup')") from err
    return f"{compiler}\nlibc6-dev {libc}\n{' '.join(CFLAGS)}"


def build(out, scratch):
    """Compile vmiso-exec to ``out`` (0755), using ``scratch`` for the source."""
    src = scratch / SOURCE
    src.write_bytes(source())
    run(["gcc", *CFLAGS, "-o", str(out), str(src)], timeout=300)
    run(["strip", str(out)], timeout=60)
    out.chmod(0o755)
