"""The house rules a reader relies on: every module says what it owns in a docstring, and no
module reaches into the Isolator's or the Supervisor's private fields (the Supervisor's internal
API, listed in vmiso/supervisor.py, is the way in). Checked by reading every module's syntax tree."""
import ast
import os

import pytest

from tests.unit.test_imports import modules

# The names the package gives an Isolator or a Supervisor it was handed.
HOLDERS = {"iso", "isolator", "sup", "supervisor", "warm_iso"}


def trees():
    for module, path in sorted(modules().items()):
        with open(path, encoding="utf-8") as f:
            yield module, path, ast.parse(f.read())


def private_reaches(tree):
    """``holder._field`` and ``x.iso._field`` / ``x.supervisor._field`` in ``tree``: (line, text)."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or not node.attr.startswith("_") or node.attr.startswith("__"):
            continue
        owner = node.value
        name = owner.id if isinstance(owner, ast.Name) else owner.attr if isinstance(owner, ast.Attribute) else None
        if name in HOLDERS:
            found.append((node.lineno, f"{name}.{node.attr}"))
    return found


def test_the_checker_finds_a_private_reach():
    tree = ast.parse("def f(iso, self):\n    iso._lock\n    self.iso._get(1)\n    self._own\n")
    assert private_reaches(tree) == [(2, "iso._lock"), (3, "iso._get")]


@pytest.mark.parametrize("module, path, tree", list(trees()), ids=lambda v: v if isinstance(v, str) and
                         v.startswith("vmiso") else "")
def test_each_module_says_what_it_owns_and_uses_no_private_field_of_another(module, path, tree):
    doc = ast.get_docstring(tree)
    assert doc and len(doc) >= 40, f"{module}: a module docstring saying what the module owns"
    if os.path.basename(path) not in ("isolator.py", "supervisor.py"):
        assert private_reaches(tree) == [], f"{module} reaches into an Isolator's or Supervisor's privates"
