"""Checkpoints: one small versioned JSON record per container, written atomically.

A checkpoint is written with a temp file in the same directory, fsync, rename and a directory
fsync, so a crash leaves either the old record or the new one, never half of one. It carries the
host's boot id: after a reboot, stored pids and domain ids mean nothing.
"""
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Optional

from . import files
from .errors import VmisoError
from .paths import CHECKPOINT

VERSION = 1

# Phases a container goes through; recover() acts on the one it finds.
LAUNCHING, RUNNING, DESTROYING, TERMINATED = "launching", "running", "destroying", "terminated"


class CheckpointError(VmisoError):
    """A checkpoint is missing, truncated or of an unknown version."""


def boot_id():
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


@dataclass
class Checkpoint:
    container_id: str
    agent_id: str
    domain: str
    nonce: str
    phase: str = LAUNCHING
    boot_id: str = ""
    accel: str = ""
    image: str = ""
    base: str = ""
    created_at: float = 0.0
    deadline: Optional[float] = None   # wall-clock time the task's timeout runs out
    kill_reason: Optional[str] = None  # set before vmiso kills the VM: "destroyed" or "timeout"
    remove_requested: bool = False     # destroy() was called: remove everything once it is dead
    termination: Optional[dict] = None
    # The termination is recorded (QEMU exited) but the VM's files, network and watch are not
    # released yet: libvirt had not finished its teardown. recover() finishes it.
    cleanup_pending: bool = False
    extra: dict = field(default_factory=dict)
    version: int = VERSION

    def to_json(self):
        return json.dumps(asdict(self), sort_keys=True, indent=1).encode() + b"\n"

    @classmethod
    def from_json(cls, data):
        try:
            record = json.loads(data)
        except ValueError as err:
            raise CheckpointError(f"checkpoint is not valid JSON: {err}") from err
        if not isinstance(record, dict) or record.get("version") != VERSION:
            raise CheckpointError(f"checkpoint version {record.get('version') if isinstance(record, dict) else '?'}"
                                  f" is not {VERSION}")
        try:
            return cls(**{k: v for k, v in record.items() if k in cls.__dataclass_fields__})
        except TypeError as err:
            raise CheckpointError(f"checkpoint is incomplete: {err}") from err


def write(directory, checkpoint, durable=True):
    """Atomically replace ``directory``/checkpoint.json with ``checkpoint``. ``durable=False``
    skips the fsyncs: no VM survives the power loss it would guard against (launch's LAUNCHING
    record: most of the host preparation's time, docs/performance.md). recover() removes the
    temp files of writers that died."""
    files.write_atomic(os.path.join(directory, CHECKPOINT), checkpoint.to_json(), 0o600, durable=durable)


def read(directory):
    path = os.path.join(directory, CHECKPOINT)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError as err:
        raise CheckpointError(f"no checkpoint at {path}") from err
    except OSError as err:  # ELOOP: a planted symlink is not our checkpoint
        raise CheckpointError(f"cannot open checkpoint {path}: {err.strerror}") from err
    with os.fdopen(fd, "rb") as f:
        return Checkpoint.from_json(f.read())
