"""Turn a TaskSpec's ``image`` into a verified base to boot: "micro" (the embedded guest, direct
kernel boot) or a path to a base image (disk boot; verified before use, never probed)."""
import os
from dataclasses import dataclass
from typing import Optional

from ..errors import NotFound
from . import qcow2


@dataclass(frozen=True)
class BootImage:
    name: str
    base: str
    base_format: str
    virtual_size: int
    kernel: Optional[str] = None   # set: direct kernel boot (micro); None: boot the disk
    initrd: Optional[str] = None
    cmdline: Optional[str] = None


def resolve(workdir, image, declared_format=None):
    if image == "micro":
        from . import micro

        built = micro.find_micro(workdir.root)
        if built is None:
            raise NotFound("image", "micro (build it once with 'vmiso image build-micro')")
        return BootImage("micro", str(built.base), built.base_format, built.virtual_size,
                         str(built.kernel), str(built.initrd), micro.KERNEL_CMDLINE)
    path = os.path.abspath(image)
    if not os.path.lexists(path):
        raise NotFound("image", image)
    # No probing: undeclared means qcow2; a raw base must be declared raw (image_format="raw").
    info = qcow2.verify_base(path, declared_format or "qcow2")
    return BootImage(os.path.basename(path), path, info.format, info.virtual_size)
