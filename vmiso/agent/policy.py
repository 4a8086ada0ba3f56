"""The agent's policy for ordinary users: who may run VMs, how much, with what.

Read once at start from a TOML file (default /etc/vmiso/policy.toml; no file means the defaults
below). Root is never limited by it. Example, every key optional::

    group = "vmiso"                  # members may run VMs (root always may)
    images = ["micro", "micro:lean", "micro:stock", "python:3.12"]  # "*": micro and every stored one
    bridges = ["vmbr0"]              # bridges their tasks may attach to
    volumes = true                   # may share directories they can use themselves (-v)
    volume_roots = ["/home", "/scratch"]  # ... and only under these (empty: anywhere)

    [limits]                         # per user, over their running containers
    containers = 4
    cpus = 4.0
    mem_mib = 4096
    disk_gib = 20                    # per container: the root disk's size (its image's if unset)

    [users.alice]                    # one user's own values for any key of [limits],
    containers = 8                   # images, bridges, volumes and volume_roots
    images = ["*"]

Images are names of stored images (or micro), never host paths: the Isolator refuses paths for a
user's container whatever this file says.
"""
import grp
import os
from dataclasses import dataclass, field, replace

from ..errors import Forbidden, HostError

DEFAULT_PATH = "/etc/vmiso/policy.toml"
DEFAULT_GROUP = "vmiso"
MICRO_IMAGES = ("micro", "micro:lean", "micro:stock")


@dataclass(frozen=True)
class Limits:
    containers: int = 4
    cpus: float = 4.0
    mem_mib: int = 4096
    disk_gib: float = 20.0


@dataclass(frozen=True)
class Rules:
    """What one user may do (the file's top level, with their [users.NAME] table applied)."""

    limits: Limits = field(default_factory=Limits)
    images: tuple = MICRO_IMAGES
    bridges: tuple = ()
    volumes: bool = True
    volume_roots: tuple = ()


_LIMIT_TYPES = {"containers": (int,), "cpus": (int, float), "mem_mib": (int,), "disk_gib": (int, float)}
_LIST_KEYS = ("images", "bridges", "volume_roots")


def _check_rules(table, where, base):
    """``base`` with the values of TOML table ``table`` (HostError naming ``where`` otherwise)."""
    limits = dict(base.limits.__dict__)
    values = {}
    for key, value in table.items():
        if key in _LIMIT_TYPES and where.startswith("[users."):
            limits[key] = _limit(key, value, where)
        elif key in _LIST_KEYS:
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise HostError(f"policy {where}: {key} must be a list of non-empty strings")
            if key == "volume_roots" and not all(os.path.isabs(v) for v in value):
                raise HostError(f"policy {where}: volume_roots must be absolute paths")
            values[key] = tuple(value)
        elif key == "volumes":
            if not isinstance(value, bool):
                raise HostError(f"policy {where}: volumes must be true or false")
            values[key] = value
        else:
            raise HostError(f"policy {where}: unknown key {key!r}")
    return replace(base, limits=Limits(**limits), **values)


def _limit(key, value, where):
    if isinstance(value, bool) or not isinstance(value, _LIMIT_TYPES[key]) or value < 0:
        raise HostError(f"policy {where}: {key} must be a non-negative number")
    return value


@dataclass(frozen=True)
class Policy:
    group: str = DEFAULT_GROUP
    defaults: Rules = field(default_factory=Rules)
    users: dict = field(default_factory=dict)   # user name -> Rules
    source: str = "(defaults)"

    @classmethod
    def parse(cls, data, source="(inline)"):
        """The Policy of a parsed TOML document (HostError, one line, for anything malformed)."""
        if not isinstance(data, dict):
            raise HostError(f"policy {source}: not a table")
        data = dict(data)
        group = data.pop("group", DEFAULT_GROUP)
        if not isinstance(group, str) or not group:
            raise HostError(f"policy {source}: group must be a group name")
        limits = data.pop("limits", {})
        users = data.pop("users", {})
        if not isinstance(limits, dict) or not isinstance(users, dict):
            raise HostError(f"policy {source}: [limits] and [users.NAME] must be tables")
        base = Rules(limits=Limits(**{k: _limit(k, v, "[limits]") for k, v in limits.items()
                                      if k in _LIMIT_TYPES or _unknown(k, "[limits]")}))
        defaults = _check_rules(data, "top level", base)
        per_user = {}
        for name, table in users.items():
            if not isinstance(table, dict):
                raise HostError(f"policy [users.{name}]: must be a table")
            per_user[name] = _check_rules(table, f"[users.{name}]", defaults)
        return cls(group=group, defaults=defaults, users=per_user, source=source)

    @classmethod
    def load(cls, path=DEFAULT_PATH, missing_ok=True):
        """The policy in TOML file ``path``; the defaults when it does not exist and ``missing_ok``."""
        import tomllib

        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            if missing_ok:
                return cls(source=f"{path} (absent: defaults)")
            raise HostError(f"policy file {path} does not exist") from None
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise HostError(f"policy file {path}: {err}") from err
        return cls.parse(data, source=path)

    def rules(self, user):
        return self.users.get(user, self.defaults)

    def admit(self, peer, groups):
        """Forbidden unless ``peer`` may run VMs: root, or a member of the policy's group
        (``groups``: the gids the system gives the peer's uid, auth.groups_of)."""
        if peer.root:
            return
        try:
            gid = grp.getgrnam(self.group).gr_gid
        except KeyError:
            raise Forbidden(f"user {peer.name} may not run VMs: only root may (group {self.group} does not "
                            f"exist; see the agent's policy {self.source})") from None
        if gid not in groups:
            raise Forbidden(f"user {peer.name} may not run VMs: not a member of group {self.group}")

    def check_launch(self, peer, spec, running):
        """Forbidden unless ordinary user ``peer`` may launch ``spec`` while their containers
        whose Resources are ``running`` run. Images, bridges and sizes here; volumes need the
        caller's own access (auth.check_path), checked by the server."""
        if peer.root:
            return
        rules = self.rules(peer.name)
        if spec.image not in rules.images and "*" not in rules.images:
            allowed = ", ".join(rules.images) or "none"
            raise Forbidden(f"image {spec.image!r} is not one you may use (allowed: {allowed})")
        if spec.network is not None and spec.network.bridge not in rules.bridges:
            raise Forbidden(f"bridge {spec.network.bridge} is not one you may use "
                            f"(allowed: {', '.join(rules.bridges) or 'none'})")
        if spec.volumes and not rules.volumes:
            raise Forbidden("volumes are not allowed for your tasks here")
        if spec.sandbox is not None:
            raise Forbidden("a sandbox is the Mesos agent's (root's) option")
        for volume in spec.volumes:
            if rules.volume_roots and not any(_inside(os.path.realpath(volume.host), os.path.realpath(r))
                                              for r in rules.volume_roots):
                raise Forbidden(f"volume {volume.host} is outside the directories you may share "
                                f"({', '.join(rules.volume_roots)})")
        lim = rules.limits
        r = spec.resources
        if r.disk_gib is not None and r.disk_gib > lim.disk_gib:
            raise Forbidden(f"a {r.disk_gib:g} GiB disk is more than your limit of {lim.disk_gib:g} GiB")
        if len(running) + 1 > lim.containers:
            raise Forbidden(f"you run {len(running)} containers already: your limit is {lim.containers}")
        cpus = sum(x.cpus for x in running) + r.cpus
        if cpus > lim.cpus + 1e-9:
            raise Forbidden(f"{r.cpus:g} more CPUs would make {cpus:g}: your limit is {lim.cpus:g}")
        mem = sum(x.mem_mib for x in running) + r.mem_mib
        if mem > lim.mem_mib:
            raise Forbidden(f"{r.mem_mib} MiB more memory would make {mem} MiB: your limit is {lim.mem_mib} MiB")


def _unknown(key, where):
    raise HostError(f"policy {where}: unknown key {key!r}")


def _inside(path, root):
    return path == root or path.startswith(root.rstrip("/") + "/")
