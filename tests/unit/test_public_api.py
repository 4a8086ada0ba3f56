"""The public API: every name in vmiso.__all__ is there, importing vmiso loads neither libvirt nor
pyroute2 (an agent imports it before it decides anything), and the package says it is typed."""
import os
import subprocess
import sys

import vmiso


def test_every_exported_name_exists():
    for name in vmiso.__all__:
        assert getattr(vmiso, name) is not None, name


def test_import_loads_neither_libvirt_nor_pyroute2():
    code = ("import sys, vmiso; from vmiso import TaskSpec, Volume, NetworkSpec, RecoveryReport; "
            "print(sorted(m for m in ('libvirt', 'pyroute2', 'vmiso.isolator') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_package_ships_its_type_marker():
    assert os.path.exists(os.path.join(os.path.dirname(vmiso.__file__), "py.typed"))
