"""The PVH kernel for direct boot: a bzImage's payload unpacked to an ELF vmlinux whose PVH entry
note lets QEMU start it in 32-bit mode directly, skipping the real-mode setup and the in-guest
decompression, both slow under TCG (docs/performance.md). Without a tool for the payload's format the
bzImage is kept as it is.
"""
import lzma
import shutil
import zlib
from pathlib import Path

from .._proc import run

_LZ4, _ZSTD, _GZIP, _XZ = b"\x02\x21\x4c\x18", b"\x28\xb5\x2f\xfd", b"\x1f\x8b", b"\xfd7zXZ\x00"
_PVH_NOTE = 18  # XEN_ELFNOTE_PHYS32_ENTRY


def _u(data, offset, size):
    return int.from_bytes(data[offset:offset + size], "little")


def _bzimage_payload(data):
    """The compressed vmlinux inside a bzImage (boot protocol >= 2.08), or b""."""
    if data[0x202:0x206] != b"HdrS" or _u(data, 0x206, 2) < 0x208:
        return b""
    start = ((data[0x1F1] or 4) + 1) * 512 + _u(data, 0x248, 4)
    return data[start:start + _u(data, 0x24C, 4)]


def _decompress(payload, scratch):
    """Unpacked ``payload``, or None when no decoder for its format is at hand."""
    if payload.startswith(_GZIP):
        return zlib.decompressobj(31).decompress(payload)
    # The other formats carry the unpacked size as a 4-byte trailer (the kernel's *_with_size).
    payload, size = payload[:-4], _u(payload, len(payload) - 4, 4)
    if payload.startswith(_XZ):
        elf = lzma.LZMADecompressor().decompress(payload)
    else:
        tool = {_LZ4: "lz4", _ZSTD: "zstd"}.get(payload[:4])
        if tool is None or shutil.which(tool) is None:
            return None
        packed, unpacked = scratch / "vmlinux.packed", scratch / "vmlinux.unpacked"
        packed.write_bytes(payload)
        run([tool, "-d", "-q", "-f", packed, unpacked], timeout=300)
        elf = unpacked.read_bytes()
    return elf if len(elf) == size else None


def has_pvh_entry(elf):
    """Whether ``elf`` is an ELF64 with a PVH entry point note (so QEMU can boot it directly)."""
    if elf[:5] != b"\x7fELF\x02":
        return False
    phoff, phentsize, phnum = _u(elf, 0x20, 8), _u(elf, 0x36, 2), _u(elf, 0x38, 2)
    for ph in range(phoff, phoff + phentsize * phnum, phentsize):
        if _u(elf, ph, 4) != 4:  # PT_NOTE
            continue
        pos, end = _u(elf, ph + 8, 8), _u(elf, ph + 8, 8) + _u(elf, ph + 32, 8)
        while pos + 12 <= end:
            namesz, descsz, kind = _u(elf, pos, 4), _u(elf, pos + 4, 4), _u(elf, pos + 8, 4)
            if elf[pos + 12:pos + 12 + namesz] == b"Xen\0" and kind == _PVH_NOTE:
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def install_kernel(bzimage, out, scratch):
    """Write the kernel into ``out``: vmlinux (PVH ELF) if possible, else the bzImage vmlinuz."""
    data = Path(bzimage).read_bytes()
    payload = _bzimage_payload(data)
    elf = _decompress(payload, scratch) if len(payload) > 4 else None
    if elf and has_pvh_entry(elf):
        (out / "vmlinux").write_bytes(elf)
        return "vmlinux"
    (out / "vmlinuz").write_bytes(data)
    return "vmlinuz"


def tools():
    """Part of the recipe: which external decompressors this build can use."""
    return tuple(tool for tool in ("lz4", "zstd") if shutil.which(tool))
