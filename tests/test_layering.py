"""The house's layering, checked on every import statement (function-level ones too):

    kernels  ->  ops (launchers, autograd, the dispatch point)  ->  modules  ->  tools

An arrow only points down: nothing under ``kernels/`` imports anything above it, nothing under
``hyperkern/ops/`` imports a module or a tool, the modules import no tool, and no module of the
package takes part in an import cycle."""
from __future__ import annotations

import ast
import os
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = {"hyperkern.bench", "hyperkern.report", "hyperkern.perf_model", "hyperkern.verify", "hyperkern.compile_check",
         "hyperkern.gpu_check", "hyperkern.__main__", "hyperkern.timing", "hyperkern.testing"}
MODULES = {"hyperkern.modules", "hyperkern.static"}


def _modules():
    mods = {}
    for base, pkg in (("hyperkern", "hyperkern"), ("kernels", "hyperkern.kernels")):
        for dirpath, _, files in os.walk(os.path.join(ROOT, base)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, f), os.path.join(ROOT, base))[:-3].replace(os.sep, ".")
                    rel = "" if rel == "__init__" else rel[: -len(".__init__")] if rel.endswith(".__init__") else rel
                    mods[pkg + ("." + rel if rel else "")] = os.path.join(dirpath, f)
    return mods


def _edges(mods):
    """module -> the package modules it imports (``from pkg import sub`` counts as ``pkg.sub``)."""
    edges = defaultdict(set)
    for name, path in mods.items():
        is_pkg = path.endswith("__init__.py")
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                parts = name.split(".") if is_pkg else name.split(".")[:-1]
                if node.level:
                    parts = parts[:len(parts) - (node.level - 1)]
                    base = ".".join(parts + ([node.module] if node.module else []))
                else:
                    base = node.module
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods]
                targets = subs + ([base] if len(subs) < len(node.names) else [])
            else:
                continue
            for t in targets:
                while t and t not in mods:
                    t = t.rsplit(".", 1)[0] if "." in t else ""
                if t and t != name:
                    edges[name].add(t)
    return edges


def test_no_import_cycle():
    mods = _modules()
    edges = _edges(mods)
    state, cycles = {}, []

    def visit(v, stack):
        state[v] = 1
        for w in sorted(edges[v]):
            if state.get(w) == 1:
                cycles.append(stack[stack.index(w):] + [w])
            elif w not in state:
                visit(w, stack + [w])
        state[v] = 2

    for m in sorted(mods):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def test_arrows_point_down():
    mods = _modules()
    bad = []
    for a, targets in _edges(mods).items():
        for b in targets:
            if a.startswith("hyperkern.kernels") and not b.startswith("hyperkern.kernels"):
                bad.append((a, b))
            elif a.startswith("hyperkern.ops") and (b in TOOLS or b in MODULES or b == "hyperkern"):
                bad.append((a, b))
            elif a in MODULES and b in TOOLS:
                bad.append((a, b))
    assert not bad, bad


def test_the_checks_see_a_planted_arrow_and_cycle(monkeypatch):
    """A test that cannot fail is a defect: an op module importing a tool, and a cycle, are reported."""
    import sys

    import pytest

    edges = _edges(_modules())
    assert "hyperkern.ops.hyper_lstm.fused_triton.launch" in edges  # the walk sees the subpackages
    planted = defaultdict(set, {k: set(v) for k, v in edges.items()})
    planted["hyperkern.ops.precision"].add("hyperkern.bench")  # ops -> tool, and bench -> ... -> precision
    monkeypatch.setattr(sys.modules[__name__], "_edges", lambda mods: planted)
    with pytest.raises(AssertionError):
        test_arrows_point_down()
    with pytest.raises(AssertionError):
        test_no_import_cycle()
