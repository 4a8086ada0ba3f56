"""A cold launch: a new VM booted for one task (Isolator.launch's path when no warm VM fits).

Named steps (fault points, and the timeline `vmiso bench` reads):
  launch:dir         the container's directory, under its launch lock
  launch:checkpoint  the LAUNCHING checkpoint
  launch:overlay     the qcow2 overlay on the verified base (written natively)
  launch:seed        the NoCloud seed: the task, its data files, its network-config
  launch:network     (a task with a network) tap, filters and limits wired
  launch:stdin       (a task with stdin) the socket QEMU connects to, listening
  launch:create      the domain created (transient) with its memory hard limit, watched
  launch:running     the RUNNING checkpoint
Every step that creates something has an undo: a failed launch destroys only the domain its own
createXML returned, releases the network and removes the directory (``_undo``). A crash at any
step leaves what recover() cleans (a LAUNCHING checkpoint, or a domain whose metadata names it).
"""
from __future__ import annotations

import dataclasses
import logging
import secrets
import shutil
import time
from typing import TYPE_CHECKING, Optional

from . import admission, state
from .accounting import live as accounting
from .container import Container, guest_hostname, hold_launch_lock, new_uuid
from .errors import AlreadyExists, LaunchFailed, VmisoError
from .image import qcow2, seed
from .paths import CONSOLE_LOG, CONTROL_SOCKET, INITRD, KERNEL, OVERLAY, SEED, STDERR, STDIN_SOCKET, STDOUT, qemu_gid
from .virt import domain, volumes
from .virt import stdin as stdin_channel

if TYPE_CHECKING:
    from .image.resolve import BootImage
    from .spec import ContainerStatus, TaskSpec
    from .taskrun import GuestTask

log = logging.getLogger(__name__)

DOMAIN_PREFIX = "vmiso-"


def launch(iso, container_id: str, spec: TaskSpec, image: BootImage, task: GuestTask, uid: Optional[int],
           shares: list, started: float, resolved: float) -> ContainerStatus:
    """Boot a VM for ``task`` (validated by the Isolator ``iso``: resolved ``image``, checked
    ``shares``, local ``uid`` or None); its ContainerStatus. LaunchFailed leaves nothing."""
    sup = iso.supervisor
    disk_bytes = spec.resources.disk_bytes or image.virtual_size
    directory = str(iso.workdir.container_dir(container_id))
    checkpoint = state.Checkpoint(
        container_id=container_id, agent_id=iso.agent_id, domain=DOMAIN_PREFIX + container_id,
        nonce=secrets.token_hex(16), boot_id=state.boot_id(), accel=iso.accel.name,
        image=image.name, base=image.base, created_at=time.time(),
        deadline=time.time() + spec.timeout if spec.timeout else None,
    )
    checkpoint.extra["limits"] = accounting.limits_record(spec.resources)
    checkpoint.extra["disk_bytes"] = disk_bytes
    checkpoint.extra["stop_signal"] = task.stop_signal  # for a kill from any process, after a restart too
    if shares:
        checkpoint.extra["volumes"] = [s.record() for s in shares]
    if spec.stdin is not None:
        checkpoint.extra["stdin"] = True
    if uid is not None:
        checkpoint.extra["uid"] = uid
    c = Container(container_id, directory, checkpoint)
    c.timeline.update({"launch:start": started, "launch:image": resolved})
    # Admission and registration at once: two launches here cannot both take the last free space.
    sup.add(c, admit=lambda: admission.check(iso.workdir.containers, sup.disks_in_use(), disk_bytes,
                                             iso.disk_policy))
    try:
        iso.workdir.make_container_dir(container_id, qemu_uid=uid)
    except FileExistsError as err:  # another process's container of that id
        _abandon(sup, c)
        raise AlreadyExists("container", container_id) from err
    except OSError as err:  # ENOSPC, EACCES...: nothing was made
        _abandon(sup, c)
        raise LaunchFailed(container_id, "dir", err) from err
    try:
        lock_fd = hold_launch_lock(directory)
    except OSError as err:
        iso.workdir.remove_container_dir(container_id)
        _abandon(sup, c)
        raise LaunchFailed(container_id, "dir", err) from err
    step = "dir"
    created = None
    listener = None  # the stdin socket QEMU connects to (virt/stdin.py)
    try:
        sup.step(c, "launch:dir")
        step = "checkpoint"
        # Not fsynced (most of the host preparation's time, docs/performance.md): a crashed process leaves it
        # in the page cache; after power loss no VM is left to find. RUNNING fsyncs both.
        state.write(directory, checkpoint, durable=False)
        sup.step(c, "launch:checkpoint")
        step = "overlay"
        qcow2.create_overlay_on_verified(c.path(OVERLAY), image.base, image.base_format, disk_bytes)
        sup.step(c, "launch:overlay")
        if uid is not None:
            image = _own_kernel(c, image)
        network_config = None
        if spec.network is not None:
            step = "network"  # address and MAC first: the seed carries them to the guest
            network_config = sup.lease_network(c, spec.network)
        step = "seed"
        seed.write_seed(c.path(SEED), _seed_files(c, spec, task, shares, network_config))
        sup.step(c, "launch:seed")
        if spec.network is not None:
            step = "network"  # tap, filters, limits: in place before the guest's first frame
            from .net import port

            port.wire(iso.workdir.root, c.checkpoint.extra, spec.network)
            sup.step(c, "launch:network")
        if spec.stdin is not None:
            step = "stdin"  # listening before QEMU starts: it connects while it starts
            listener = stdin_channel.listen(c.path(STDIN_SOCKET), uid)
            sup.step(c, "launch:stdin")
        step = "xml"
        xml = _domain_xml(iso, c, spec, image)
        c.timeline["launch:xml"] = time.monotonic()  # host preparation ends here
        step = "create"
        sup.watch_lifecycle(c)
        dom = iso.host.create(xml)
        created = dom  # rollback destroys this domain only: never one looked up by name
        # Not in the XML: libvirt would also raise QEMU's RLIMIT_MEMLOCK to it (refused here).
        iso.host.set_memory_hard_limit(dom, accounting.hard_limit(spec.resources, checkpoint.accel))
        sup.watch_exit(c)  # QEMU's process exists from here
        sup.step(c, "launch:create")
        step = "running"
        checkpoint.phase = state.RUNNING
        state.write(directory, checkpoint)
        sup.step(c, "launch:running")
    except BaseException as err:
        _undo(iso, c, created)
        if listener is not None:
            listener.close()
        sup.launch_failed(c, lock_fd, step, err)
    sup.launched(c, lock_fd)
    if listener is not None:
        stdin_channel.feed(listener, spec.stdin, c.timeline)
    return iso.status(container_id)


def _abandon(sup, c):
    """Nothing was made: stop supervising ``c`` and let kill/destroy of its id in."""
    sup.forget(c)
    c.op.release()


def _undo(iso, c, created):
    """Remove whatever a failed launch made: the domain ``created`` returned (None if it
    made none), then the files, then the record. A domain of the same name that createXML
    refused to replace is somebody else's and is never touched."""
    # Stop listening first: the domain's stop event would otherwise conclude (and write a
    # checkpoint into) the directory while it is being removed.
    iso.supervisor.unwatch(c)
    with c.cond:
        c.removed = True
    try:
        if created is not None:
            iso.host.destroy(created)
    except VmisoError as err:
        log.warning("undoing launch of %s: %s", c.id, err)
    iso.supervisor.release_network(c)
    iso.workdir.remove_container_dir(c.id)
    iso.supervisor.forget(c)


def _seed_files(c, spec, task, shares, network_config):
    """The NoCloud seed's files: the task (argv, env, workdir, user), its data-in files (which
    shares to mount where, whether stdin is a port), its network-config."""
    hostname = guest_hostname(c.id)
    oci = None
    if task.user is not None:
        address = c.checkpoint.extra["ip"].split("/")[0] if "ip" in c.checkpoint.extra else None
        uid_in_image, gid_in_image, groups_in_image = task.user
        dns = (network_config or {}).get("ethernets", {}).get("eth0", {}).get("nameservers", {})
        oci = seed.oci_line(uid_in_image, gid_in_image, groups_in_image, hostname, address,
                            dns.get("addresses", ()))
    data_files = seed.data_files(volumes.seed_lines(shares),
                                 domain.STDIN_PORT_NAME if spec.stdin is not None else None)
    return seed.seed_files(instance_id=new_uuid(), hostname=hostname, argv=task.argv, env=task.env,
                           nonce=c.checkpoint.nonce, data_files=data_files, workdir=task.workdir,
                           network_config=network_config, oci=oci)


def _domain_xml(iso, c, spec, image):
    extra = c.checkpoint.extra
    nics = [domain.Interface(extra["tap"], extra["mac"])] if "tap" in extra else []
    shares = [volumes.Share.from_record(r) for r in extra.get("volumes", ())]
    config = domain.design(
        name=c.domain, uuid=new_uuid(), accel=iso.accel, resources=spec.resources,
        overlay=c.path(OVERLAY), base=image.base, base_format=image.base_format, seed=c.path(SEED),
        logs=(c.path(CONSOLE_LOG), c.path(STDOUT), c.path(STDERR)),
        metadata=iso.supervisor.ownership(c),
        boot=image if image.kernel else None, interfaces=nics, quick_cpu_probe=iso.cpu_probe().quick,
        control_socket=c.path(CONTROL_SOCKET), filesystems=volumes.filesystems(shares),
        stdin_socket=c.path(STDIN_SOCKET) if extra.get("stdin") else None, system_disk=image.system_disk,
        dac_label=(extra["uid"], qemu_gid()) if "uid" in extra else None,
    )
    return config.to_xml()


def _own_kernel(c, image):
    """``image`` booting private copies of its kernel and initrd in the container's directory.
    libvirt chowns a domain's kernel to the uid its QEMU runs as while it runs, and refuses a
    second uid on a file in use: a shared kernel would be one user's file while their VM runs
    and no other user's VM could start."""
    if image.kernel is None:
        return image
    kernel = shutil.copyfile(image.kernel, c.path(KERNEL))
    initrd = shutil.copyfile(image.initrd, c.path(INITRD)) if image.initrd else None
    return dataclasses.replace(image, kernel=kernel, initrd=initrd)
