"""Turn a TaskSpec's ``image`` into a verified base to boot.

``image`` is, in this order: "micro" (the embedded guest, direct kernel boot; "micro:lean" and
"micro:stock" pick its kernel, see image/micro.py); the name of a
stored base; the id of a stored base or a unique prefix of it (12 or more hex digits); or a path
to a base image. Stored bases were verified when they were added and are checked cheaply again
here (file stamp, header); a path is verified before every use. Nothing is ever probed.
A stored base added with boot "micro" is a root file system for the micro kernel and initramfs;
one with boot "oci" (a container image, image/oci/) is refused until launch can run one.
"""
import os
from dataclasses import dataclass
from typing import Optional

from ..errors import ImageError, InvalidSpec, NotFound
from . import qcow2, store


@dataclass(frozen=True)
class BootImage:
    name: str
    base: str
    base_format: str
    virtual_size: int
    kernel: Optional[str] = None   # set: direct kernel boot (micro); None: boot the disk
    initrd: Optional[str] = None
    cmdline: Optional[str] = None


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
    return BootImage(name, base, base_format, size, str(built.kernel), initrd, built.cmdline)


def _stored(workdir, ref, declared_format, image, info):
    # The store knows the format: a different declared one is a mistake, not an override.
    if declared_format not in (None, image.format):
        raise InvalidSpec("image_format", f"{ref} is stored as {image.format}, not {declared_format}")
    if image.boot == "micro":
        return _micro(workdir, (ref, image.path, info.format, info.virtual_size))
    if image.boot == "oci":
        # A container image's root is not a bootable disk; booting it needs micro's kernel and
        # init to chroot into it, which launch does not do yet.
        raise ImageError(image.path, f"{ref} is a container image; running container images is not supported yet")
    return BootImage(ref, image.path, info.format, info.virtual_size)
