"""vmiso metrics on a real VM: a separate process exports the running container of another agent
id with its owner label and the same numbers usage() reads, and leaves its files untouched."""
import os

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.system.conftest import AGENT, vmiso_cli
from vmiso import Resources, TaskSpec

pytestmark = pytest.mark.system


def test_metrics_exports_a_live_vm_read_only(iso, cid):
    iso.launch(cid, TaskSpec.shell("sleep 60", resources=Resources(cpus=1, mem_mib=128)))
    try:
        directory = os.path.join(iso.workdir.containers, cid)
        record = os.path.join(directory, "checkpoint.json")  # the guest writes the other files

        def files():
            st = os.stat(record)
            return sorted(os.listdir(directory)), (st.st_ino, st.st_size, st.st_mtime_ns)

        before = files()
        printed = vmiso_cli("metrics")
        assert printed.returncode == 0, printed.stderr
        families = {f.name: f for f in text_string_to_metric_families(printed.stdout.decode())}
        limit, = [s for s in families["vmiso_container_mem_limit_bytes"].samples
                  if s.labels["container_id"] == cid]
        assert limit.labels["agent_id"] == AGENT  # not the CLI's own agent id
        assert limit.value == iso.usage(cid).mem_limit_bytes
        assert files() == before and iso.status(cid).state == "RUNNING"
    finally:
        iso.destroy(cid, grace=0)
