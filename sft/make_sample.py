"""Builds the shipped SFT sample: questions about Python built-ins answered from their own
documentation, in the OpenAssistant-Guanaco layout ("### Human: ...### Assistant: ...").

    python -m sft.make_sample --out sft/samples/python-qa-guanaco.jsonl

No model hub has to be reachable: the answers are the docstrings of this interpreter (PSF
licence, the same text as the python3.X-doc pages the pretraining corpus reads), so a small
base model has seen the subject and can learn the *chat behaviour* (answer in the template,
then stop) from a few hundred conversations on a CPU. The file in the repository was made with
Python 3.11; the output is deterministic for a given interpreter.
"""

from __future__ import annotations

import argparse
import builtins
import importlib
import inspect
import json
import random
import re
from pathlib import Path

from tinyllama.atomic import atomic_file

from .data import SAMPLE_PATH, to_guanaco

# Modules whose public functions are common questions; classes' methods for the built-in types.
MODULES = ["math", "os.path", "json", "itertools", "functools", "random", "string", "re", "shutil", "time",
           "statistics", "textwrap", "heapq", "bisect", "operator", "os", "collections", "glob", "fnmatch",
           "base64", "hashlib", "copy", "datetime", "pathlib", "subprocess", "csv", "gzip", "zlib", "uuid",
           "secrets", "tempfile", "difflib", "unicodedata", "struct", "calendar", "keyword", "pprint"]
TYPES = [str, list, dict, set, tuple, int, float, bytes, frozenset]

QUESTIONS = [
    "What does {name} do in Python?",
    "What is {name} for?",
    "Can you explain {name}?",
    "How does {name} work?",
    "Tell me about {name} in Python.",
    "What does the Python function {name} do?",
    "I keep seeing {name} in Python code. What does it do?",
    "Briefly, what is {name}?",
]
FOLLOW_UPS = [
    ("What arguments does it take?", "Its signature is `{sig}`."),
    ("How do I call it?", "Call it as `{sig}`."),
    ("What is its signature?", "`{sig}`"),
]
MAX_ANSWER_CHARS = 600


def _summary(doc: str) -> str | None:
    """The docstring's opening paragraphs (no doctest, no argument list), at most
    MAX_ANSWER_CHARS, cut at a sentence end."""
    paras = [p.strip() for p in re.split(r"\n\s*\n", doc) if p.strip()]
    if len(paras) > 1 and re.match(r"^(async )?[\w.]+\(.*\)( -> .*)?$", paras[0]):
        paras = paras[1:]          # a signature line heading the docstring; the follow-up turn gives it
    keep: list[str] = []
    for p in paras:
        if p.startswith((">>>", "  ")) or "-->" in p or re.match(r"^\w+\n\s", p):
            break
        text = " ".join(line.strip() for line in p.splitlines())
        if sum(len(k) for k in keep) + len(text) > MAX_ANSWER_CHARS:
            break
        keep.append(text)
    if not keep:
        return None
    answer = "\n\n".join(keep)
    return answer if len(answer) >= 25 else None


def _signature(name: str, obj) -> str | None:
    try:
        return f"{name}{inspect.signature(obj)}"
    except (TypeError, ValueError):
        return None


def documented_objects() -> list[tuple[str, object]]:
    """(qualified name, object) for built-in functions, built-in types' methods and the public
    functions of MODULES; sorted for determinism."""
    found: dict[str, object] = {}
    for name in dir(builtins):
        obj = getattr(builtins, name)
        if name.startswith("_") or not callable(obj):
            continue
        if isinstance(obj, type) and issubclass(obj, BaseException):
            continue
        found[name] = obj
    for t in TYPES:
        for name, obj in vars(t).items():
            if not name.startswith("_") and callable(obj):
                found[f"{t.__name__}.{name}"] = obj
    for mod_name in MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            continue
        public = getattr(mod, "__all__", None) or [n for n in dir(mod) if not n.startswith("_")]
        for name in public:
            obj = getattr(mod, name, None)
            if callable(obj) and (inspect.isfunction(obj) or inspect.isbuiltin(obj) or inspect.isclass(obj)):
                found[f"{mod_name}.{name}"] = obj
    return sorted(found.items())


def build_sample(seed: int = 0) -> list[str]:
    """Guanaco `text` strings, one conversation each; about a fifth carry a follow-up turn."""
    rng = random.Random(seed)
    texts = []
    for name, obj in documented_objects():
        doc = inspect.getdoc(obj)
        answer = _summary(doc) if doc else None
        if answer is None:
            continue
        shown = f"`{name}()`" if callable(obj) and not inspect.isclass(obj) else f"`{name}`"
        messages = [{"role": "user", "content": rng.choice(QUESTIONS).format(name=shown)},
                    {"role": "assistant", "content": answer}]
        sig = _signature(name, obj)
        if sig and rng.random() < 0.2:
            question, reply = rng.choice(FOLLOW_UPS)
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": reply.format(sig=sig)}]
        texts.append(to_guanaco(messages))
    return texts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sft.make_sample", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=SAMPLE_PATH, help="JSONL file to write (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="question and follow-up choice (default: 0)")
    args = parser.parse_args(argv)
    texts = build_sample(args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(args.out) as tmp:
        tmp.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    print(f"wrote {len(texts)} conversations to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
