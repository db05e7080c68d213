"""What pyproject.toml declares, checked against what the code imports: every third-party import is
declared, the ones a stage runs at import time in the core or that stage's extra; llama-cpp-python is
named once; constraints.txt pins every declared package at a version its range allows; bitsandbytes
is asked for only where PyPI has a wheel, and QLoRA names the fix where it is missing."""

import ast
import importlib.metadata
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.markers import Marker, default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
plan = runpy.run_path(str(ROOT / "scripts" / "setup_plan.py"), run_name="setup_plan")
PROJECT = plan["load_pyproject"]()
LOCAL = {"tinyllama", "prepare", "pretrain", "sft", "quantize", "serve", "demo", "evaluation", "bench", "gpu_check",
         "lifecycle", "tinyllama_lifecycle"}
# each stage, and the extras `pip install tinyllama-lifecycle[...]` must name for it to import
STAGE_EXTRAS = {"tinyllama": [], "tinyllama_lifecycle": [], "lifecycle.py": [], "prepare": ["prepare"], "pretrain": ["train"], "sft": ["sft"],
                "quantize": ["gguf"], "serve": ["serve"], "demo": ["demo"], "evaluation": ["eval"]}
# import name -> distribution, where they differ
DISTRIBUTION = {"yaml": "pyyaml", "llama_cpp": "llama-cpp-python", "lm_eval": "lm-eval", "flash_attn": "flash-attn",
                "liger_kernel": "liger-kernel", "google": "protobuf"}
# imported only when a flag asks for them, with an ImportError that names the fix; deliberately undeclared
UNDECLARED = {"wandb": "pretrain --wandb: metrics also to Weights & Biases; says `pip install wandb` without it"}


# ---- the imports ---------------------------------------------------------------------------------

def _guards_import(node: ast.Try) -> bool:
    caught = " ".join(ast.unparse(h.type) for h in node.handlers if h.type is not None)
    return any(name in caught for name in ("ImportError", "ModuleNotFoundError", "Exception"))


def _absolute(node: ast.ImportFrom, package: tuple[str, ...]) -> str:
    if not node.level:
        return node.module
    return ".".join([*package[:len(package) - node.level + 1], *([node.module] if node.module else [])])


def imports(path: Path) -> list[tuple[str, bool]]:
    """(module, at load time) for every import in a file. At load time: not inside a function, not in a
    try that catches ImportError, not under `if TYPE_CHECKING`. `from a import b` also yields a.b."""
    package = path.relative_to(ROOT).parent.parts
    out: list[tuple[str, bool]] = []

    def visit(node, load: bool) -> None:
        if isinstance(node, ast.Import):
            out.extend((a.name, load) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, package)
            out.extend([(base, load), *((f"{base}.{a.name}", load) for a in node.names)])
        elif isinstance(node, ast.Try) and _guards_import(node):
            for child in node.body:
                visit(child, False)
            for child in [*node.handlers, *node.orelse, *node.finalbody]:
                visit(child, load)
        else:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                load = False
            elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                load = False
            for child in ast.iter_child_nodes(node):
                visit(child, load)

    visit(ast.parse(path.read_text(), filename=str(path)), True)
    return out


def _local_file(module: str) -> Path | None:
    where = ROOT.joinpath(*module.split("."))
    for f in (where.with_suffix(".py"), where / "__init__.py"):
        if f.is_file():
            return f
    return None


def _third_party(module: str) -> str | None:
    top = module.split(".")[0]
    return None if top in LOCAL or top in sys.stdlib_module_names or top == "__future__" else top


def code_files(stage: str) -> list[Path]:
    return [ROOT / stage] if stage.endswith(".py") else sorted((ROOT / stage).rglob("*.py"))


def load_time_imports(roots: list[Path]) -> dict[str, str]:
    """{third-party top-level module: a file that imports it} for everything importing `roots` runs:
    their load-time imports, through the project's own modules (and the packages above them)."""
    todo, seen, found = list(roots), set(), {}
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        for module, load in imports(f):
            if not load:
                continue
            top = _third_party(module)
            if top:
                found.setdefault(top, str(f.relative_to(ROOT)))
                continue
            parts = module.split(".")
            todo += [g for i in range(1, len(parts) + 1) if (g := _local_file(".".join(parts[:i])))]
    return found


def declared(extras: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(r).name) for r in plan["requirements"](PROJECT, extras)}


def distribution(module: str) -> str:
    return canonicalize_name(DISTRIBUTION.get(module, module))


# ---- the tests -----------------------------------------------------------------------------------

def test_each_stage_imports_with_the_core_and_its_own_extra():
    missing = []
    for stage, extras in STAGE_EXTRAS.items():
        have = declared(extras)
        for module, where in sorted(load_time_imports(code_files(stage)).items()):
            if distribution(module) not in have:
                missing.append(f"{stage} ([{','.join(extras)}]): {where} imports {module} on load, "
                               f"but {distribution(module)} is not in the core or that extra")
    assert not missing, "\n".join(missing)


def test_every_third_party_import_is_declared_somewhere():
    """Lazy imports too (a flag's path, a GPU kernel): in some extra, or in UNDECLARED with a reason."""
    everything = declared(list(PROJECT["optional-dependencies"]))
    missing = set()
    for stage in [*STAGE_EXTRAS, "bench", "gpu_check"]:
        for f in code_files(stage):
            for module, _ in imports(f):
                top = _third_party(module)
                if top and distribution(top) not in everything and top not in UNDECLARED:
                    missing.add(f"{f.relative_to(ROOT)} imports {top}: declare {distribution(top)} in an extra")
    assert not missing, "\n".join(sorted(missing))


def test_import_names_map_to_the_installed_distributions():
    """DISTRIBUTION (and the default, the import name itself) agrees with the installed metadata."""
    installed = importlib.metadata.packages_distributions()
    wrong = []
    for module in sorted({m for stage in STAGE_EXTRAS for f in code_files(stage) for m, _ in imports(f)}):
        top = _third_party(module)
        if top and top in installed and distribution(top) not in {canonicalize_name(d) for d in installed[top]}:
            wrong.append(f"{top}: mapped to {distribution(top)}, installed as {installed[top]}")
    assert not wrong, wrong


def test_llama_cpp_python_is_named_once_and_every_place_reads_it_there():
    from tinyllama.paths import LLAMA_CPP_VERSION

    optional = PROJECT["optional-dependencies"]
    named = [(extra, r) for extra, reqs in optional.items() for r in reqs
             if canonicalize_name(Requirement(r).name) == "llama-cpp-python"]
    assert named == [("llama-cpp", f"llama-cpp-python>={LLAMA_CPP_VERSION}")]
    for extra in ("gguf", "serve"):           # `pip install tinyllama-lifecycle[serve]` still gets it
        assert "tinyllama-lifecycle[llama-cpp]" in optional[extra]
    assert "llama-cpp" not in plan["DEFAULT_EXTRAS"].split(",")       # set-up builds it instead
    literal = [str(f.relative_to(ROOT)) for pattern in ("**/*.py", "**/*.sh", "Makefile", "*.toml", "constraints.txt")
               for f in ROOT.glob(pattern) if ".venv" not in f.parts and f.name != "pyproject.toml"
               and LLAMA_CPP_VERSION in f.read_text()]
    assert not literal, f"the llama-cpp-python version is written out in {literal}: read it from pyproject.toml"


def _pins() -> dict[str, str]:
    lines = [line for line in (ROOT / "constraints.txt").read_text().splitlines() if line and not line.startswith("#")]
    pins = {}
    for line in lines:
        name, _, version = line.partition("==")
        assert version and "+" not in version and canonicalize_name(name) == name, line
        assert name not in pins, f"{name} pinned twice"
        pins[name] = version
    return pins


def test_constraints_pin_every_declared_package_inside_its_range():
    pins = _pins()
    assert "tinyllama-lifecycle" not in pins and "llama-cpp-python" not in pins
    assert list(pins) == sorted(pins)
    bad = []
    for text in plan["without_llama_cpp"](plan["requirements"](PROJECT, plan["DEFAULT_EXTRAS"].split(","))):
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate():
            continue
        name = canonicalize_name(req.name)
        if name not in pins:
            bad.append(f"{text}: not pinned (make constraints)")
        elif not req.specifier.contains(pins[name], prereleases=True):
            bad.append(f"{text}: pinned to {pins[name]}, outside the declared range")
    assert not bad, "\n".join(bad)


def test_make_constraints_writes_the_same_kind_of_file():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "freeze_constraints.py")], capture_output=True,
                         text=True, check=True).stdout
    pins = dict(line.split("==") for line in out.splitlines() if line and not line.startswith("#"))
    assert "llama-cpp-python" not in pins and "tinyllama-lifecycle" not in pins
    assert "torch" in pins and "+" not in pins["torch"]
    if "llama-cpp-python" in {canonicalize_name(d.metadata["Name"]) for d in importlib.metadata.distributions()}:
        assert "diskcache" in pins                 # llama-cpp-python's own dependencies stay pinned


BNB_WHEELS = [("linux", "x86_64", "6.1.0-18-amd64"), ("linux", "aarch64", "5.15.0-1051-aws"),
              ("win32", "AMD64", "10"), ("win32", "ARM64", "11"), ("darwin", "arm64", "23.1.0")]
NO_BNB_WHEEL = [("darwin", "x86_64", "23.1.0"), ("darwin", "arm64", "22.6.0"), ("linux", "ppc64le", "5.14.0"),
                ("linux", "armv7l", "6.1.21-v8+")]


@pytest.mark.parametrize("system,machine,release,expected",
                         [(*p, True) for p in BNB_WHEELS] + [(*p, False) for p in NO_BNB_WHEEL])
def test_bitsandbytes_is_asked_for_only_where_pypi_has_a_wheel(system, machine, release, expected):
    """bitsandbytes 0.50 ships wheels only (manylinux x86-64/aarch64, win amd64/arm64, macOS 14 arm64):
    elsewhere an unconditional requirement would make `pip install .[sft]` fail to resolve."""
    (req,) = [Requirement(r) for r in PROJECT["optional-dependencies"]["sft"] if r.startswith("bitsandbytes")]
    env = default_environment() | {"sys_platform": system, "platform_machine": machine, "platform_release": release}
    assert Marker(str(req.marker)).evaluate(env) is expected


def test_qlora_without_bitsandbytes_names_the_fix(monkeypatch, tmp_path):
    from sft import train

    real = train.importlib.util.find_spec
    monkeypatch.setattr(train.importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(train.SFTError, match=r"--method qlora needs bitsandbytes, which is not installed: "
                                             r"pip install 'bitsandbytes>=0.50' .* or fine-tune with --method lora"):
        train._check(train.SFTArgs(base=str(tmp_path / "nowhere"), out=str(tmp_path / "out"), method="qlora"))
