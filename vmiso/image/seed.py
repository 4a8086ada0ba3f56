"""The NoCloud seed ISO (volume label ``cidata``) that carries a task into its guest, built
in-process with pycdlib.

Contents (the guest contract, docs/guest-contract.md):
  meta-data        instance-id and local-hostname (JSON, which YAML reads as is)
  user-data        ``#cloud-config`` for stock cloud images: write_files of the wrapper and the
                   task's data into /run/vmiso, runcmd of the wrapper
  network-config   version 2, when the task has a network (optional)
  vmiso/task.sh    the same wrapper as a plain file, for guests without cloud-init (micro)
  vmiso/argv       one base64 line per argument (bytes-exact, never shell text)
  vmiso/env        one base64 line per NAME=VALUE
  vmiso/workdir    base64 of the working directory (empty: /)
  vmiso/nonce      the launch's random marker for the exit line
  vmiso/volumes    host directories to mount: "TAG ro|rw BASE64(GUEST)" a line (virt/volumes.py)
  vmiso/stdin      present when the task's stdin is the virtio-serial port named in it
  vmiso/oci        a container image's task only: "UID GID GROUPS HOSTNAME ADDRESS DNS" (numbers,
                   GROUPS comma-separated or "-", ADDRESS an IPv4 address or "-", DNS the name
                   servers' IPv4 addresses comma-separated or "-"), checked here

Everything user-supplied is base64 inside JSON, so nothing the user types can change the shape
of the YAML, the shell or the ISO.
"""
import base64
import io
import ipaddress
import json
import os
import re
from importlib import resources

from ..errors import ImageError
from ..files import write_all

GUEST_DIR = "/run/vmiso"  # where cloud-init writes the task files on a stock image
WRAPPER_NAME = "task.sh"


def wrapper_script():
    """The guest wrapper's bytes (vmiso/image/guest/task.sh)."""
    return resources.files("vmiso.image").joinpath("guest", WRAPPER_NAME).read_bytes()


def _b64_lines(items):
    return b"".join(base64.b64encode(item) + b"\n" for item in items)


def _as_bytes(value):
    return value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")


def oci_line(uid, gid, groups, hostname, address=None, dns=()):
    """The ``oci`` file: who the task runs as inside its image, and its host name and address.
    Plain text the wrapper splits on spaces, so every value is checked to hold none."""
    ids = [uid, gid, *groups]
    if not all(isinstance(i, int) and 0 <= i < 1 << 31 for i in ids):
        raise ImageError("oci", f"user and group ids must be numbers below 2^31: {ids}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.-]{0,62}", hostname or ""):
        raise ImageError("oci", f"{hostname!r} is not a host name")
    address = str(ipaddress.IPv4Address(address)) if address else "-"
    group_list = ",".join(str(g) for g in groups) or "-"
    servers = ",".join(str(ipaddress.IPv4Address(s)) for s in dns) or "-"
    return f"{uid} {gid} {group_list} {hostname} {address} {servers}\n".encode("ascii")


def task_files(argv, env, nonce, workdir=None, oci=None):
    """The task's data files, name -> bytes, as the wrapper reads them (``oci``: oci_line())."""
    files = {
        WRAPPER_NAME: wrapper_script(),
        "argv": _b64_lines(_as_bytes(a) for a in argv),
        "env": _b64_lines(_as_bytes(k) + b"=" + _as_bytes(v) for k, v in env.items()),
        "workdir": base64.b64encode(_as_bytes(workdir)) + b"\n" if workdir else b"",
        "nonce": nonce.encode("ascii") + b"\n",
    }
    if oci is not None:
        files["oci"] = oci
    return files


def data_files(volume_lines=b"", stdin_port=None):
    """The task's data-in files beside argv and env (``data_files`` of seed_files): the
    ``volumes`` lines (virt/volumes.seed_lines) and the name of the stdin port, each only when
    the task has one."""
    files = {}
    if volume_lines:
        files["volumes"] = volume_lines
    if stdin_port:
        files["stdin"] = stdin_port.encode("ascii") + b"\n"
    return files


def user_data(files):
    """``#cloud-config`` user-data that installs ``files`` in GUEST_DIR and runs the wrapper."""
    config = {
        "write_files": [
            {
                "path": f"{GUEST_DIR}/{name}",
                "encoding": "b64",
                "content": base64.b64encode(content).decode("ascii"),
                "permissions": "0700" if name == WRAPPER_NAME else "0600",
                "owner": "root:root",
            }
            for name, content in files.items()
        ],
        "runcmd": [["sh", f"{GUEST_DIR}/{WRAPPER_NAME}", GUEST_DIR]],
    }
    return b"#cloud-config\n" + json.dumps(config, indent=1).encode("ascii") + b"\n"


def meta_data(instance_id, hostname):
    return json.dumps({"instance-id": instance_id, "local-hostname": hostname}).encode("ascii") + b"\n"


def seed_files(*, instance_id, hostname, argv, env, nonce, data_files=None,
               workdir=None, network_config=None, oci=None):
    """Every file of the seed ISO, path -> bytes (paths relative to the ISO root)."""
    files = task_files(argv, env, nonce, workdir, oci)
    files.update(data_files or {})
    out = {"meta-data": meta_data(instance_id, hostname), "user-data": user_data(files)}
    if network_config is not None:
        out["network-config"] = json.dumps(network_config).encode("ascii") + b"\n"
    out.update({f"vmiso/{name}": content for name, content in files.items()})
    return out


def _iso_name(name, used):
    """An ISO 9660 level-1 8.3 name for ``name``; Rock Ridge and Joliet carry the real one."""
    stem, _, ext = name.upper().partition(".")
    clean = "".join(c if c.isalnum() else "_" for c in stem)[:8] or "F"
    ext = "".join(c if c.isalnum() else "_" for c in ext)[:3]
    candidate, n = clean, 0
    while (candidate, ext) in used:
        n += 1
        candidate = clean[: 8 - len(str(n))] + str(n)
    used.add((candidate, ext))
    return f"{candidate}.{ext};1" if ext else f"{candidate}.;1"


def build_iso(files):
    """The bytes of an ISO 9660 image, label ``cidata``, with Rock Ridge and Joliet names."""
    import pycdlib  # imported here: importing vmiso must stay cheap

    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=1, joliet=3, rock_ridge="1.09", vol_ident="cidata")
    used_by_dir = {}
    made_dirs = {"": "/"}
    for path in sorted(files):
        parent, _, name = path.rpartition("/")
        if parent not in made_dirs:
            iso_dir = "/" + _iso_name(parent, used_by_dir.setdefault("", set()))[:-3].rstrip(".")
            iso.add_directory(iso_dir, rr_name=parent, joliet_path="/" + parent)
            made_dirs[parent] = iso_dir
        iso_parent = made_dirs[parent]
        iso_path = iso_parent.rstrip("/") + "/" + _iso_name(name, used_by_dir.setdefault(parent, set()))
        data = files[path]
        iso.add_fp(io.BytesIO(data), len(data), iso_path, rr_name=name, joliet_path="/" + path)
    out = io.BytesIO()
    iso.write_fp(out)
    iso.close()
    return out.getvalue()


def write_seed(path, files):
    """Write the seed ISO for ``files`` to ``path``: exclusive, no-follow create, 0600.

    A failure (disk full, say) removes the partial file and raises ImageError.
    """
    data = build_iso(files)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as err:
        raise ImageError(path, f"cannot create seed ISO: {err.strerror}") from err
    try:
        write_all(fd, data)
    except OSError as err:
        os.close(fd)
        os.unlink(path)
        raise ImageError(path, f"cannot write seed ISO: {err.strerror}") from err
    os.close(fd)
