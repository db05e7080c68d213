"""Code prompts for a draft's distillation and for measuring it, from the standard library,
offline: "Write a Python function `textwrap.dedent(text)`: <its docstring's first line>".

    distill_set, held_out = code_prompts()          # disjoint, by a hash of each function's name
    code_prompts(limit=200)

Every public function of a fixed list of standard-library modules that has a docstring gives
one prompt. A function belongs to the held-out set (bench.speculative's code prompts) when the
SHA-256 of its qualified name falls in one tenth of the range, so the split does not depend on
the order functions are found in, or on which other functions exist in this Python.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import re
from dataclasses import dataclass

MODULES = ("textwrap", "json", "os.path", "shutil", "string", "itertools", "functools", "collections",
           "statistics", "random", "re", "datetime", "fractions", "heapq", "bisect", "csv", "pathlib",
           "urllib.parse", "base64", "hashlib", "difflib", "copy", "math", "operator", "calendar", "glob",
           "fnmatch", "html", "ipaddress", "uuid", "zlib", "gzip", "tempfile", "argparse", "logging")
HELD_OUT_SHARE = 10          # one name in ten is held out
_REPR = re.compile(r"<(?:function|class|built-in function|object) ([\w.]+)(?: at 0x[0-9a-f]+)?>")


@dataclass(frozen=True)
class CodePrompt:
    name: str            # the function's qualified name: its identity in every record
    text: str            # the user turn

    @property
    def held_out(self) -> bool:
        return int(hashlib.sha256(self.name.encode()).hexdigest(), 16) % HELD_OUT_SHARE == 0


def _functions() -> list[tuple[str, object]]:
    out = []
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for name, fn in sorted(vars(module).items()):
            if name.startswith("_") or not inspect.isfunction(fn) or fn.__module__ != module.__name__:
                continue
            out.append((f"{module_name}.{name}", fn))
    return out


def _prompt(name: str, fn) -> CodePrompt | None:
    doc = inspect.getdoc(fn)
    if not doc:
        return None
    try:
        signature = str(inspect.signature(fn))
    except (TypeError, ValueError):
        return None
    paragraph = " ".join(line.strip() for line in doc.strip().split("\n\n")[0].splitlines())
    first = paragraph.split(". ")[0].strip().rstrip(".")
    signature = _REPR.sub(r"\1", signature)          # `<function copy2 at 0x7f..>` -> copy2: the same text every run
    if "<" in signature:                               # another object's repr: no stable text for it
        return None
    return CodePrompt(name, f"Write a Python function `{name.rsplit('.', 1)[-1]}{signature}`: {first}.")


def code_prompts(limit: int | None = None) -> tuple[list[CodePrompt], list[CodePrompt]]:
    """(the distillation set, the held-out set), each in a stable order; limit: at most that
    many of each."""
    prompts = [p for p in (_prompt(n, f) for n, f in _functions()) if p is not None]
    train = [p for p in prompts if not p.held_out][:limit]
    held = [p for p in prompts if p.held_out][:limit]
    return train, held
