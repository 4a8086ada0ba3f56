"""``vmiso doctor``: what this host has and lacks for vmiso, and how to fix each lack."""
import json
import os
import shutil
import stat

OK, WARN, FAIL = "ok", "warn", "FAIL"


def register(sub):
    p = sub.add_parser("doctor", help="check this host (accelerator, libvirt, tools, images)",
                       description="Check everything vmiso needs on this host and say how to fix what is "
                                   "missing. Exit status 1 when something vmiso needs is missing.")
    p.add_argument("--json", action="store_true", help="one JSON array of checks")
    p.set_defaults(func=doctor)


def checks(args):
    yield from _tools()
    yield _kvm_device()
    yield _accelerator(args)
    yield from _libvirt(args)
    yield _micro(args)
    yield _agent(args)
    yield _pool(args)


def _pool(args):
    """The warm pool its owner (the agent, or an in-process Isolator) last reported."""
    from ..pool import read_status

    status = read_status(args.workdir)
    if status is None:
        return ("pool", OK, "no warm VMs (vmiso agent --pool N, or Isolator(pool=PoolConfig(...)))")
    config = status["config"]
    cap = f", cap {status['cap_bytes'] >> 20} MiB" if status.get("cap_bytes") else ""
    return ("pool", OK, f"{status['ready']} ready, {status['booting']} booting of {status['target']} "
                        f"({config['image']}, {config['cpus']:g} CPU, {config['mem_mib']} MiB; "
                        f"{status['mem_bytes'] >> 20} MiB held{cap}), owner pid {status['owner_pid']}; "
                        f"{status['claims']} claims, {status['misses']} misses")


def _tools():
    for tool, package in (("qemu-system-x86_64", "qemu-system-x86"), ("qemu-img", "qemu-utils"),
                          ("virtlogd", "libvirt-daemon-system"), ("libvirtd", "libvirt-daemon-system")):
        path = shutil.which(tool) or next((p for p in (f"/usr/sbin/{tool}",) if os.path.exists(p)), None)
        yield ("tool " + tool, OK, path) if path else \
            ("tool " + tool, FAIL, f"not installed: apt-get install {package} (or 'make setup')")


def _kvm_device():
    try:
        st = os.stat("/dev/kvm")
    except FileNotFoundError:
        return ("/dev/kvm", OK, "absent (no KVM; TCG is used)")
    mode = stat.S_IMODE(st.st_mode)
    import grp

    group = grp.getgrgid(st.st_gid).gr_name
    if group != "kvm" or mode & 0o060 != 0o060:
        return ("/dev/kvm", WARN, f"{group} mode {mode:o}: libvirt re-probes QEMU on every start (30-50 s). "
                                  "Fix: chgrp kvm /dev/kvm && chmod 0660 /dev/kvm (as udev does; 'make setup')")
    return ("/dev/kvm", OK, f"group kvm, mode {mode:o}")


def _accelerator(args):
    from ..virt import accel

    chosen = accel.choose(args.accel)
    return ("accelerator", OK, f"{chosen.name.upper()}: {chosen.reason}")


def _libvirt(args):
    from ..errors import VmisoError
    from ..virt import cpuprobe
    from ..virt.host import Host

    host = Host(args.uri)
    try:
        conn = host.conn()
        version = conn.getLibVersion()
        hv = conn.getVersion()
    except VmisoError as err:
        return [("libvirt", FAIL, f"{err}. Start it: virtlogd -d && libvirtd -d (or systemctl start libvirtd)")]
    finally:
        host.close()
    rows = [("libvirt", OK, f"{args.uri}: libvirt {_ver(version)}, QEMU {_ver(hv)}")]
    try:
        probe = cpuprobe.choose(version, hv, wanted=cpuprobe.setting())
        rows.append(("cpu probe", OK, ("quick: " if probe.quick else "full: ") + probe.reason))
    except VmisoError as err:
        rows.append(("cpu probe", FAIL, str(err)))
    return rows


def _micro(args):
    from ..image import micro

    image = micro.find_micro(args.workdir)
    if image is None:
        return ("image micro", WARN, "not built: vmiso image build-micro (or 'make micro')")
    return ("image micro", OK, f"{image.key[:12]}, {image.kernel_flavour} kernel {image.kernel_version}")


def _agent(args):
    """Whether a vmiso agent serves the work dir (then every vmiso command goes through it)."""
    from ..agent.client import route_read_only
    from ..errors import VmisoError

    try:
        remote = route_read_only(args.workdir, args.agent_socket)
    except VmisoError as err:
        return ("agent", WARN if os.geteuid() == 0 else FAIL, str(err))
    if remote is None:
        return ("agent", OK, "none serves this work dir: commands work in-process (root only)")
    info = remote.info()
    detail = f"pid {info['pid']} serves {info['workdir']} on {remote.socket_path}"
    if not info["may_run"]:
        return ("agent", WARN, f"{detail}; {info['why_not']}")
    return ("agent", OK, detail)


def _ver(n):
    return f"{n // 1000000}.{n // 1000 % 1000}.{n % 1000}"


def doctor(args):
    rows = list(checks(args))
    if args.json:
        print(json.dumps([{"check": c, "status": s, "detail": d} for c, s, d in rows], indent=1))
    else:
        for check, status, detail in rows:
            print(f"{status:<4}  {check:<22} {detail}")
    return 1 if any(s == FAIL for _, s, _ in rows) else 0
