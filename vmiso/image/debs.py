"""Debian packages for the image builders: what apt's lists offer (without downloading), and the
verified .deb files in a cache directory (downloaded once, checked against apt's SHA256).

apt-cache is slow where its binary cache is disabled (Debian's container images), so
``resolve`` keeps its answer in ``<cache>/resolved-<name>.json`` until apt's lists change.
"""
import hashlib
import json
import os
import tempfile
from pathlib import Path

from .._proc import run
from ..errors import CommandFailed, HostError, ImageError

APT_LISTS = "/var/lib/apt/lists"
_KEEP = ("Package", "Version", "Architecture", "SHA256", "Depends")


def apt_records(packages):
    """Fields of the candidate versions of ``packages`` from apt's lists (downloads nothing)."""
    argv = ["apt-cache", "show", "--no-all-versions", *packages]
    try:
        text = run(argv, timeout=60).stdout
    except CommandFailed:
        # Fresh machine without package lists: fetch them once, then ask again.
        run(["apt-get", "update", "-q"], timeout=600)
        text = run(argv, timeout=60).stdout
    records = {}
    for paragraph in text.split("\n\n"):
        fields = {}
        for line in paragraph.splitlines():
            name, sep, value = line.partition(": ")
            if sep and not line.startswith(" "):
                fields.setdefault(name, value.strip())
        if "Package" in fields and "Version" in fields:
            records[fields["Package"]] = fields
    missing = [p for p in packages if p not in records]
    if missing:
        raise HostError(f"apt knows no installable version of {', '.join(missing)}")
    return records


def dependency(metapackage, record, prefix):
    """The first package named ``prefix``… that ``metapackage``'s ``record`` depends on (the real
    package behind a metapackage such as linux-image-cloud-amd64 or linux-source)."""
    depends = record.get("Depends", "")
    for alternative in depends.replace("|", ",").split(","):
        name = alternative.split("(")[0].strip()
        if name.startswith(prefix) and name != metapackage:
            return name
    raise HostError(f"{metapackage} depends on no {prefix}* package: {depends!r}")


def lists_stamp():
    """Changes whenever apt's package lists change (names, sizes, mtimes)."""
    entries = sorted(
        f"{e.name}:{e.stat().st_size}:{e.stat().st_mtime_ns}"
        for e in os.scandir(APT_LISTS) if e.is_file() and e.name != "lock"
    ) if os.path.isdir(APT_LISTS) else []
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()


def resolve(cache, name, lookup):
    """``lookup()`` (a dict of apt records), remembered in ``cache`` as ``name`` until apt's
    lists change. Records keep only the fields the builders use."""
    memo, stamp = Path(cache) / f"resolved-{name}.json", lists_stamp()
    try:
        saved = json.loads(memo.read_text())
        if saved["stamp"] == stamp:
            return saved["records"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    records = {key: {k: record[k] for k in _KEEP if k in record} for key, record in lookup().items()}
    tmp = Path(cache) / f".resolved-{name}-{os.getpid()}"
    tmp.write_text(json.dumps({"stamp": stamp, "records": records}))
    os.replace(tmp, memo)
    return records


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(record, cache, progress):
    """Path of the verified .deb for apt ``record`` in ``cache``, downloading it only when absent
    or corrupt. Returns (path, sha256)."""
    cache = Path(cache)
    package = record["Package"]
    version = record["Version"].replace(":", "%3a")  # apt-get download's file naming
    path = cache / f"{package}_{version}_{record.get('Architecture', 'amd64')}.deb"
    want = record.get("SHA256")
    if path.exists():
        have = sha256(path)
        if want in (None, have):
            return path, have
        path.unlink()
    progress(f"image: downloading {package} {record['Version']}")
    with tempfile.TemporaryDirectory(prefix=".dl-", dir=cache) as tmp:
        run(["apt-get", "download", "-q", f"{package}={record['Version']}"], timeout=900, cwd=tmp)
        [got] = Path(tmp).glob("*.deb")
        have = sha256(got)
        if want not in (None, have):
            raise ImageError(got, f"sha256 {have} does not match apt's {want}")
        os.replace(got, path)
    return path, have
