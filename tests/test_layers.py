"""The package's layers and their import direction, read from the source (every import, lazy ones too).

    core <- model <- executor <- engine <- serving <- cli, benchmarks
                                  embeddings <-'
    openai_api: core's torch-free modules, serving's protocol modules and pagetron.client only

Plus: the frontend process never loads torch, and exactly one place ends a sequence.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

BACKEND = Path(__file__).resolve().parents[1] / "backend"

# package -> what it may import from pagetron (prefixes); anything else from pagetron is a violation
ALLOWED = {
    "core": ("pagetron.backend.core",),
    "model": ("pagetron.backend.core", "pagetron.backend.model", "pagetron.kernels"),
    "executor": (
        "pagetron.backend.core",
        "pagetron.backend.model",
        "pagetron.backend.executor",
        "pagetron.kernels",
    ),
    "engine": (
        "pagetron.backend.core",
        "pagetron.backend.model",
        "pagetron.backend.executor",
        "pagetron.backend.engine",
    ),
    "embeddings": ("pagetron.backend.embeddings",),
    "serving": (
        "pagetron.backend.core",
        "pagetron.backend.model",
        "pagetron.backend.executor",
        "pagetron.backend.engine",
        "pagetron.backend.embeddings",
        "pagetron.backend.serving",
    ),
    "openai_api": (
        "pagetron.backend.core.chat_messages",
        "pagetron.backend.core.errors",
        "pagetron.backend.core.json_schema",
        "pagetron.backend.core.sampling_params",
        "pagetron.backend.serving.constants",
        "pagetron.backend.serving.schema",
        "pagetron.backend.openai_api",
        "pagetron.client",
    ),
}
# third-party packages a layer must not import (directly; torch-free layers are also checked at runtime)
FORBIDDEN = {
    "core": ("torch", "triton", "transformers"),
    "openai_api": ("torch", "triton", "transformers", "pagetron.kernels"),
}
# modules every process loads, which must therefore stay light (the frontend imports them)
TORCH_FREE_MODULES = (
    "pagetron.backend.core.chat_messages",
    "pagetron.backend.core.errors",
    "pagetron.backend.core.json_schema",
    "pagetron.backend.core.sampling_params",
    "pagetron.backend.serving.constants",
    "pagetron.backend.serving.schema",
    "pagetron.client",
)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every import in the file, at any depth (lazy imports count)."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            # `from pagetron.backend.engine import llm` imports pagetron.backend.engine.llm too
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def violations(package: str) -> list[str]:
    allowed, forbidden = ALLOWED[package], FORBIDDEN.get(package, ())
    bad = []
    for path in sorted((BACKEND / package).rglob("*.py")):
        for line, module in imports_of(path):
            where = f"{path.relative_to(BACKEND.parent)}:{line} imports {module}"
            if any(module == f or module.startswith(f + ".") for f in forbidden):
                bad.append(where)
            elif module.startswith("pagetron.") and module != "pagetron.backend":
                if not any(module == a or module.startswith(a + ".") for a in allowed):
                    bad.append(where)
    return bad


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_layer_imports_only_downward(package):
    assert violations(package) == []


def test_every_backend_package_has_a_layer():
    packages = {p.name for p in BACKEND.iterdir() if (p / "__init__.py").exists()}
    assert packages - set(ALLOWED) == {"cli", "benchmarks"}  # the top: they may import anything


def test_the_rules_catch_an_upward_import(tmp_path, monkeypatch):
    fake = tmp_path / "backend"
    (fake / "core").mkdir(parents=True)
    (fake / "core" / "__init__.py").write_text("")
    (fake / "core" / "bad.py").write_text(
        "def f():\n    from pagetron.backend.engine import llm\n    import torch\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "BACKEND", fake)
    assert [v.split(" imports ")[1] for v in violations("core")] == [
        "pagetron.backend.engine",
        "pagetron.backend.engine.llm",
        "torch",
    ]


def test_the_frontend_and_light_modules_load_no_torch():
    code = (
        "import sys\n"
        f"for name in {TORCH_FREE_MODULES + ('pagetron.backend.openai_api.app',)!r}:\n"
        "    __import__(name)\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'triton') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def _assignments(path: Path) -> list[tuple[str, int, str]]:
    """(function, line, attribute) of every assignment to ``.finish_reason`` or ``.status``."""
    tree = ast.parse(path.read_text())
    found = []
    for func in ast.walk(tree):
        if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(func):
            targets = node.targets if isinstance(node, ast.Assign) else []
            for target in targets:
                for t in target.elts if isinstance(target, ast.Tuple) else [target]:
                    if isinstance(t, ast.Attribute) and t.attr in ("finish_reason", "status"):
                        found.append((func.name, node.lineno, t.attr))
    return found


def test_exactly_one_place_ends_a_sequence():
    """No module that handles Sequence objects sets a finish reason or the FINISHED status outside
    Scheduler._finish (outputs carry a finish_reason of their own, copied from the sequence)."""
    writers = {}
    for path in sorted(BACKEND.rglob("*.py")):
        if path.name != "sequence.py" and "core.sequence import" not in path.read_text():
            continue
        for func, line, attr in _assignments(path):
            if attr == "finish_reason" or _sets_finished(path, line):
                writers.setdefault(f"{path.relative_to(BACKEND)}:{func}", []).append(attr)
    assert writers == {"core/scheduler.py:_finish": ["status", "finish_reason"]}


def _sets_finished(path: Path, line: int) -> bool:
    return "FINISHED" in path.read_text().splitlines()[line - 1]
