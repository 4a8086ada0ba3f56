"""What travels on the agent's socket: HTTP/1.1 with JSON bodies (the Docker Engine API's habit),
one request per connection. Shared by the server and the client; standard library only.

Requests carry JSON objects of at most MAX_BODY bytes (Content-Length, never chunked). Answers
are JSON objects; streams (a task's output, a console log) are newline-delimited JSON frames
until the server closes the connection:

    {"stream": "stdout"|"stderr", "data": BASE64}    bytes of the task's output, in order
    {"end": true}                                     the stream is complete
    {"error": ERROR}                                  the stream failed; ERROR as below

An error is ``{"kind": KIND, "message": TEXT, "attrs": {...}}`` with the HTTP status of its kind:
KIND names the vmiso.errors class (ERROR_KINDS), so the client raises the same exception, with the
same one-line message, that the in-process API would have raised.

A launch whose task takes stdin asks for ``Upgrade: vmiso-stdin``: the server answers 101, sends
one frame (``{"status": STATUS}`` or ``{"error": ERROR}``), and then reads the task's stdin from
the connection until the client shuts down its sending side (EOF), as ``docker attach`` does over
a hijacked connection.
"""
import base64
import json

from .. import errors
from ..errors import InvalidSpec
from ..spec import MESOS_SANDBOX, ContainerStatus, NetworkSpec, RateLimit, Resources, TaskSpec, Termination, Volume

API = "/v1"
MAX_BODY = 4 << 20        # a spec's argv and env may hold 2 MiB, base64 grows them by a third
MAX_FRAME = 1 << 20       # the longest frame line a client accepts (output chunks are smaller)
STDIN_UPGRADE = "vmiso-stdin"
NDJSON = "application/x-ndjson"

# kind -> (class, HTTP status). Subclasses first: the first isinstance match names an error.
ERROR_KINDS = {
    "invalid-spec": (errors.InvalidSpec, 400),
    "forbidden": (errors.Forbidden, 403),
    "not-found": (errors.NotFound, 404),
    "already-exists": (errors.AlreadyExists, 409),
    "not-owned": (errors.NotOwned, 409),
    "in-use": (errors.InUse, 409),
    "timeout": (errors.Timeout, 408),
    "no-disk-space": (errors.NoDiskSpace, 507),
    "launch-failed": (errors.LaunchFailed, 500),
    "unsafe-image": (errors.UnsafeImage, 400),
    "image-error": (errors.ImageError, 400),
    "stats-error": (errors.StatsError, 500),
    "command-failed": (errors.CommandFailed, 500),
    "virt-error": (errors.VirtError, 500),
    "network-error": (errors.NetworkError, 500),
    "host-error": (errors.HostError, 500),
    "error": (errors.VmisoError, 500),
}
# Attributes that survive the trip (plain JSON values only; causes are flattened into the message).
_ATTRS = ("field", "what", "name", "container_id", "owner", "agent_id", "step", "path", "code", "errno",
          "users", "argv", "returncode", "feature")


def error_to_wire(err):
    """(HTTP status, error object) for a VmisoError."""
    for kind, (cls, status) in ERROR_KINDS.items():
        if isinstance(err, cls):
            attrs = {a: getattr(err, a) for a in _ATTRS if _plain(getattr(err, a, None))}
            return status, {"kind": kind, "message": str(err), "attrs": attrs}
    raise TypeError(f"not a VmisoError: {err!r}")


def _plain(value):
    return isinstance(value, (str, int, float, bool)) or (isinstance(value, list) and all(
        isinstance(v, (str, int)) for v in value))


def error_from_wire(obj):
    """The exception an error object describes (VmisoError with the server's message)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("message"), str):
        return errors.VmisoError(f"the agent answered with a malformed error: {str(obj)[:200]}")
    cls = ERROR_KINDS.get(obj.get("kind"), (errors.VmisoError, 500))[0]
    err = cls.__new__(cls)
    Exception.__init__(err, obj["message"])  # the message as the server formatted it, verbatim
    attrs = obj.get("attrs")
    if isinstance(attrs, dict):
        for key in _ATTRS:
            if key in attrs:
                setattr(err, key, attrs[key])
    if isinstance(err, errors.LaunchFailed) and not hasattr(err, "cause"):
        err.cause = None
    return err


# --- specs ----------------------------------------------------------------------------------
def _b64(item):
    return base64.b64encode(item if isinstance(item, bytes) else item.encode("utf-8", "surrogateescape")).decode()


def _unb64(value, name):
    if not isinstance(value, str):
        raise InvalidSpec(name, "must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except ValueError as err:
        raise InvalidSpec(name, "is not valid base64") from err


def _rate(limit):
    return None if limit is None else {"average": limit.average, "peak": limit.peak, "burst": limit.burst}


def spec_to_wire(spec):
    """A TaskSpec as a JSON object. stdin travels on the connection, so only whether there is one.
    ``stop_signal`` (its number) only when the spec has one: an agent of an older vmiso refuses
    a field it does not know, and a spec without it means the same to both."""
    net = spec.network
    wire = {
        "command": None if spec.command is None else [_b64(a) for a in spec.command],
        "entrypoint": None if spec.entrypoint is None else [_b64(a) for a in spec.entrypoint],
        "env": dict(spec.env),
        "resources": {"cpus": spec.resources.cpus, "mem_mib": spec.resources.mem_mib,
                      "disk_gib": spec.resources.disk_gib},
        "image": spec.image, "image_format": spec.image_format, "timeout": spec.timeout,
        "workdir": spec.workdir, "user": spec.user,
        "network": None if net is None else {
            "bridge": net.bridge, "vlan": net.vlan, "ip": net.ip, "mac": net.mac, "isolated": net.isolated,
            "inbound": _rate(net.inbound), "outbound": _rate(net.outbound)},
        # the sandbox is one of the volumes already (TaskSpec adds it): sent once, as a volume
        "volumes": [[v.host, v.guest, v.readonly] for v in spec.volumes if spec.sandbox is None
                    or (v.host, v.guest) != (spec.sandbox, MESOS_SANDBOX)],
        "sandbox": spec.sandbox,
        "stdin": spec.stdin is not None,
    }
    if spec.stop_signal is not None:
        wire["stop_signal"] = spec.stop_signal
    return wire


_SPEC_KEYS = {"command", "entrypoint", "env", "resources", "image", "image_format", "timeout", "workdir", "user",
              "network", "volumes", "sandbox", "stdin", "stop_signal"}


def _obj(value, name, keys):
    if not isinstance(value, dict):
        raise InvalidSpec(name, "must be a JSON object")
    unknown = sorted(set(value) - keys)
    if unknown:
        raise InvalidSpec(name, f"unknown field {unknown[0]!r}")
    return value


def _opt(value, name, types):
    if value is not None and (isinstance(value, bool) and bool not in types or not isinstance(value, types)):
        raise InvalidSpec(name, f"must be {' or '.join(t.__name__ for t in types)} or null")
    return value


def _rate_from(value, name):
    if value is None:
        return None
    value = _obj(value, name, {"average", "peak", "burst"})
    return RateLimit(value.get("average"), value.get("peak"), value.get("burst"))


def spec_from_wire(obj, stdin=None):
    """The TaskSpec a JSON object describes (InvalidSpec, naming the field, for anything else);
    ``stdin``: the object the task's stdin is read from when the spec says it has one."""
    obj = _obj(obj, "spec", _SPEC_KEYS)
    argv = {}
    for key in ("command", "entrypoint"):
        value = obj.get(key)
        if value is not None and not isinstance(value, list):
            raise InvalidSpec(key, "must be a list of base64 strings or null")
        argv[key] = None if value is None else [_unb64(v, f"{key}[{i}]") for i, v in enumerate(value)]
    env = obj.get("env", {})
    if not isinstance(env, dict):
        raise InvalidSpec("env", "must be a JSON object")
    res = _obj(obj.get("resources", {}), "resources", {"cpus", "mem_mib", "disk_gib"})
    resources = Resources(**{k: v for k, v in res.items() if v is not None})
    net = obj.get("network")
    network = None
    if net is not None:
        net = _obj(net, "network", {"bridge", "vlan", "ip", "mac", "isolated", "inbound", "outbound"})
        network = NetworkSpec(net.get("bridge"), vlan=net.get("vlan"), ip=net.get("ip"), mac=net.get("mac"),
                              isolated=net.get("isolated", False), inbound=_rate_from(net.get("inbound"), "inbound"),
                              outbound=_rate_from(net.get("outbound"), "outbound"))
    vols = obj.get("volumes", [])
    if not isinstance(vols, list) or not all(isinstance(v, list) and len(v) in (2, 3) for v in vols):
        raise InvalidSpec("volumes", "must be a list of [host, guest, readonly]")
    if not isinstance(obj.get("stdin", False), bool):
        raise InvalidSpec("stdin", "must be true or false")
    return TaskSpec(
        command=argv["command"], entrypoint=argv["entrypoint"], env=env, resources=resources,
        image=_opt(obj.get("image", "micro"), "image", (str,)) or "micro",
        image_format=_opt(obj.get("image_format"), "image_format", (str,)),
        timeout=_opt(obj.get("timeout"), "timeout", (int, float)),
        workdir=_opt(obj.get("workdir"), "workdir", (str,)), user=_opt(obj.get("user"), "user", (str,)),
        network=network, volumes=[Volume(*v) for v in vols],
        sandbox=_opt(obj.get("sandbox"), "sandbox", (str,)),
        stdin=stdin if obj.get("stdin") else None,
        stop_signal=_opt(obj.get("stop_signal"), "stop_signal", (int, str)),
    )


# --- answers ----------------------------------------------------------------------------------
def status_from_wire(obj):
    data = dict(obj)
    term = data.get("termination")
    data["termination"] = Termination.from_dict(term) if term else None
    known = ContainerStatus.__dataclass_fields__
    return ContainerStatus(**{k: v for k, v in data.items() if k in known})


def termination_from_wire(obj):
    return Termination.from_dict(obj)


def frame(obj):
    """One newline-delimited JSON frame."""
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def output_frame(stream, data):
    return frame({"stream": stream, "data": base64.b64encode(data).decode()})


def parse_frame(line):
    """The object of one frame line (VmisoError if it is not one)."""
    try:
        obj = json.loads(line)
    except ValueError as err:
        raise errors.VmisoError(f"the agent sent a malformed frame: {line[:80]!r}") from err
    if not isinstance(obj, dict):
        raise errors.VmisoError(f"the agent sent a malformed frame: {line[:80]!r}")
    return obj
