"""``vmiso agent``: serve the work dir's Isolator to local users on a unix socket (vmiso/agent/).

Runs in the foreground until SIGTERM or SIGINT, which stop serving and leave every VM running
(the next agent recovers them). Started by hand, by scripts/agent.sh, or by the shipped systemd
unit (scripts/vmiso-agent.service).
"""
import logging
import os
import resource
import signal
import sys

log = logging.getLogger("vmiso.agent")


def register(sub):
    from ..agent import DEFAULT_SOCKET, KEEP_ABANDONED_S
    from ..agent.policy import DEFAULT_PATH

    p = sub.add_parser("agent", help="serve this work dir to local users (a unix socket API)",
                       description="Own the work dir and serve the vmiso API on a unix socket: root and the "
                                   "members of the policy's group run, list, wait for, kill and remove their "
                                   "own containers through it; 'vmiso' commands use it whenever it runs. "
                                   "Recovers every container on start; SIGTERM stops serving and leaves the "
                                   "VMs running.")
    p.add_argument("--socket", default=os.environ.get("VMISO_AGENT_SOCKET", DEFAULT_SOCKET), metavar="PATH",
                   help=f"where to listen (default: $VMISO_AGENT_SOCKET or {DEFAULT_SOCKET})")
    p.add_argument("--policy", default=DEFAULT_PATH, metavar="FILE",
                   help=f"who may run VMs and their limits, TOML (default {DEFAULT_PATH}; absent: the defaults)")
    p.add_argument("--socket-mode", type=lambda text: int(text, 8), default=0o666, metavar="MODE",
                   help="the socket's mode (default 666: every local user may connect; the policy decides "
                        "what they may do)")
    p.add_argument("--pool", type=int, default=0, metavar="N",
                   help="keep N warm micro VMs booted ahead: launches of micro that fit --pool-cpus/--pool-mem "
                        "and need no network, stdin or volumes start in one (default 0: none)")
    p.add_argument("--pool-cpus", type=float, default=1.0, metavar="CPUS", help="the warm VMs' CPUs (1)")
    p.add_argument("--pool-mem", type=int, default=256, metavar="MiB", help="the warm VMs' memory (256)")
    p.add_argument("--pool-cap", type=int, default=None, metavar="MiB",
                   help="at most this much memory held by warm VMs, QEMU's overhead included (default: no cap)")
    p.add_argument("--keep-abandoned", type=float, default=KEEP_ABANDONED_S, metavar="S",
                   help="an attached 'vmiso run' killed with SIGKILL leaves its task running: once the task "
                        f"has ended, its container is kept S seconds for its owner's wait/logs/rm, then "
                        f"removed (default {KEEP_ABANDONED_S:g})")
    p.set_defaults(func=agent)


def agent(args):
    from ..agent import presence
    from ..agent.policy import Policy
    from ..agent.server import Agent
    from ..errors import HostError
    from ..isolator import Isolator
    from ..paths import Workdir

    if os.geteuid() != 0:
        raise HostError("vmiso agent must run as root (it owns the work dir and starts VMs as its users)")
    logging.getLogger().setLevel(logging.INFO if not args.verbose else logging.DEBUG)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))  # one fd per connection
    policy = Policy.load(args.policy)
    workdir = Workdir(args.workdir).ensure()
    lock = presence.hold_exclusive(workdir.root, args.socket, on_wait=lambda: log.info(
        "waiting for in-process vmiso commands on %s to finish", workdir.root))
    iso = Isolator(workdir=args.workdir, uri=args.uri, accel=args.accel, agent_id=args.agent_id,
                   disk_reserve=args.disk_reserve, disk_overcommit=args.disk_overcommit)
    server = Agent(iso, policy, args.socket, socket_mode=args.socket_mode, keep_abandoned=args.keep_abandoned)
    try:
        report = iso.recover()
        log.info("recovered %s: %d running, %d ended, %d of other agents", workdir.root, len(report.running),
                 len(report.terminated), len(report.foreign))
        if args.pool:
            from ..pool import PoolConfig

            iso.pool.configure(PoolConfig(size=args.pool, cpus=args.pool_cpus, mem_mib=args.pool_mem,
                                          max_mem_mib=args.pool_cap))
        server.bind()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: server.stop())
        print(f"vmiso agent: serving {workdir.root} on {args.socket} (pid {os.getpid()}, policy {policy.source})",
              file=sys.stderr, flush=True)
        server.serve_forever()
        log.info("stopped; running VMs are left as they are")
    finally:
        server.close()
        iso.pool.close()  # warm VMs die with their pool (the next agent boots its own)
        iso.host.close()
        os.close(lock)
    return 0
