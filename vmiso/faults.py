"""Named fault points on every launch and destroy step, for tests that crash vmiso there.

``VMISO_FAULT=<point>`` makes ``hit(point)`` SIGKILL the process (a crash, not an exception);
``VMISO_FAULT=<point>:raise`` raises FaultInjected instead. Unset, ``hit`` costs one dict lookup.
"""
import os
import signal

from .errors import VmisoError

LAUNCH_POINTS = ("launch:dir", "launch:checkpoint", "launch:overlay", "launch:seed", "launch:network",
                 "launch:create", "launch:running")
DESTROY_POINTS = ("destroy:kill", "destroy:stopped", "destroy:cleanup")
# The termination is recorded (QEMU exited), the VM's files and network not yet released.
CONCLUDE_POINTS = ("conclude:recorded",)


class FaultInjected(VmisoError):
    """Raised at a fault point configured with ':raise'."""


def hit(point):
    spec = os.environ.get("VMISO_FAULT")
    if not spec:
        return
    if spec == point + ":raise":
        raise FaultInjected(f"fault injected at {point}")
    if spec == point:
        os.kill(os.getpid(), signal.SIGKILL)
