"""QEMU's exit, the moment it happens: a pidfd per running domain, all watched by one thread.

libvirt reports a domain stopped only once its own teardown is done: after QEMU exits it sends
SIGTERM, finds the (exiting) process still there and sleeps 200 ms before it looks again
(docs/performance.md, "Where a launch's time goes"). The task's exit status is known before
that: the exit line is on the task channel and QEMU is gone. This watcher tells the Isolator when
QEMU's process has exited, so it can record the termination then and leave the cleanup to
libvirt's stopped event.

A pidfd (``os.pidfd_open``, Linux ≥ 5.3) becomes readable when the process exits, whoever its
parent is (QEMU is daemonised by libvirt); no polling, no signals. Where a pidfd cannot be had
(an older kernel, no pid file, a process already gone) ``watch`` returns False and the caller
relies on libvirt's events alone, as before.
"""
import logging
import os
import select
import threading

log = logging.getLogger(__name__)


class ExitWatcher:
    """``watch(key, pid, fn)`` calls ``fn()`` once, from the watcher's thread, when process
    ``pid`` exits; ``unwatch(key)`` forgets it. ``fn`` must return quickly (hand work to a
    thread of its own): every other watched exit waits behind it."""

    def __init__(self):
        self._lock = threading.Lock()
        self._by_fd = {}    # pidfd -> (key, fn)
        self._by_key = {}   # key -> pidfd
        self._epoll = None
        self._wake_r = self._wake_w = -1
        self._thread = None

    def _start(self):
        """The epoll set and its thread, on first use (call with _lock held)."""
        if self._thread is not None:
            return
        self._epoll = select.epoll()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._epoll.register(self._wake_r, select.EPOLLIN)
        self._thread = threading.Thread(target=self._run, name="vmiso-qemu-exits", daemon=True)
        self._thread.start()

    def watch(self, key, pid, fn):
        """True if ``pid``'s exit will be reported; False if no pidfd could be had for it."""
        try:
            fd = os.pidfd_open(pid)
        except (OSError, AttributeError) as err:  # ESRCH: gone already; ENOSYS: too old a kernel
            log.debug("no pidfd for %s (pid %s): %s", key, pid, err)
            return False
        os.set_inheritable(fd, False)
        with self._lock:
            self._start()
            old = self._by_key.pop(key, None)
            if old is not None:
                self._drop(old)
            self._by_fd[fd] = (key, fn)
            self._by_key[key] = fd
            self._epoll.register(fd, select.EPOLLIN)
        return True

    def unwatch(self, key):
        with self._lock:
            fd = self._by_key.pop(key, None)
            if fd is not None:
                self._drop(fd)

    def watching(self, key):
        with self._lock:
            return key in self._by_key

    def _drop(self, fd):
        """Forget ``fd`` (call with _lock held)."""
        self._by_fd.pop(fd, None)
        try:
            self._epoll.unregister(fd)
        except (OSError, ValueError):
            pass
        os.close(fd)

    def _run(self):
        while True:
            try:
                events = self._epoll.poll()
            except InterruptedError:
                continue
            for fd, _mask in events:
                if fd == self._wake_r:
                    continue
                with self._lock:
                    entry = self._by_fd.get(fd)
                    if entry is None:
                        continue  # unwatched meanwhile
                    key, fn = entry
                    del self._by_key[key]
                    self._drop(fd)
                try:
                    fn()
                except Exception:  # one handler's failure must not end everyone's watch
                    log.exception("QEMU exit handler for %s failed", key)
