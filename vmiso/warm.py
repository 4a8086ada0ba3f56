"""A launch into a warm VM (vmiso/pool.py): Isolator.launch's path when its pool has a ready VM
of the task's image and size class.

Named steps, as a cold launch's (fault points and the benchmark's timeline):
  launch:claim     the VM taken from the pool, the container's LAUNCHING checkpoint in its
                   directory (under the launch lock), the domain's metadata naming the container
  launch:dir       the directory renamed to containers/<id>
  launch:network   (a task with a network) address, MAC and tap leased as for a cold launch,
                   the tap wired (filters, limits), the NIC hot-plugged into the VM's PCIe
                   root port; the guest finds it by the MAC its network-config names
  launch:running   the task's seed files written to the claim port; RUNNING checkpoint
A crash at any step leaves what recover() cleans: before the rename a pool directory and a pool
domain (destroyed as a dead pool's), after it a LAUNCHING container whose domain names it
(failed and destroyed, as an interrupted cold launch; its network released with it).
"""
import os
import secrets
import time

from . import state
from .accounting import live as accounting
from .container import Container, guest_hostname, hold_launch_lock, new_uuid
from .errors import AlreadyExists, VmisoError
from .image import seed
from .spec import ContainerStatus
from .virt import domain

ENTROPY_BYTES = 64


def launch(iso, container_id, spec, image, task, slot, started, resolved) -> ContainerStatus:
    """Run ``task`` in the claimed pool VM ``slot``; the ContainerStatus. LaunchFailed leaves
    nothing (the VM is destroyed: it was meant for this task only)."""
    target = str(iso.workdir.container_dir(container_id))
    checkpoint = state.Checkpoint(
        container_id=container_id, agent_id=iso.agent_id, domain=slot.domain,
        nonce=secrets.token_hex(16), boot_id=state.boot_id(), accel=iso.accel.name,
        image=image.name, base=image.base, created_at=time.time(),
        deadline=time.time() + spec.timeout if spec.timeout else None,
    )
    checkpoint.extra.update(limits=accounting.limits_record(spec.resources), disk_bytes=image.virtual_size,
                            warm=slot.id, stop_signal=task.stop_signal)
    c = Container(container_id, slot.dir, checkpoint)
    c.timeline.update({"launch:start": started, "launch:image": resolved})
    sup = iso.supervisor

    def admit():
        if os.path.lexists(target):
            raise AlreadyExists("container", container_id)  # another process's container of that id

    try:
        sup.add(c, admit=admit)
    except AlreadyExists:
        iso.pool.release(slot)
        raise
    step, lock_fd = "claim", None
    try:
        lock_fd = hold_launch_lock(slot.dir)
        state.write(slot.dir, checkpoint, durable=False)
        iso.host.set_metadata(slot.dom, domain.METADATA_NS, domain.METADATA_PREFIX,
                              domain.metadata_xml(sup.ownership(c)))
        sup.step(c, "launch:claim")
        step = "dir"
        os.rename(slot.dir, target)  # the VM's files are the container's from here on
        c.dir = target
        sup.step(c, "launch:dir")
        step = "running"
        sup.watch(c)
        network_config = None
        if spec.network is not None:
            step = "network"
            network_config = _plug_network(iso, c, slot, spec.network)
            sup.step(c, "launch:network")
            step = "running"
        files = seed.seed_files(instance_id=new_uuid(), hostname=guest_hostname(container_id),
                                argv=task.argv, env=task.env, nonce=checkpoint.nonce,
                                workdir=task.workdir, data_files={}, network_config=network_config)
        files["entropy"] = os.urandom(ENTROPY_BYTES)
        files["clock"] = b"%d\n" % int(time.time())
        iso.pool.send(slot, files)
        checkpoint.phase = state.RUNNING
        state.write(c.dir, checkpoint)
        sup.step(c, "launch:running")
    except BaseException as err:
        _undo(iso, c, slot)
        sup.launch_failed(c, lock_fd, step, err)
    sup.launched(c, lock_fd)
    return iso.status(container_id)


def _plug_network(iso, c, slot, network):
    """The task's NIC, as a cold launch's (Supervisor.lease_network, port.wire: the lease recorded
    before the tap exists, filters and limits on the tap before the guest sees it), plugged into
    the running VM. Returns the network-config for the task's seed files."""
    from .net import port

    network_config = iso.supervisor.lease_network(c, network)
    port.wire(iso.workdir.root, c.checkpoint.extra, network)
    nic = domain.Interface(c.checkpoint.extra["tap"], c.checkpoint.extra["mac"], hotplug=True)
    iso.host.attach_device(slot.dom, domain.interface_xml(nic))
    return network_config


def _undo(iso, c, slot):
    """A failed claim: the VM is destroyed (never returned to the pool: it may have seen part
    of this task), its directory removed wherever it is, the record forgotten."""
    iso.supervisor.unwatch(c)
    with c.cond:
        c.removed = True
    try:
        iso.host.destroy(slot.dom)
    except VmisoError:
        pass
    iso.pool.release(slot)
    iso.supervisor.release_network(c)  # after the VM: the tap goes once nothing uses it
    if c.dir != slot.dir:
        iso.workdir.remove_container_dir(c.id)
    iso.supervisor.forget(c)
