"""The architecture, checked: the core imports no stage, the model no optimisation, and no
function outside tests/ grows into a monolith."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STAGES = {"pretrain", "sft", "quantize", "serve", "demo", "evaluation", "bench", "gpu_check"}
PACKAGES = ["tinyllama", *sorted(STAGES - {"bench"}), "bench"]
MAX_FUNCTION_LINES = 80


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, absolute (relative imports resolved against its package)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = path.relative_to(ROOT).parent.parts
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[:len(package) - node.level + 1])
                out.add(".".join(base + ([node.module] if node.module else [])))
            else:
                out.add(node.module)
    return out


def python_files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def test_the_core_imports_no_stage():
    offenders = {f"{f.relative_to(ROOT)} imports {m}" for f in python_files("tinyllama")
                 for m in imported_modules(f) if m.split(".")[0] in STAGES}
    assert not offenders, sorted(offenders)


def test_stages_talk_through_files_not_imports():
    """A stage may import the core and itself; evaluation may read pretrain's shard and config
    formats and sft's data (its inputs), quantize the validation shards (its calibration text);
    bench and gpu_check measure everything."""
    allowed = {"evaluation": {"pretrain", "sft"}, "sft": set(), "pretrain": set(), "quantize": {"pretrain"},
               "serve": set(), "demo": {"serve"}}
    offenders = set()
    for stage, may in allowed.items():
        for f in python_files(stage):
            for m in imported_modules(f):
                top = m.split(".")[0]
                if top in STAGES and top != stage and top not in may:
                    offenders.add(f"{f.relative_to(ROOT)} imports {m}")
    assert not offenders, sorted(offenders)


def test_the_model_knows_no_optimisation():
    mods = imported_modules(ROOT / "tinyllama" / "model.py")
    assert not {m for m in mods if "packing" in m or "precision" in m}, mods


@pytest.mark.parametrize("package", PACKAGES)
def test_no_function_is_a_monolith(package):
    long = []
    for f in python_files(package):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{f.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long
