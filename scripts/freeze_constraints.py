"""constraints.txt from the running environment: `pip freeze` limited to what the project needs.

    .venv/bin/python scripts/freeze_constraints.py > constraints.txt      # what `make constraints` does

Walks the requirements of the core and of set-up's extras (scripts/setup_plan.py), then theirs, through
the installed packages' own metadata, and prints each package reached as NAME==VERSION. Left out: the
project itself; llama-cpp-python (set-up builds the version pyproject.toml's llama-cpp extra names,
which keeps it in one place), though not its dependencies; and what the environment holds for other
reasons. Local version labels are dropped (torch 2.13.0+cpu -> torch==2.13.0: the pin then matches
the CPU and the CUDA build alike). Run it in a venv the whole suite has just passed in.

Needs `packaging` (there in any venv set-up made: transformers, pytest and others require it).
"""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

sys.path.insert(0, str(Path(__file__).resolve().parent))
import setup_plan  # noqa: E402  (standard library only, beside this file)

HEADER = """\
# The exact versions the test suite passes with: scripts/setup.sh installs with `pip install -c` this
# file (CONSTRAINTS= to resolve freely instead). Regenerate with `make constraints` in a venv where
# `make test` has just passed. Not listed: the project, and llama-cpp-python (built by set-up at the
# version pyproject.toml's llama-cpp extra names). torch's pin is also set-up's default TORCH_SPEC.
"""


def _requires(dist: metadata.Distribution, extras: set[str]) -> list[Requirement]:
    """A distribution's requirements that apply here, for the given extras of it."""
    out = []
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras | {""}):
            out.append(req)
    return out


def closure(roots: list[Requirement]) -> dict[str, str]:
    """{canonical name: installed version} of every installed package the roots reach."""
    found: dict[str, str] = {}
    asked: set[tuple[str, frozenset[str]]] = set()
    todo = [r for r in roots if r.marker is None or r.marker.evaluate({"extra": ""})]
    while todo:
        req = todo.pop()
        name, extras = canonicalize_name(req.name), frozenset(canonicalize_name(e) for e in req.extras)
        if (name, extras) in asked:
            continue
        asked.add((name, extras))
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue                      # optional elsewhere, not installed here (e.g. a gpu extra)
        found[name] = dist.version
        todo += _requires(dist, set(extras))
    return found


def constraints() -> str:
    project = setup_plan.load_pyproject()
    reqs = setup_plan.requirements(project, setup_plan.DEFAULT_EXTRAS.split(",") + ["llama-cpp"])
    found = closure([Requirement(r) for r in reqs])          # llama-cpp-python's own dependencies included
    for skip in (canonicalize_name(project["name"]), setup_plan.LLAMA_CPP):
        found.pop(skip, None)
    lines = [f"{name}=={version.split('+', 1)[0]}" for name, version in sorted(found.items())]
    return HEADER + "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(constraints())
