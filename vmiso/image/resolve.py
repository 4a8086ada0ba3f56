"""Turn a TaskSpec's ``image`` into a verified base to boot.

``image`` is, in this order: "micro" (the embedded guest, direct kernel boot; "micro:lean" and
"micro:stock" pick its kernel, see image/micro.py); the name of a
stored base; the id of a stored base or a unique prefix of it (12 or more hex digits); or a path
to a base image. Stored bases were verified when they were added and are checked cheaply again
here (file stamp, header); a path is verified before every use. Nothing is ever probed.
A stored base added with boot "micro" is a root file system for the micro kernel and initramfs;
one with boot "oci" (a container image, image/oci/) is the task's root under micro's lean kernel:
the image becomes the VM's disk (vda, its overlay), micro's root a shared read-only vdc that the
kernel boots (vmiso's init and wrapper), and the image's config says what the task is.
"""
import json
import os
from dataclasses import dataclass
from typing import Optional

from ..errors import ImageError, InvalidSpec, NotFound
from . import qcow2, store

# micro's lean kernel boots micro's root from vdc, read-only; the image's root is vda.
_OCI_ROOT = ("root=/dev/vda", "root=/dev/vdc")
_OCI_RW = (" rw ", " ro ")


@dataclass(frozen=True)
class ContainerImage:
    """What launch needs of a container image: its config (parsed), and its /etc/passwd and
    /etc/group (text, read at import) to resolve user names."""
    config: dict
    passwd: str = ""
    group: str = ""


@dataclass(frozen=True)
class BootImage:
    name: str
    base: str
    base_format: str
    virtual_size: int
    kernel: Optional[str] = None   # set: direct kernel boot (micro); None: boot the disk
    initrd: Optional[str] = None
    cmdline: Optional[str] = None
    system_disk: Optional[str] = None             # micro's root, read-only vdc (container images)
    kernel_flavour: Optional[str] = None          # micro's kernel: "lean" or "stock" (None: the disk's own)
    container: Optional[ContainerImage] = None    # set: a container image (its config rules)


def resolve(workdir, image, declared_format=None, allow_paths=True):
    """The BootImage ``image`` names. ``allow_paths=False`` (an agent's tenants: the host's files
    are not theirs to boot) accepts only micro and stored images."""
    if image == "micro" or image.startswith("micro:"):
        return _micro(workdir, flavour=image.partition(":")[2] or None)
    stored = store.verified(workdir.root, image)
    if stored is not None:
        return _stored(workdir, image, declared_format, *stored)
    if not allow_paths:
        raise InvalidSpec("image", f"{image!r} is not a stored image's name or id, and image paths are not "
                                   "allowed here (only micro and images added with 'vmiso image add')")
    path = os.path.abspath(image)
    if not os.path.lexists(path):
        raise NotFound("image", f"{image} (neither a stored image's name or id nor a file)")
    # No probing: undeclared means qcow2; a raw base must be declared raw (image_format="raw").
    info = qcow2.verify_base(path, declared_format or "qcow2")
    return BootImage(os.path.basename(path), path, info.format, info.virtual_size)


def _micro(workdir, root=None, flavour=None):
    """The micro guest (``flavour``: its kernel, None for the default); with ``root`` (a stored
    base) that root under micro's kernel (and initrd)."""
    from . import micro

    name = "micro" if flavour is None else f"micro:{micro.check_kernel(flavour)}"
    built = micro.find_micro(workdir.root, flavour)
    if built is None:
        hint = "" if flavour is None else f" --kernel {flavour}"
        raise NotFound("image", f"{name} (build it once with 'vmiso image build-micro{hint}')")
    name, base, base_format, size = root or (name, str(built.base), built.base_format, built.virtual_size)
    initrd = str(built.initrd) if built.initrd is not None else None
    return BootImage(name, base, base_format, size, str(built.kernel), initrd, built.cmdline,
                     kernel_flavour=built.kernel_flavour)


def _stored(workdir, ref, declared_format, image, info):
    # The store knows the format: a different declared one is a mistake, not an override.
    if declared_format not in (None, image.format):
        raise InvalidSpec("image_format", f"{ref} is stored as {image.format}, not {declared_format}")
    if image.boot == "micro":
        return _micro(workdir, (ref, image.path, info.format, info.virtual_size))
    if image.boot == "oci":
        return _container(workdir, ref, image, info)
    return BootImage(ref, image.path, info.format, info.virtual_size)


def _container(workdir, ref, image, info):
    """A container image's root under micro's lean kernel (its config read beside the base)."""
    from . import micro

    built = micro.find_micro(workdir.root, "lean")
    if built is None:
        raise NotFound("image", "micro:lean, which runs container images (build it once with "
                                "'vmiso image build-micro')")
    directory = os.path.dirname(image.path)
    try:
        config = json.loads(_read(os.path.join(directory, store.OCI_CONFIG), ref))
    except ValueError as err:
        raise ImageError(directory, f"{ref}: the stored image config is not JSON: {err}") from err
    container = ContainerImage(config, _read(os.path.join(directory, "passwd"), ref, missing_ok=True),
                               _read(os.path.join(directory, "group"), ref, missing_ok=True))
    cmdline = f" {built.cmdline} ".replace(*_OCI_ROOT).replace(*_OCI_RW).strip()
    return BootImage(ref, image.path, info.format, info.virtual_size, str(built.kernel), None, cmdline,
                     system_disk=str(built.base), container=container, kernel_flavour=built.kernel_flavour)


def _read(path, ref, missing_ok=False):
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            return f.read()
    except FileNotFoundError:
        if missing_ok:
            return ""
        raise ImageError(path, f"{ref}: the stored container image is incomplete") from None
    except (OSError, ValueError) as err:
        raise ImageError(path, f"{ref}: cannot read: {err}") from err
