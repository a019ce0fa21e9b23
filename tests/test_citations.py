"""Every path, module and function that the README, docs/ and the docstrings and comments of vmr/
and benchmarks/ cite exists: a reader who follows one finds it."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOP = ("vmr", "docs", "configs", "benchmarks", "tests", "launch")
PATH = re.compile(rf"(?<![\w./-])((?:{'|'.join(TOP)})/[\w./-]*\w)(?=([<{{*]?))")
OUTPUT = re.compile(r"--(?:out|json|predictions-out)[ =]$")  # a file a command is told to write
DOTTED = re.compile(r"(?<![\w./-])(vmr(?:\.\w+)+)")


def cited_in() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "vmr").rglob("*.py")),
            *sorted((ROOT / "benchmarks").glob("*.py"))]


def test_every_cited_path_exists():
    missing = []
    for source in cited_in():
        text = source.read_text()
        for match in PATH.finditer(text):
            if match.group(2) or re.fullmatch(r"[A-Z]+", Path(match.group(1)).stem):  # a pattern, a placeholder
                continue
            if OUTPUT.search(text[max(0, match.start() - 20):match.start()]):
                continue
            if not (ROOT / match.group(1)).exists():
                missing.append(f"{source.relative_to(ROOT)} cites {match.group(1)}")
    assert not missing, "\n".join(missing)


def resolves(name: str) -> bool:
    """``vmr.a.b.c``: the longest importable module, then attributes; a file suffix ends it."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attribute in parts[cut:]:
            if attribute in ("py", "yaml", "json", "md"):
                return True
            if not hasattr(obj, attribute):
                return False
            obj = getattr(obj, attribute)
        return True
    return False


def test_every_cited_module_and_function_exists():
    missing = [f"{source.relative_to(ROOT)} cites {name}" for source in cited_in()
               for name in sorted(set(DOTTED.findall(source.read_text()))) if not resolves(name)]
    assert not missing, "\n".join(missing)
