"""The vmiso agent: a long-running process that owns one work directory and serves the
``Isolator`` API to local users over a unix socket (docs/operations.md, "The agent").

    server.py    the HTTP+JSON server on the unix socket, its bounds, the endpoints
    protocol.py  what travels on the socket: specs, statuses, frames, error kinds (no libvirt)
    auth.py      who is calling (SO_PEERCRED) and what their uid may reach
    policy.py    who may run VMs, their limits, the images and bridges they may use
    presence.py  whether an agent serves a work dir (its lock), so it never has two writers
    jobs.py      the Slurm job of a caller (its cgroups, squeue), its sizes, QEMU's placement in it
    bindings.py  containers bound to a job or an attached client; the reaper that removes them
    client.py    RemoteIsolator: the CLI's Isolator when an agent serves the work dir

The agent is a client of the public ``Isolator`` API only. The client side (client.py,
protocol.py, presence.py) imports neither libvirt nor anything outside the standard library, so
the client install ordinary users run needs none of vmiso's host dependencies.
"""
DEFAULT_SOCKET = "/run/vmiso/agent.sock"
SOCKET_ENV = "VMISO_AGENT_SOCKET"
KEEP_ABANDONED_S = 300.0  # an abandoned attached run's ended container is kept this long for its owner
