"""The architecture, checked: the core imports no stage, the model no optimisation, and no
function outside tests/ grows into a monolith."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STAGES = {"prepare", "pretrain", "sft", "quantize", "serve", "demo", "evaluation", "bench", "gpu_check"}
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
    allowed = {"evaluation": {"pretrain", "sft"}, "sft": set(), "prepare": set(), "pretrain": set(), "quantize": {"pretrain"},
               "serve": set(), "demo": {"serve"}}
    offenders = set()
    for stage, may in allowed.items():
        for f in python_files(stage):
            for m in imported_modules(f):
                top = m.split(".")[0]
                if top in STAGES and top != stage and top not in may:
                    offenders.add(f"{f.relative_to(ROOT)} imports {m}")
    assert not offenders, sorted(offenders)


# the core's rooms, lowest first: a room imports the top-level utilities and the rooms below it
ROOMS = ("model", "formats", "inference")
# top-level files that reach into a room: precision times a model's own shapes; measure reads the
# CPU flags where the set-up script's build chooser keeps them (it runs before anything is installed)
TOP_INTO_ROOMS = {"precision.py": {"model"}, "measure.py": {"llamacpp"}}


def _rooms_imported(path: Path) -> set[str]:
    return {m.split(".")[1] for m in imported_modules(path)
            if m.startswith("tinyllama.") and m.split(".")[1] in (*ROOMS, "llamacpp")}


def test_the_core_is_in_rooms_that_import_downward():
    core = ROOT / "tinyllama"
    offenders = set()
    for i, room in enumerate(ROOMS):
        for f in (core / room).rglob("*.py"):
            above = _rooms_imported(f) - set(ROOMS[:i + 1])
            offenders |= {f"{f.relative_to(ROOT)} imports tinyllama.{r}" for r in above}
    for f in (core / "llamacpp").rglob("*.py"):
        offenders |= {f"{f.relative_to(ROOT)} imports tinyllama.{r}" for r in _rooms_imported(f) - {"llamacpp"}}
    for f in core.glob("*.py"):
        if f.name not in ("__init__.py", "__main__.py"):
            extra = _rooms_imported(f) - TOP_INTO_ROOMS.get(f.name, set())
            offenders |= {f"{f.relative_to(ROOT)} imports tinyllama.{r}" for r in extra}
    assert not offenders, sorted(offenders)
    assert {d.name for d in core.iterdir() if (d / "__init__.py").is_file()} == {*ROOMS, "llamacpp"}


def _core_module(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def _file_level_core_imports(path: Path, core: set[str]) -> set[str]:
    """The core modules a file imports when it is loaded (its top-level statements; a function's
    own import runs on first call). `from a.b import c` counts a.b.c where c is a module."""
    package = path.relative_to(ROOT).parent.parts
    out = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join([*package[:len(package) - node.level + 1], *([node.module] if node.module else [])]) \
                if node.level else node.module
            names = [base, *(f"{base}.{a.name}" for a in node.names)]
        else:
            continue
        out |= {n for n in names if n in core}
    return out - {_core_module(path), "tinyllama"}


def test_the_core_import_graph_is_at_most_six_levels_deep():
    """Levels as in a layered design: a file that imports no core file (errors, definitions, cli)
    is level 0, every other file one above the highest file it imports when loaded. At most 6:
    any chain a newcomer follows from a file to the bottom has six imports or fewer."""
    files = {_core_module(f): f for f in python_files("tinyllama")}
    graph = {m: _file_level_core_imports(f, set(files)) - {p for p in files if m.startswith(p + ".")}
             for m, f in files.items()}

    def chain(m: str, seen: tuple = ()) -> list[str]:
        assert m not in seen, f"import cycle: {' -> '.join((*seen, m))}"
        below = [chain(d, (*seen, m)) for d in graph[m]]
        return [m, *max(below, key=len, default=[])]

    deepest = max((chain(m) for m in graph), key=len)
    assert len(deepest) - 1 <= 6, " -> ".join(deepest)


# core files that are commands of their own (python -m ...), not imported by what they serve
CORE_COMMANDS = {"tinyllama.__main__", "tinyllama.real_model"}


def test_no_core_file_serves_a_single_stage():
    """The core holds what several stages share; what one stage alone uses lives in that stage.
    bench and gpu_check count as users: they measure what the stages share."""
    files = {_core_module(f): f for f in python_files("tinyllama")}
    users = {m: set() for m in files}
    for f in files.values():
        for m in _file_level_core_imports(f, set(files)) | _function_level_core_imports(f, set(files)):
            users[m].add("core")
    for stage in [*STAGES, "lifecycle.py"]:
        for f in python_files(stage) if stage in STAGES else [ROOT / stage]:
            for m in _file_level_core_imports(f, set(files)) | _function_level_core_imports(f, set(files)):
                users[m].add(stage)
    lonely = {f"{m}: only {sorted(u) or 'nothing'}" for m, u in users.items()
              if len(u) < 2 and "core" not in u and m not in CORE_COMMANDS and not files[m].name == "__init__.py"}
    assert not lonely, sorted(lonely)


def _function_level_core_imports(path: Path, core: set[str]) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out |= {n for n in (node.module, *(f"{node.module}.{a.name}" for a in node.names)) if n in core}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in core}
    return out


def test_the_model_knows_no_optimisation():
    mods = imported_modules(ROOT / "tinyllama" / "model" / "model.py")
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
