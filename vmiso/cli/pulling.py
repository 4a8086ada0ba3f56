"""Container images coming in from the CLI: the progress display of ``vmiso image pull``/``import``
and docker's ``--pull`` for ``vmiso run`` (a container image not stored yet is pulled before
the launch). Shared by cli/image.py and cli/run.py; imports no other CLI module."""
import os
import sys

from ..errors import InvalidSpec, NotFound, VmisoError

PULL_POLICIES = ("missing", "always", "never")
WAITING = "waiting for the image pull or import in progress (it holds the layer cache)"


class OciProgress:
    """Layers and bytes on stderr while an image comes in, when a terminal watches; quiet otherwise."""

    def __init__(self):
        self.tty = sys.stderr.isatty()
        self.shown = False

    def __call__(self, phase, number, nbytes, layers):
        if not self.tty:
            return
        text = {"wait": WAITING,
                "fetch": f"fetching: {number} new layer(s) of {layers}, {nbytes / (1 << 20):.1f} MiB",
                "apply": f"applying layer {number} of {layers} ({nbytes / (1 << 20):.1f} MiB so far)",
                "mkfs": f"making the file system ({nbytes / (1 << 20):.1f} MiB of files)"}[phase]
        print(f"\r\x1b[Kvmiso: {text}", end="", file=sys.stderr, flush=True)
        self.shown = True

    def done(self):
        if self.shown:
            print(file=sys.stderr, flush=True)


def pull_wanted(policy, image, stored):
    """Whether ``vmiso run --pull POLICY`` pulls ``image`` first. Only a container image
    reference is pulled: never micro, a host path or a stored image's id; ``stored()`` says
    whether the store holds it now (asked only for "missing")."""
    from ..image.oci import reference

    if policy == "never" or image == "micro" or image.startswith("micro:"):
        return False
    if image.startswith(("/", ".")) or os.path.lexists(image) or not reference.is_image_name(image):
        return False
    return policy == "always" or not stored()


def pull_for_run(workdir, image, policy, remote):
    """docker's --pull before ``vmiso run``'s launch: pull ``image`` into ``workdir`` when the
    policy wants it, saying so on stderr. Pulling is root's (image/ commands run in-process, the
    agent's launch then finds the image): an ordinary user's run through the agent (``remote``)
    uses what is stored, and its --pull always is refused."""
    if remote and os.geteuid() != 0:
        if policy == "always":
            raise InvalidSpec("pull", "--pull always: pulling images is root's ('vmiso image pull' as root); "
                                      "through the agent a run uses what is stored")
        return None
    from ..image import store

    # Only whether it is stored: the launch verifies the base (a second check here would be work twice).
    if not pull_wanted(policy, image, lambda: store.lookup(workdir, image) is not None):
        return None
    from ..image.oci import importer

    why = "pulling it again (--pull always)" if policy == "always" else "not stored here: pulling it"
    print(f"vmiso: {image}: {why}", file=sys.stderr, flush=True)
    progress = OciProgress()
    try:
        result = importer.pull(workdir, image, names=None, progress=progress)
    except VmisoError as err:
        if policy == "always":
            raise
        # A typo of a stored image's name lands here too: say both things.
        raise NotFound("image", f"{image} (neither a stored image nor a file, and pulling it failed: {err})") from err
    finally:
        progress.done()
    print(f"vmiso: {image}: pulled, image {result.image.sha256[:12]}, {result.fetched_layers} of {result.layers} "
          f"layer(s) fetched", file=sys.stderr, flush=True)
    return result
