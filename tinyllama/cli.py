"""Command-line flags generated from a config dataclass, the one argparse style of every stage:
each field is `--field-name`, its help and choices come from the field's metadata.

    @dataclass
    class Args:
        out: str = field(metadata=flag("output directory"))               # no default: required
        method: str = field(default="lora", metadata=flag("how to train", choices=METHODS, group="training"))
    add_flags(parser, Args)                  # typed, with the dataclass's defaults
    add_flags(parser, Cfg, raw=True)         # strings, default None: a YAML file fills the rest

The model flags of every CLI that loads a model, and the old names of renamed flags:

    add_model_args(parser)                   # --model --revision --chat-template --device --dtype -c ...
    model = ModelArgs.from_namespace(parser.parse_args())
    add_renamed_flag(parser, "--n-ctx", "--ctx-size", dest="ctx_size", type=int)   # an old name still works
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Any, Sequence

from tinyllama.errors import UserError
from tinyllama.runtime import INFERENCE, RuntimeOptions, add_runtime_args

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


# ---- the model flags ------------------------------------------------------------------------------

DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")      # tinyllama.precision.DTYPES, and auto
DTYPE_HELP = ("compute dtype of checkpoint directories: auto times bf16 against float32 once per machine and "
              "takes bf16 only where it decodes faster (bf16 on CUDA, float16 on a GPU without bf16); float16 "
              "runs on CPUs too, slower than float32 on most")
CTX_HELP = ("context size in tokens, as llama.cpp's -c: the KV cache of a GGUF (per sequence), at most its "
            "trained context")
MODEL_FLAGS = ("revision", "chat_template", "device", "dtype", "ctx_size", "n_gpu_layers", "runtime")


@dataclass(frozen=True)
class ModelArgs:
    """What a CLI that loads a model asks about it: the reference, where and how it runs."""
    model: str | tuple[str, ...] | None = None        # a tuple where the CLI takes several (evaluation)
    revision: str | None = None
    chat_template: str | None = None
    device: str = "auto"
    dtype: str | None = "auto"                          # None: as the weights are stored
    ctx_size: int = 2048
    n_gpu_layers: int | None = None
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> "ModelArgs":
        """The flags add_model_args put on the parser, checked; the runtime options over the
        environment's (tinyllama.runtime). A UserError names a value out of range."""
        given = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)
                 if f.name != "runtime" and getattr(ns, f.name, None) is not None}
        if isinstance(given.get("model"), list):
            given["model"] = tuple(given["model"])
        if given.get("dtype") == "stored":
            given["dtype"] = None
        args = cls(**given, runtime=RuntimeOptions.from_namespace(ns))
        args.check()
        return args

    def check(self) -> None:
        if self.ctx_size < 1:
            raise UserError(f"--ctx-size must be >= 1, got {self.ctx_size}")
        if self.n_gpu_layers is not None and self.n_gpu_layers < -1:
            raise UserError(f"--n-gpu-layers must be >= -1 (-1: all), got {self.n_gpu_layers}")

    def backend_kwargs(self) -> dict[str, Any]:
        """tinyllama.inference.backends.load_backend's keywords (all but the reference)."""
        return {"device": self.device, "dtype": self.dtype, "n_ctx": self.ctx_size, "n_gpu_layers": self.n_gpu_layers,
                "revision": self.revision, "runtime": self.runtime}


def add_model_args(parser: argparse.ArgumentParser, *, flag: str = "--model", required: bool = True,
                   many: bool = False, help: str = MODEL_HELP, dtypes: Sequence[str] = DTYPE_NAMES,
                   dtype_default: str = "auto", only: Sequence[str] = MODEL_FLAGS) -> None:
    """The model flags (ModelArgs' fields) of a CLI that loads a model: `flag` names the model
    (stored as `model`; `many`: one or more), `only` picks the other flags it offers."""
    parser.add_argument(flag, dest="model", required=required, nargs="+" if many else None,
                        default=[] if many else None, help=help)
    if "revision" in only:
        parser.add_argument("--revision", help=f"hub revision (branch, tag or commit) of {flag} (default: main)")
    if "chat_template" in only:
        parser.add_argument("--chat-template", metavar="NAME|FILE", help=CHAT_TEMPLATE_HELP)
    if "device" in only:
        from tinyllama.devices import DEVICE_HELP

        parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    if "dtype" in only:
        stored = "; stored: as the weights are stored" if "stored" in dtypes else ""
        parser.add_argument("--dtype", default=dtype_default, choices=list(dtypes),
                            help=f"{DTYPE_HELP}{stored} (default: %(default)s)")
    _add_context_args(parser, only)
    if "runtime" in only:
        add_runtime_args(parser, INFERENCE)


def _add_context_args(parser: argparse.ArgumentParser, only: Sequence[str]) -> None:
    if "ctx_size" in only:
        parser.add_argument("-c", "--ctx-size", dest="ctx_size", type=int, default=2048, metavar="N",
                            help=f"{CTX_HELP} (default: %(default)s)")
        add_renamed_flag(parser, "--n-ctx", "--ctx-size", dest="ctx_size", type=int)
    if "n_gpu_layers" in only:
        parser.add_argument("--n-gpu-layers", type=int, default=None, metavar="N",
                            help="GGUF layers to offload to the GPU in a CUDA or Metal build of llama.cpp; -1: all "
                                 "(default: all when --device is auto or cuda and the build can offload, else 0)")


def comma_list(values: Sequence[str] | None) -> list[str] | None:
    """Values given as `a,b c` (lm-eval's comma lists, and space-separated ones) as [a, b, c]."""
    if values is None:
        return None
    return [v for value in values for v in value.split(",") if v]
