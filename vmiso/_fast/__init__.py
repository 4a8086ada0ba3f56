"""Selector for the Cython hot paths and their pure-Python twins.

Each hot path ``vmiso/_fast/NAME.pyx`` has a twin ``vmiso/_fast/NAME_py.py`` with the same
names and the same errors. ``load(NAME)`` returns the compiled module when it was built, the twin
otherwise; ``VMISO_NO_EXTENSIONS=1`` forces the twins. ``implementation(NAME)`` says which one
is in use, so a guard test can fail when an extension was expected but not loaded.
"""
import importlib
import os

NO_EXTENSIONS = os.environ.get("VMISO_NO_EXTENSIONS") == "1"


def load(name):
    """The module that implements hot path ``name``: compiled if available and allowed."""
    if not NO_EXTENSIONS:
        try:
            return importlib.import_module(f"vmiso._fast.{name}")
        except ImportError:
            pass
    return importlib.import_module(f"vmiso._fast.{name}_py")


def twin(name):
    """The pure-Python twin of hot path ``name`` (for differential tests and benchmarks)."""
    return importlib.import_module(f"vmiso._fast.{name}_py")


def implementation(name):
    """'cython' or 'python': which implementation ``load(name)`` returns."""
    module = load(name)
    return "python" if module.__name__.endswith("_py") else "cython"
