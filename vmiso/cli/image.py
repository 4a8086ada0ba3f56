"""``vmiso image``: build the micro guest; add, import, pull, list, remove and collect stored base images."""
import argparse
import dataclasses
import json
import sys
import time

from .pulling import WAITING, OciProgress


def register(sub):
    p = sub.add_parser("image", help="build, add, list and remove base images")
    isub = p.add_subparsers(dest="image_command", metavar="SUBCOMMAND")
    isub.required = True
    b = isub.add_parser("build-micro", help="build the embedded default guest from Debian packages",
                        description="Build the micro guest: busybox-static on an ext4 root, and a kernel. "
                                    "--kernel lean (default) compiles Linux once from Debian's linux-source "
                                    "with vmiso's small configuration (minutes the first time, then cached); "
                                    "--kernel stock uses Debian's cloud kernel with an initramfs. Stored "
                                    "content-addressed in the work directory; nothing is redone when the inputs "
                                    "have not changed. The image name 'micro' then boots this build; "
                                    "'micro:lean' and 'micro:stock' name each kernel's newest build.")
    b.add_argument("--kernel", choices=("lean", "stock"), default="lean",
                   help="the guest kernel (default lean: boots in about half the time under TCG)")
    b.add_argument("--keep-default", action="store_true",
                   help="do not make this build what 'micro' boots (only 'micro:KERNEL')")
    b.add_argument("--force", action="store_true", help="rebuild even if the current build is up to date")
    b.set_defaults(func=build_micro)
    a = isub.add_parser("add", help="verify a base image and keep a read-only copy in the store",
                        description="Verify PATH (never probing its format: qcow2 unless --format raw), refuse "
                                    "it if it could make QEMU open another file, and copy it into the store "
                                    "under its sha256. The same content is stored once. "
                                    "Then 'vmiso run --image NAME' (or the id, or 12+ digits of it) boots it.")
    a.add_argument("path", metavar="PATH")
    a.add_argument("--format", choices=("qcow2", "raw"), default="qcow2", help="the image's format (default qcow2)")
    a.add_argument("--name", help="a name for it (moves the name if it named another image)")
    a.add_argument("--boot", choices=("disk", "micro"),
                   help="disk: a bootable disk (a cloud image); micro: an ext4 root for the micro kernel "
                        "(default: micro for a micro build's root.qcow2, disk otherwise)")
    a.add_argument("--json", action="store_true", help="print the stored image as JSON")
    a.set_defaults(func=add)
    _register_oci(isub)
    ls = isub.add_parser("list", help="list base images: micro and the store")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=list_images)
    r = isub.add_parser("rm", help="remove a name, or an image and all its names",
                        description="Remove NAME; the image goes with its last name. With an id (or 12+ digits "
                                    "of it) remove the image and all its names. Refused while a container or a "
                                    "pool's warm VM uses it.")
    r.add_argument("ref", metavar="NAME|ID")
    r.set_defaults(func=rm)
    g = isub.add_parser("gc", help="remove unnamed images and old micro builds no container or warm VM uses",
                        description="Remove what no container, warm VM or name needs: unnamed stored images and "
                                    "old micro builds no container or warm VM uses, lean kernels no micro build "
                                    "was made from, names of removed images, the layer cache's blobs no stored "
                                    "container image came from (pulling a removed image again fetches them "
                                    "again), and what a killed add, build or transfer left.")
    g.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    g.add_argument("--json", action="store_true",
                   help="print what was (or would be) removed as JSON: kind, id, path and bytes of each")
    g.set_defaults(func=gc)


def _register_oci(isub):
    i = isub.add_parser("import", help="store a container image from a docker save archive, oci-archive or OCI layout",
                        description="Import a container image: a 'docker save' or 'podman save' archive "
                                    "(docker-archive), an oci-archive, or an OCI image layout directory; "
                                    "PATH:TAG picks one image of several. Layers are verified against their "
                                    "digests, applied with OCI semantics into an ext4 root file system (raw) "
                                    "and stored under the image's config digest, named by the repo:tag the "
                                    "archive carries (or --name).")
    i.add_argument("path", metavar="PATH[:TAG]")
    p = isub.add_parser("pull", help="store a container image from a registry",
                        description="Pull REF ([registry[:port]/]repo[:tag|@digest]) with skopeo over HTTPS "
                                    "(plain HTTP only for a registry on a loopback address, or with --insecure), "
                                    "with the usual auth files; layers already in the layer cache are not "
                                    "fetched again. Then as 'vmiso image import'.")
    p.add_argument("ref", metavar="REF")
    p.add_argument("--insecure", action="store_true",
                   help="allow plain HTTP and unverified TLS for this registry")
    p.add_argument("--authfile", metavar="FILE", help="registry credentials (default: skopeo's usual auth files)")
    for parser, func in ((i, import_image), (p, pull)):
        parser.add_argument("--name", action="append", metavar="REPO:TAG",
                            help="name it so instead of by what it carries (repeatable)")
        parser.add_argument("--max-size", type=_bytes, metavar="BYTES",
                            help="refuse an image whose files hold more (default 32G; suffixes K M G T)")
        parser.add_argument("--max-files", type=int, metavar="N",
                            help="refuse an image with more names (default 2000000)")
        parser.add_argument("--json", action="store_true", help="print the stored image as JSON")
        parser.set_defaults(func=func)


def _bytes(text):
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    number, unit = text.rstrip("KMGTkmgt"), text[len(text.rstrip("KMGTkmgt")):].upper()
    if not number.isdigit() or unit not in units:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (a number with K, M, G or T)")
    return int(number) * units[unit]


def _limits(args):
    from ..image.oci import layers

    default = layers.Limits()
    return layers.Limits(max_bytes=args.max_size or default.max_bytes,
                         max_entries=args.max_files or default.max_entries)


def import_image(args):
    from ..image.oci import importer

    return _imported(args, lambda progress: importer.import_path(
        args.workdir, args.path, names=args.name, limits=_limits(args), progress=progress))


def pull(args):
    from ..image.oci import importer

    return _imported(args, lambda progress: importer.pull(
        args.workdir, args.ref, insecure=args.insecure, authfile=args.authfile, names=args.name,
        limits=_limits(args), progress=progress))


def _imported(args, work):
    progress = OciProgress()
    try:
        result = work(progress)
    finally:
        progress.done()
    image = result.image
    if args.json:
        print(json.dumps({**image.to_dict(), "created": result.created, "layers": result.layers,
                          "fetched_layers": result.fetched_layers, "fetched_bytes": result.fetched_bytes},
                         indent=1))
        return 0
    what = "stored" if result.created else "already stored"
    held = result.layers - result.fetched_layers
    print(f"{what}: {image.sha256[:12]} (sha256:{image.sha256}) {_size(image.virtual_size)} root file system; "
          f"{result.fetched_layers} layer(s) fetched ({_size(result.fetched_bytes)}), {held} already held")
    print(f"names: {', '.join(result.names)}" if result.names else
          "names: none (an unnamed image is removed by 'vmiso image gc'; name it with --name REPO:TAG)")
    return 0


def build_micro(args):
    from ..image import micro

    image = micro.build_micro(args.workdir, force=args.force, kernel=args.kernel, make_default=not args.keep_default,
                              progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(f"micro:{image.kernel_flavour} {image.key[:12]} kernel {image.kernel_version} base {image.base}")
    return 0


def _progress(done, total):
    """Progress of a large add on stderr, when someone watches it."""
    if sys.stderr.isatty():
        end = "\n" if done >= total else ""
        print(f"\rvmiso: hashing and copying {done >> 20} / {total >> 20} MiB", end=end, file=sys.stderr,
              flush=True)


def add(args):
    from ..image import store

    added = store.add(args.workdir, args.path, format=args.format, name=args.name, boot=args.boot,
                      progress=_progress)
    image = added.image
    if args.json:
        print(json.dumps({**image.to_dict(), "created": added.created, "previous": added.previous}, indent=1))
        return 0
    what = "stored" if added.created else "already stored"
    print(f"{what}: {image.sha256[:12]} {image.format} {_size(image.virtual_size)} boot {image.boot}"
          + (f" as {args.name}" if args.name else "") + f"  {image.path}")
    if added.previous:
        print(f"the name {args.name} pointed at {added.previous[:12]} before", file=sys.stderr)
    return 0


def _rows(workdir):
    from ..image import inuse, micro, store

    used = inuse.users(workdir)
    rows = []
    default = micro.find_micro(workdir)
    builds = {}  # key -> (image, names)
    for image, name in [(default, "micro")] + [(micro.find_micro(workdir, k), f"micro:{k}") for k in micro.KERNELS]:
        if image is not None:
            builds.setdefault(image.key, (image, []))[1].append(name)
    for image, names in builds.values():
        rows.append({"name": names[0], "names": names, "id": image.key, "format": image.base_format, "boot": "micro",
                     "path": str(image.base), "virtual_size": image.virtual_size, "kernel": image.kernel_version,
                     "used_by": sorted(inuse.users_of(image.base, used))})
    for s in store.list_images(workdir):
        digest = {"digest": "sha256:" + s.sha256} if s.boot == "oci" else {}
        rows.append({"name": s.names[0] if s.names else None, "id": s.sha256, **digest, **s.to_dict(),
                     "used_by": sorted(inuse.users_of(s.path, used))})
    return rows


def list_images(args):
    rows = _rows(args.workdir)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    width = max([20] + [len(n) for r in rows for n in r["names"]])
    print(f"{'NAME':<{width}} {'ID':<12} {'BOOT':<5} {'FORMAT':<6} {'SIZE':>9} {'USED':>4}  {'ADDED':<16}  PATH")
    for r in rows:
        added = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["added_at"])) if "added_at" in r else "-"
        for name in r["names"] or ["<none>"]:  # one line per name, as docker images
            print(f"{name:<{width}} {r['id'][:12]:<12} {r['boot']:<5} {r['format']:<6} {_size(r['virtual_size']):>9} "
                  f"{len(r['used_by']):>4}  {added:<16}  {r['path']}")
    return 0


def rm(args):
    from ..image import store

    names, sha, removed = store.rm(args.workdir, args.ref)
    for name in names:
        print(f"untagged {name}")
    if removed:
        print(f"deleted {sha}")
    return 0


def gc(args):
    from ..image import store

    found = store.gc(args.workdir, dry_run=args.dry_run,
                     on_wait=lambda: print(f"vmiso: {WAITING}", file=sys.stderr, flush=True))
    if args.json:
        print(json.dumps({"dry_run": args.dry_run, "bytes": sum(c.bytes for c in found),
                          "removed": [dataclasses.asdict(c) for c in found]}, indent=2))
        return 0
    verb = "would remove" if args.dry_run else "removed"
    for c in found:
        ident = c.id[:12] if c.kind in ("store", "micro", "kernel", "blob") else c.id
        print(f"{verb} {c.kind} {ident}  {_size(c.bytes)}  {c.path}")
    total = sum(c.bytes for c in found)
    print(f"{verb} {len(found)} item(s), {_size(total)} on disk")
    return 0


def _size(n):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)
