"""``vmiso image``: build the micro guest; add, list, remove and collect stored base images."""
import json
import sys
import time


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
    ls = isub.add_parser("list", help="list base images: micro and the store")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=list_images)
    r = isub.add_parser("rm", help="remove a name, or an image and all its names",
                        description="Remove NAME; the image goes with its last name. With an id (or 12+ digits "
                                    "of it) remove the image and all its names. Refused while a container uses it.")
    r.add_argument("ref", metavar="NAME|ID")
    r.set_defaults(func=rm)
    g = isub.add_parser("gc", help="remove unnamed images and old micro builds no container uses")
    g.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    g.set_defaults(func=gc)


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
        rows.append({"name": s.names[0] if s.names else None, "id": s.sha256, **s.to_dict(),
                     "used_by": sorted(inuse.users_of(s.path, used))})
    return rows


def list_images(args):
    rows = _rows(args.workdir)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'NAME':<20} {'ID':<12} {'FORMAT':<6} {'SIZE':>9} {'USED':>4}  {'ADDED':<16}  PATH")
    for r in rows:
        added = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["added_at"])) if "added_at" in r else "-"
        for name in r["names"] or ["<none>"]:  # one line per name, as docker images
            print(f"{name:<20} {r['id'][:12]:<12} {r['format']:<6} {_size(r['virtual_size']):>9} "
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

    found = store.gc(args.workdir, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for c in found:
        ident = c.id[:12] if c.kind in ("store", "micro", "kernel") else c.id
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
