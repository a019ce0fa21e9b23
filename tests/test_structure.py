"""The house rules, read from the source: which module may import which, module and loop sizes.

Every module of vmr sits on a floor. A module imports only from its own floor or lower ones, with
no cycle; ``data`` and ``model`` never import each other; the metrics import only ``spans``. Only
the command layer (the top floor) ties everything together. A new module must be given a floor
here: where it goes is a design decision, made once, on purpose.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vmr"

FLOORS = [
    ["vmr.errors", "vmr.spans", "vmr.eval", "vmr.eval.highlights"],  # (vmr.eval: an empty package)
    ["vmr.io"],
    ["vmr.config"],
    ["vmr.vocab", "vmr.text", "vmr.runtime", "vmr.figures", "vmr.eval.metrics", "vmr.checkpoint"],
    ["vmr.data.*", "vmr.model.*", "vmr.eval.report", "vmr.eval.corpus"],  # data and model: never each other
    ["vmr.cache", "vmr.bundle", "vmr.synth"],
    ["vmr.convert", "vmr.encode", "vmr.ann", "vmr.prepared", "vmr.eval.predict", "vmr.features", "vmr.search",
     "vmr.train"],
    ["vmr.bench.*"],
    ["vmr", "vmr.cli", "vmr.demo.*"],  # the command layer
]
MAX_MODULE_LINES = 460
MAX_LOOP_FUNCTION_LINES = 80  # vmr/train.py, readable top to bottom


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The vmr modules ``path`` imports, at the top or inside functions (a deferred import is still
    a dependency)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            for alias in node.names:
                if f"{base}.{alias.name}" in modules:  # from vmr import synth
                    found.add(f"{base}.{alias.name}")
                elif base in modules:
                    found.add(base)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in modules}
    return found - {name}


def graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imports_of(path, set(paths)) for name, path in paths.items()}


def floor_of(module: str) -> int:
    for level, names in enumerate(FLOORS):
        for pattern in names:
            if module == pattern or (pattern.endswith(".*") and (module + ".").startswith(pattern[:-1])):
                return level
    raise AssertionError(f"{module} has no floor in tests/test_structure.py: decide where it belongs")


def test_every_module_has_a_floor():
    for module in graph():
        floor_of(module)


def test_nothing_imports_upward():
    upward = [f"{m} (floor {floor_of(m)}) imports {d} (floor {floor_of(d)})"
              for m, deps in graph().items() for d in deps if floor_of(d) > floor_of(m)]
    assert not upward, "\n".join(upward)


def test_there_is_no_import_cycle():
    edges, state, cycles = graph(), {}, []

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for dep in sorted(edges[module]):
            if state.get(dep) == "open":
                cycles.append(" -> ".join([*path[path.index(dep):], dep]))
            elif dep not in state:
                visit(dep, [*path, dep])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(cycles)


def test_data_and_model_never_import_each_other_and_metrics_only_spans_and_highlights():
    edges = graph()
    for module, deps in edges.items():
        if module.startswith("vmr.data"):
            assert not [d for d in deps if d.startswith("vmr.model")], module
        if module.startswith("vmr.model"):
            assert not [d for d in deps if d.startswith("vmr.data")], module
    assert edges["vmr.eval.metrics"] <= {"vmr.spans", "vmr.eval.highlights"}
    assert edges["vmr.spans"] == set() and edges["vmr.io"] <= {"vmr.errors"}
    assert edges["vmr.config"] <= {"vmr.errors", "vmr.io"}


def test_the_checker_sees_a_cycle_and_an_upward_import(tmp_path, monkeypatch):
    """The rules above would pass on a checker that saw nothing: show it catches both faults."""
    fake = tmp_path / "vmr"
    (fake / "data").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "data" / "__init__.py").write_text("")
    (fake / "spans.py").write_text("from vmr.data import stream\n")  # floor 0 -> floor 4
    (fake / "data" / "stream.py").write_text("def f():\n    from vmr import spans\n")  # and back: a cycle
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    edges = graph()
    assert edges["vmr.spans"] == {"vmr.data.stream"} and edges["vmr.data.stream"] == {"vmr.spans"}
    with pytest.raises(AssertionError, match="imports vmr.data.stream"):
        test_nothing_imports_upward()
    with pytest.raises(AssertionError, match="vmr.data.stream -> vmr.spans -> vmr.data.stream"):
        test_there_is_no_import_cycle()


def test_modules_and_the_training_loop_stay_small():
    long = [f"{p.relative_to(PACKAGE.parent)}: {n} lines" for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES]
    assert not long, "\n".join(long)
    tree = ast.parse((PACKAGE / "train.py").read_text())
    loop = [f"{node.name}: {node.end_lineno - node.lineno + 1} lines" for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno + 1 > MAX_LOOP_FUNCTION_LINES]
    assert not loop, "\n".join(loop)
