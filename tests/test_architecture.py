"""The import rules of docs/ARCHITECTURE.md, checked on every module's source:
model imports nothing of ours; pipeline never imports model or train; infra never
imports pipeline, model or train; no library module imports the test servers."""

import ast
import gc
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "pipeline", "train", "infra")
FORBIDDEN = {
    "model": {"pipeline", "train", "infra"},
    "pipeline": {"model", "train"},
    "infra": {"pipeline", "model", "train"},
    "train": set(),
}
# who may import infra.testing (servers and generated photos): only entry points
TESTING_ALLOWED = ("train/cli/", "train/bench/", "train/demo.py", "train/chaos.py")


def _parse(path: Path) -> ast.Module:
    """``ast.parse`` with the cycle collector off. Under Python 3.11, a collection
    inside the parse that runs a failing finalizer left by an earlier test (numba's,
    from FFCV) has pytest format that error, which parses again, and the outer parse
    fails: "SystemError: AST constructor recursion depth mismatch"."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return ast.parse(path.read_text(), str(path))
    finally:
        if enabled:
            gc.enable()


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in a file, including those inside functions."""
    out = []
    for node in ast.walk(_parse(path)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
    return out


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", PACKAGES)
def test_import_rules(package):
    broken = []
    for path in modules(package):
        for line, name in imports(path):
            top = name.split(".")[0]
            if top in FORBIDDEN[package]:
                broken.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
            rel = path.relative_to(ROOT).as_posix()
            if name.startswith("infra.testing") and not rel.startswith(TESTING_ALLOWED) and package != "infra":
                broken.append(f"{rel}:{line} imports the test module {name}")
    assert broken == []


def test_the_rules_check_something():
    """The walker sees the imports a rule would catch (a rule over nothing passes vacuously)."""
    found = {name.split(".")[0] for p in modules("train") for _, name in imports(p)}
    assert {"model", "pipeline", "infra"} <= found
    assert any(name == "infra.testing.photos" for p in modules("train") for _, name in imports(p))
