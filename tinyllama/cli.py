"""Command-line flags generated from a config dataclass, the one argparse style of every stage:
each field is `--field-name`, its help and choices come from the field's metadata.

    @dataclass
    class Args:
        out: str = field(metadata=flag("output directory"))               # no default: required
        method: str = field(default="lora", metadata=flag("how to train", choices=METHODS, group="training"))
    add_flags(parser, Args)                  # typed, with the dataclass's defaults
    add_flags(parser, Cfg, raw=True)         # strings, default None: a YAML file fills the rest
    add_renamed_flag(parser, "--num-draft", "--draft-max", dest="draft_max")   # an old name still works
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

# the --help text of every model-reference flag (tinyllama.formats.hub resolves them)
MODEL_HELP = ("a checkpoint directory (PyTorch) or .gguf file (llama.cpp); or from the Hugging Face hub: "
              "org/name (safetensors), org/name:Q4_K_M (that quant type's GGUF in the repo) or org/name/FILE.gguf")
# ... and of --chat-template (tinyllama.formats.chat.template_of)
CHAT_TEMPLATE_HELP = ("chat in this template instead of the model's own: zephyr (ours), llama-2, chatml, or a .jinja "
                      "file (default: the model's own; for a model without one, Llama-2-chat's if its name says "
                      "so, else zephyr)")


def flag(help: str = "", *, choices: Any = None, group: str | None = None, metavar: str | None = None) -> dict:
    """Metadata for a dataclass field: its --help line, choices, and argument group."""
    return {"help": help, "choices": choices, "group": group, "metavar": metavar}


def add_flags(parser: argparse.ArgumentParser, cls: type, raw: bool = False, skip: tuple[str, ...] = (),
              helps: dict[str, str] | None = None) -> None:
    """One `--name` per field of `cls`. Booleans: `--name` / `--no-name`; lists: several values.
    raw=True leaves every value a string and every default None (the caller merges them over a
    file and converts them); the help still shows the dataclass's default. `helps` gives help
    lines for fields whose metadata has none."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    defaults = _defaults(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        meta = dict(f.metadata or {})
        if not meta.get("help") and helps and f.name in helps:
            meta["help"] = helps[f.name]
        target = parser
        if meta.get("group"):
            target = groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        target.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **_argument(f, meta, defaults, raw))


def _defaults(cls: type) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _argument(f: dataclasses.Field, meta: dict, defaults: dict, raw: bool) -> dict[str, Any]:
    t = str(f.type)
    help_text = meta.get("help") or f.name.replace("_", " ")
    kwargs: dict[str, Any] = {}
    if meta.get("choices") is not None:
        kwargs["choices"] = list(meta["choices"])
    if meta.get("metavar"):
        kwargs["metavar"] = meta["metavar"]
    if t.startswith("bool"):
        kwargs["action"] = argparse.BooleanOptionalAction
    elif t.startswith(("list", "dict")):
        kwargs["nargs"] = "+"
    elif not raw:
        kwargs["type"] = {"int": int, "float": float}.get(t.split(" ")[0].split("|")[0].strip(), str)
    if f.name not in defaults:
        return {**kwargs, "required": not raw, "default": None, "help": help_text}
    default = defaults[f.name]
    kwargs["default"] = None if raw else default
    shown = " ".join(map(str, default)) if isinstance(default, list) else default
    return {**kwargs, "help": f"{help_text} (default: {shown})"}


class _RenamedFlag(argparse.Action):
    """An old name of a flag: does what the new one does, after one line on stderr naming it."""

    def __init__(self, option_strings, dest, new: str, **kwargs) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(f"warning: {option_string} is an old name: use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, True if self.nargs == 0 else values)


def add_renamed_flag(ap: argparse.ArgumentParser, old: str, new: str, dest: str, **kwargs) -> None:
    """`old` as a hidden alias of the flag `new` (which sets `dest`), kept so that scripts written
    for it still run; kwargs: its type or nargs (0: a switch)."""
    ap.add_argument(old, dest=dest, action=_RenamedFlag, new=new, default=argparse.SUPPRESS,
                    help=argparse.SUPPRESS, **kwargs)


def add_draft_model_flag(ap: argparse.ArgumentParser, help: str, **kwargs) -> None:
    """-md/--model-draft (llama.cpp's name; `dest` model_draft), with --draft as its old name."""
    ap.add_argument("-md", "--model-draft", dest="model_draft", help=help, **kwargs)
    add_renamed_flag(ap, "--draft", "--model-draft", dest="model_draft")
