"""``vmiso slurm config|epilog|install-epilog``: what an operator adds to a Slurm node for vmiso.

Slurm itself stays unchanged: jobs call ``vmiso run -- CMD``, and an Epilog runs ``vmiso gc --job``
so that a job's VMs never outlive it (also when scancel's SIGKILL hit ``vmiso run``).
"""
import os
import tempfile

from .. import slurm


def register(sub):
    p = sub.add_parser("slurm", help="Slurm integration: slurm.conf lines and the Epilog script",
                       description="Print what to add to slurm.conf on a vmiso node, and the Epilog "
                                   "script that removes a job's VMs when the job ends.")
    ssub = p.add_subparsers(dest="slurm_command", metavar="SUBCOMMAND")
    ssub.required = True

    c = ssub.add_parser("config", help="print the slurm.conf lines and the Epilog script")
    _common(c)
    c.add_argument("--epilog", default=slurm.DEFAULT_EPILOG, metavar="PATH",
                   help=f"where the Epilog script is installed (default {slurm.DEFAULT_EPILOG})")
    c.set_defaults(func=config)

    e = ssub.add_parser("epilog", help="print only the Epilog script")
    _common(e)
    e.set_defaults(func=epilog)

    i = ssub.add_parser("install-epilog", help="write the Epilog script to PATH (mode 0755)")
    _common(i)
    i.add_argument("path", nargs="?", default=slurm.DEFAULT_EPILOG, metavar="PATH",
                   help=f"default {slurm.DEFAULT_EPILOG}")
    i.set_defaults(func=install_epilog)


def _common(p):
    p.add_argument("--log", metavar="FILE", help="the Epilog appends vmiso's output to FILE")


def _script(args):
    # The work dir as this command was given it, so the Epilog cleans where the jobs run.
    return slurm.epilog_script(slurm.vmiso_command(), workdir=args.workdir, log=args.log)


def config(args):
    print("\n".join(slurm.config_lines(args.epilog)))
    print()
    print(f"# Install the Epilog on every node ({args.epilog}, mode 0755, owned by root), e.g. with")
    print(f"#   vmiso slurm install-epilog {args.epilog}")
    print("# It reads:")
    for line in _script(args).splitlines():
        print("#   " + line)
    return 0


def epilog(args):
    print(_script(args), end="")
    return 0


def install_epilog(args):
    """Write the script atomically: slurmd may run an Epilog at any moment."""
    path = os.path.abspath(args.path)
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".vmiso-epilog.", dir=directory)
    try:
        try:
            os.write(fd, _script(args).encode())
            os.fchmod(fd, 0o755)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    print(f"installed {path}; add to slurm.conf: Epilog={path}")
    return 0
