"""Behaviour switches of the runtime: which attention and fused kernels run, how CPU decoding
lays out its weights, CUDA graphs, the native piece cache, the allocator. One frozen value,
read from the environment once, by a CLI, and passed down; library functions take it as an
argument whose default is `RuntimeOptions()`, so tests and library users need no environment.

    options = RuntimeOptions.from_env()                     # TINYLLAMA_* variables, as before
    add_runtime_args(parser, INFERENCE)                     # --attention, --fused, --packing, --cuda-graphs
    options = RuntimeOptions.from_namespace(args)           # the flags given, over the environment
    print(options.describe(INFERENCE))                      # "attention=auto fused=auto packing=auto cuda-graphs=on"
    load_backend(path, runtime=options)                     # where it takes effect (trainers: train(cfg, runtime=...))

The attention and fused-kernel choices run per op deep inside the model's forward, so the code
that loads a model makes them the process's (tinyllama.model.kernels.use_kernels), as
torch.backends' flags are; the others are arguments of the functions they change.

The variables keep their names and values: TINYLLAMA_ATTENTION=sdpa|flash|xformers,
TINYLLAMA_FUSED=0|1|liger|flash, TINYLLAMA_PACKING=auto|none|transposed|onednn,
TINYLLAMA_CUDA_GRAPHS=0, TINYLLAMA_NATIVE=0|1|auto, TINYLLAMA_ALLOCATOR=system.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from typing import Mapping

from tinyllama.errors import UserError, checked_choice

ENV = {"attention": "TINYLLAMA_ATTENTION", "fused": "TINYLLAMA_FUSED", "packing": "TINYLLAMA_PACKING",
       "cuda_graphs": "TINYLLAMA_CUDA_GRAPHS", "native": "TINYLLAMA_NATIVE", "allocator": "TINYLLAMA_ALLOCATOR"}
CHOICES = {"attention": ("auto", "sdpa", "flash", "xformers"), "fused": ("auto", "off", "liger", "flash"),
           "packing": ("auto", "none", "transposed", "onednn"), "native": ("auto", "off", "on"),
           "allocator": ("retain", "system")}
# the variables' own spellings, which stay valid: TINYLLAMA_FUSED=1 is auto, TINYLLAMA_NATIVE=1 is on
_ENV_VALUES = {"fused": {"1": "auto", "0": "off", "": "auto"}, "native": {"1": "on", "0": "off", "": "auto"},
               "cuda_graphs": {"1": "on", "0": "off", "": "on", "true": "on", "false": "off"},
               "attention": {"": "auto"}, "packing": {"": "auto"}, "allocator": {"": "retain"}}
_ENV_EXPECTED = {"attention": "sdpa, flash or xformers", "fused": "0, 1, liger or flash",
                 "packing": "auto, none, transposed or onednn", "cuda_graphs": "0 or 1",
                 "native": "0 (off), 1 (required) or auto", "allocator": "system or retain"}
HELP = {
    "attention": "attention kernel: auto (flash-attn 2 > xformers > PyTorch SDPA, by what runs here) or one "
                 "forced, an error where it cannot run",
    "fused": "fused Triton kernels for RMSNorm, RoPE, SwiGLU and cross-entropy on CUDA: auto (liger-kernel, "
             "else flash-attn's), off, or one forced",
    "packing": "CPU decoding's weight layout: auto (timed once per model shape), none, transposed or onednn",
    "cuda_graphs": "replay decode steps as CUDA graphs on a GPU",
    "native": "the C piece cache of data preparation: auto (used where it builds), off, or on (an error "
              "where it does not build)",
    "allocator": "CPU training's allocator: retain (glibc keeps freed memory, no page faults per step) or "
                 "system (the C library's defaults)",
}
INFERENCE = ("attention", "fused", "packing", "cuda_graphs")
TRAINING = ("attention", "fused", "allocator")
PREPARE = ("native",)


@dataclass(frozen=True)
class RuntimeOptions:
    """The switches (HELP says what each does); the defaults are what an unset environment means."""
    attention: str = "auto"
    fused: str = "auto"
    packing: str = "auto"
    cuda_graphs: bool = True
    native: str = "auto"
    allocator: str = "retain"

    def __post_init__(self) -> None:
        if not isinstance(self.cuda_graphs, bool):
            raise UserError(f"cuda_graphs: expected True or False, got {self.cuda_graphs!r}")
        for name, allowed in CHOICES.items():
            checked_choice(f"--{flag_name(name)}", getattr(self, name), allowed)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "RuntimeOptions":
        """The TINYLLAMA_* variables of `env` (default: os.environ); unset ones keep the defaults."""
        env = os.environ if env is None else env
        values = {}
        for name, var in ENV.items():
            if var in env:
                values[name] = _env_value(name, var, env[var])
        return cls(**values)

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace, env: Mapping[str, str] | None = None) -> "RuntimeOptions":
        """The environment's options with the flags `ns` holds (add_runtime_args) put over them."""
        given = {name: getattr(ns, DEST + name) for name in ENV if getattr(ns, DEST + name, None) is not None}
        return dataclasses.replace(cls.from_env(env), **given)

    def describe(self, names: tuple[str, ...] = tuple(ENV)) -> str:
        """`flag=value` for each of `names`, for the line a CLI prints with its other choices."""
        return " ".join(f"{flag_name(n)}={_shown(getattr(self, n))}" for n in names)


DEST = "runtime_"         # the flags' namespace prefix: a CLI's own --packing (SFT's) stays its own


def flag_name(name: str) -> str:
    return name.replace("_", "-")


def _shown(value: str | bool) -> str:
    return ("on" if value else "off") if isinstance(value, bool) else value


def _env_value(name: str, var: str, raw: str):
    value = raw.strip().lower()
    value = _ENV_VALUES[name].get(value, value)
    if value not in CHOICES.get(name, ("on", "off")):
        raise UserError(f"{var}={raw.strip().lower()!r}: expected {_ENV_EXPECTED[name]}")
    return value == "on" if name == "cuda_graphs" else value


def add_runtime_args(parser: argparse.ArgumentParser, names: tuple[str, ...]) -> None:
    """A flag per option in `names`, default None: what is not given comes from the environment."""
    group = parser.add_argument_group("runtime (each flag defaults to its TINYLLAMA_* variable)")
    for name in names:
        kind = {"action": argparse.BooleanOptionalAction} if name == "cuda_graphs" else {"choices": CHOICES[name]}
        group.add_argument("--" + flag_name(name), dest=DEST + name, default=None, **kind,
                           help=f"{HELP[name]} (${ENV[name]}; default: {_shown(getattr(RuntimeOptions(), name))})")
