"""What the guest runs for a TaskSpec on a given image: argv, environment, working directory, the
signal a graceful stop sends and, for a container image, the user, as ``docker run`` derives them
from the image's config.

micro and disk images have no config: the spec's command is the task, and a spec that asks for
what only an image config can give (no command, an entrypoint, a user) is refused. Pure: no I/O.
"""
import logging
from dataclasses import dataclass
from typing import Optional

from .errors import InvalidSpec
from .image.oci import config as oci_config
from .spec import ENV_NAME_RE, SIGTERM, check_exec_size, parse_signal

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GuestTask:
    argv: tuple                    # bytes items
    env: dict
    workdir: Optional[str]
    user: Optional[tuple] = None   # (uid, gid, supplementary gids): a container image's task only
    stop_signal: int = SIGTERM     # what a graceful stop sends the task (kill with a grace, the timeout)


def _text(argv):
    return None if argv is None else [a if isinstance(a, str) else a.decode("utf-8", "surrogateescape") for a in argv]


def _bytes(argv):
    return tuple(a if isinstance(a, bytes) else a.encode("utf-8", "surrogateescape") for a in argv)


def _stop_signal(spec, image_value, image_name):
    """The spec's stop signal, else the image's StopSignal, else SIGTERM. The image's is its
    author's claim: one that names no signal is logged and SIGTERM used, never a refused task."""
    if spec.stop_signal is not None:
        return parse_signal(spec.stop_signal)  # its number already: TaskSpec keeps that
    if image_value is None or image_value == "":  # docker's "not set"
        return SIGTERM
    try:
        return parse_signal(image_value, "StopSignal")
    except InvalidSpec as err:
        log.warning("image %s: %s; a stop sends SIGTERM", image_name, err)
        return SIGTERM


def plan(spec, image):
    """The GuestTask for ``spec`` on ``image`` (a resolve.BootImage); InvalidSpec if it cannot run."""
    if (spec.volumes or spec.sandbox) and image.kernel_flavour == "stock":
        raise InvalidSpec("volumes", f"{image.name} boots Debian's cloud kernel, which has no 9p file system for "
                                     "volumes; use micro (its lean kernel)")
    container = image.container
    if container is None:
        if spec.command is None:
            raise InvalidSpec("command", f"missing: {image.name} is not a container image, so it has no default "
                                         "command (vmiso run [OPTIONS] -- CMD [ARG...])")
        for name in ("entrypoint", "user"):
            if getattr(spec, name) is not None:
                raise InvalidSpec(name, f"only a container image has one to replace ({image.name} is not one)")
        return GuestTask(_bytes(spec.command), spec.env, spec.workdir,
                         stop_signal=_stop_signal(spec, None, image.name))
    run = oci_config.run_config(container.config, command=_text(spec.command), entrypoint=_text(spec.entrypoint),
                                env=spec.env, workdir=spec.workdir, user=spec.user,
                                passwd=container.passwd, group=container.group)
    env = {}
    for name, value in run.env.items():
        if ENV_NAME_RE.fullmatch(name) and "\0" not in value:
            env[name] = value
        else:  # a shell cannot export it: the guest would refuse the whole task for it
            log.warning("image %s: variable %r cannot be passed to the task; left out", image.name, name)
    argv = _bytes(run.argv)
    check_exec_size(argv, env)
    return GuestTask(argv, env, run.workdir, (run.uid, run.gid, tuple(run.groups)),
                     stop_signal=_stop_signal(spec, run.stop_signal, image.name))
