"""``vmiso image``: build the micro guest, list the bases."""
import json


def register(sub):
    p = sub.add_parser("image", help="build and list base images")
    isub = p.add_subparsers(dest="image_command", metavar="SUBCOMMAND")
    isub.required = True
    b = isub.add_parser("build-micro", help="build the embedded default guest from Debian packages",
                        description="Download Debian's cloud kernel and busybox-static, build an initramfs "
                                    "and an ext4 root, store them content-addressed in the work directory. "
                                    "Does nothing when the inputs have not changed.")
    b.add_argument("--force", action="store_true", help="rebuild even if the current build is up to date")
    b.set_defaults(func=build_micro)
    ls = isub.add_parser("list", help="list base images")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=list_images)


def build_micro(args):
    from ..image import micro

    image = micro.build_micro(args.workdir, force=args.force)
    print(f"micro {image.key[:12]} kernel {image.kernel_version} base {image.base}")
    return 0


def list_images(args):
    from ..image import micro

    rows = []
    image = micro.find_micro(args.workdir)
    if image is not None:
        rows.append({"name": "micro", "id": image.key, "format": image.base_format, "path": str(image.base),
                     "virtual_size": image.virtual_size, "kernel": image.kernel_version})
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'NAME':<10} {'ID':<14} {'FORMAT':<6} {'SIZE':>9}  PATH")
    for r in rows:
        print(f"{r['name']:<10} {r['id'][:12]:<14} {r['format']:<6} {r['virtual_size'] / 2**20:>7.0f}Mi  {r['path']}")
    return 0
