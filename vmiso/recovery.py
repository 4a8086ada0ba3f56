"""recover(): after the agent restarts, every container is running again under supervision or
reported terminal, and nothing of ours is leaked. Another agent's containers (their checkpoint
or their domain's metadata names another agent id) are reported, never changed.

Sources of truth, in order: the checkpoints in the work dir, libvirt's live domains (ours only
when their ownership metadata names this agent), the task channel's exit line. A second call
changes nothing.
"""
import logging
import os
from dataclasses import dataclass, field

from . import files, state
from .container import Container, launch_in_progress
from .errors import NotFound, VmisoError
from .paths import CHECKPOINT
from .spec import R_LAUNCH_FAILED, Termination
from .virt import domain as domain_xml

log = logging.getLogger(__name__)


@dataclass
class RecoveryReport:
    running: list = field(default_factory=list)      # ids under supervision again
    terminated: dict = field(default_factory=dict)   # id -> Termination, record kept until destroy()
    destroyed: list = field(default_factory=list)    # interrupted destroys, finished and removed
    orphans: list = field(default_factory=list)      # domains of ours without a record, destroyed
    corrupt: list = field(default_factory=list)      # unreadable checkpoints, cleaned (non-strict)
    busy: list = field(default_factory=list)         # launches under way in another process
    leases: list = field(default_factory=list)       # network leases (tap, rules) of vanished containers, freed
    foreign: dict = field(default_factory=dict)      # id -> owner agent id: another agent's, left alone
    pool: list = field(default_factory=list)         # warm VMs of a dead pool (vmiso/pool.py), destroyed

    @property
    def ids(self):
        return sorted(set(self.running) | set(self.terminated))


def recover(iso, strict=False):
    """Isolator.recover(): every container of this work dir, then orphan domains, stray network
    leases and a dead pool's warm VMs."""
    report = RecoveryReport()
    for container_id in iso.workdir.container_ids():
        _recover_one(iso, container_id, strict, report)
    _destroy_orphans(iso.supervisor, report)
    _release_stray_leases(iso.supervisor, report)
    report.pool = iso.pool.recover()
    return report


def _recover_one(iso, container_id, strict, report):
    directory = str(iso.workdir.container_dir(container_id))
    try:
        c = iso.supervisor.get(container_id)
    except NotFound:
        return
    except state.CheckpointError as err:
        if _busy(directory):
            report.busy.append(container_id)
            return
        if strict:
            raise
        owner = _live_owner(iso.supervisor, container_id)
        if owner is not None and owner != iso.agent_id:
            report.foreign[container_id] = owner  # its own agent decides about its record
            return
        log.warning("container %s: %s; cleaning it up", container_id, err)
        _clean_unreadable(iso.supervisor, container_id)
        report.corrupt.append(container_id)
        return
    if c.foreign:
        report.foreign[container_id] = c.owner
        return
    _remove_temp_files(directory)
    if c.checkpoint.remove_requested:
        # destroy() was interrupted: finish it (the kill, if needed, was finished by adoption).
        termination = iso.wait(container_id)
        with c.op:
            iso.supervisor.remove(c, termination)
        report.destroyed.append(container_id)
    elif c.termination is not None:
        report.terminated[container_id] = c.termination
    else:
        report.running.append(container_id)


def _busy(directory):
    return launch_in_progress(directory)


def _remove_temp_files(directory):
    """A crash between writing a checkpoint's temp file and renaming it leaves the temp file.
    Only a dead writer's is removed: a live one may be mid-write."""
    for path in files.dead_writers_temp_files(directory, CHECKPOINT):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _same_workdir(sup, record):
    """The domain was launched from this work dir (records from before vmiso kept the work dir
    in the metadata name none: they count as this one's, as they always did)."""
    return record.get("workdir") in (None, str(sup.workdir.root))


def _ours(sup, record, container_id=None):
    """A domain's metadata record names this agent and this work dir (and ``container_id``):
    only then may recovery stop it. Libvirt's domains are host-wide; work dirs are not."""
    return bool(record) and record.get("agent") == sup.agent_id and _same_workdir(sup, record) and \
        (container_id is None or record.get("container") == container_id)


def _live_owner(sup, container_id):
    """The agent id in the metadata of a running domain of this work dir's ``container_id``."""
    for _dom, metadata in sup.host.our_domains(domain_xml.METADATA_NS):
        record = domain_xml.parse_metadata(metadata)
        if record and record.get("container") == container_id and _same_workdir(sup, record):
            return record.get("agent")
    return None


def _clean_unreadable(sup, container_id):
    """No trustworthy record (and no other agent's VM runs it): stop the domain if it is
    provably ours, then remove the files."""
    for dom, metadata in sup.host.our_domains(domain_xml.METADATA_NS):
        record = domain_xml.parse_metadata(metadata)
        if _ours(sup, record, container_id):
            sup.host.destroy(dom)
    sup.workdir.remove_container_dir(container_id)


def _destroy_orphans(sup, report):
    """Domains that carry this agent's metadata but have no record: a launch that crashed after
    createXML and before its directory survived, or a record removed by hand."""
    known = set(sup.workdir.container_ids())
    try:
        domains = sup.host.our_domains(domain_xml.METADATA_NS)
    except VmisoError as err:
        log.warning("cannot list domains for orphans: %s", err)
        return
    for dom, metadata in domains:
        record = domain_xml.parse_metadata(metadata)
        if not _ours(sup, record):
            continue  # not ours (or not provably ours): never touched, whatever its name
        if record.get("pool"):
            continue  # an unclaimed warm VM: the pool's recover() decides (vmiso/pool.py)
        container_id = record.get("container", "")
        if container_id in known:
            continue
        log.warning("destroying orphan domain of container %s", container_id)
        sup.host.destroy(dom)
        report.orphans.append(container_id)


def _release_stray_leases(sup, report):
    """A network lease (and its tap, filter chain, rate limits) whose container has no record
    any more: a crash between removing the record and releasing the network, or a corrupt
    checkpoint cleaned above. Leases are written before the tap exists, so this finds every tap."""
    from .net import ipam, port

    store = ipam.Store(sup.workdir.root)
    if not os.path.exists(store.path):
        return
    known = set(sup.workdir.container_ids())
    for container_id in store.leases():
        if container_id in known:
            continue
        try:
            port.release(sup.workdir.root, container_id)
            report.leases.append(container_id)
        except VmisoError as err:
            log.warning("releasing the network of vanished container %s: %s", container_id, err)


def adopt(sup, container_id):
    """Load a container from its checkpoint and bring it under supervision (``sup``: the
    Supervisor, whose get() calls this for an id it has not seen)."""
    directory = str(sup.workdir.container_dir(container_id))
    try:
        checkpoint = state.read(directory)
    except state.CheckpointError as err:
        if os.path.islink(directory) or not os.path.isdir(directory):
            raise NotFound("container", container_id) from err  # a planted link is no container
        raise
    c = Container(container_id, directory, checkpoint)
    c.foreign = checkpoint.agent_id != sup.agent_id
    if checkpoint.termination is not None:
        c.termination = Termination.from_dict(checkpoint.termination)
        c.released = not checkpoint.cleanup_pending
        if not c.released and not c.foreign:
            _finish_release(sup, c)
        return c
    if c.foreign:
        return c  # another agent's: read-only here, never looked up, watched or concluded
    if checkpoint.phase == state.LAUNCHING and launch_in_progress(directory):
        raise state.CheckpointError(f"container {container_id} is being launched by another process")
    dom = _live_domain(sup, checkpoint)
    if checkpoint.phase == state.LAUNCHING:
        # An interrupted launch is failed and cleaned, never resumed.
        if dom is not None:
            sup.host.destroy(dom)
        checkpoint.kill_reason = R_LAUNCH_FAILED
        sup.conclude(c)
        return c
    if dom is None:
        sup.conclude(c)
        return c
    sup.watch(c)
    if checkpoint.phase == state.DESTROYING:
        # An interrupted kill or destroy is finished, not forgotten.
        sup.host.destroy(dom)
    return c


def _live_domain(sup, checkpoint):
    """The container's running domain, if libvirt has it and it is provably ours; else None."""
    if checkpoint.boot_id != state.boot_id():  # after a reboot no domain of ours can be alive
        return None
    dom = sup.host.lookup(checkpoint.domain)
    if dom is not None and not _owns(sup, dom, checkpoint):
        return None  # somebody else's domain under our name: never touch it
    return dom


def _finish_release(sup, c):
    """The termination was recorded when QEMU exited, and the process died before libvirt's
    teardown ended and the VM's files and network were released: release them once the domain
    is gone (now, or at its stopped event)."""
    if _live_domain(sup, c.checkpoint) is not None:
        sup.watch_lifecycle(c)
        if _live_domain(sup, c.checkpoint) is not None:
            return  # its stopped event (or the next reconcile) releases it
    with c.cond:
        if not c.released:
            sup.release(c)


def _owns(sup, dom, checkpoint):
    record = domain_xml.parse_metadata(sup.host.metadata(dom, domain_xml.METADATA_NS))
    return _ours(sup, record, checkpoint.container_id)
