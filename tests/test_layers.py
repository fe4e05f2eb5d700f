"""The package's layers and sizes stay honest (docs/architecture.md, "Layers"):

- only ``swarm.net`` imports hivemind (every import statement, at any depth, is checked);
- the planner (``swarm.scheduler``), the election and the codec (``swarm.compression``, ``swarm.wire``,
  ``swarm.messages``) load no hivemind, and the scheduler, the election, plan adoption and the config
  load no torch either (checked in a fresh interpreter, so what they import transitively counts);
- no module under swarm/ is over 400 lines, and no class with behaviour keeps over 15 attributes.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "swarm"
MAX_LINES = 400
MAX_ATTRIBUTES = 15


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def imported(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports (any depth: functions too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_only_swarm_net_imports_hivemind():
    offenders = [str(p.relative_to(ROOT)) for p in modules()
                 if "hivemind" in imported(p) and p.parent != PACKAGE / "net"]
    assert offenders == [], f"hivemind imported outside swarm/net: {offenders}"
    assert any("hivemind" in imported(p) for p in (PACKAGE / "net").glob("*.py"))   # the check sees imports


@pytest.mark.parametrize("module, banned", [
    ("swarm.scheduler", ("torch", "hivemind")),
    ("swarm.election", ("torch", "hivemind")),
    ("swarm.churn.adoption", ("torch", "hivemind")),
    ("swarm.config", ("torch", "hivemind")),
    ("swarm.compression", ("hivemind",)),
    ("swarm.wire", ("hivemind",)),
    ("swarm.messages", ("hivemind",)),
    ("swarm.pipeline.protocol", ("hivemind",)),
])
def test_pure_layers_load_no_network_and_the_planner_no_torch(module, banned):
    code = f"import sys, {module}; print(' '.join(m for m in {banned!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "", f"{module} loads {out.stdout.strip()}"


def test_no_module_is_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in modules() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def _attributes(cls: type) -> set[str]:
    """Instance attributes a class (and its swarm bases) assigns: ``self.x = ...`` anywhere in it."""
    names = set()
    for klass in cls.__mro__:
        if not klass.__module__.startswith("swarm"):
            continue
        try:
            tree = ast.parse(inspect.getsource(klass).lstrip() if klass.__qualname__.count(".") == 0 else
                             _dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] \
                if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else []
            for target in targets:
                for t in ast.walk(target):
                    if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                        names.add(t.attr)
    return names


def _dedent(source: str) -> str:
    import textwrap
    return textwrap.dedent(source)


def _classes():
    for path in modules():
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        module = importlib.import_module(name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == name:
                yield cls


def test_no_class_with_behaviour_keeps_over_15_attributes():
    wide = {}
    for cls in _classes():
        if dataclasses.is_dataclass(cls) or issubclass(cls, (Exception, tuple)):
            continue   # plain records (dataclasses, named tuples) and errors are exempt
        if any(base.__module__.startswith(("pydantic", "enum")) for base in cls.__mro__[1:]):
            continue
        n = len(_attributes(cls))
        if n > MAX_ATTRIBUTES:
            wide[f"{cls.__module__}.{cls.__qualname__}"] = n
    assert wide == {}
