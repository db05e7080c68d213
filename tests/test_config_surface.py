"""One configuration surface: the model flags of every CLI that loads a model (ModelArgs), the
runtime switches (RuntimeOptions, from TINYLLAMA_* and flags), the names users know from
llama.cpp / HF / lm-eval (--ctx-size/-c, --seq-len, --out, comma --tasks, float16,
GRADIO_SERVER_*, XDG_CACHE_HOME, --report-to), and the old flag names still working."""

from __future__ import annotations

import dataclasses
import importlib
import re
from pathlib import Path

import pytest
import torch

from tinyllama.cli import ModelArgs, comma_list
from tinyllama.errors import UserError
from tinyllama.runtime import INFERENCE, RuntimeOptions

pytestmark = pytest.mark.cpu_isa

ROOT = Path(__file__).resolve().parents[1]

ALL = {"revision", "chat_template", "device", "dtype", "ctx_size", "n_gpu_layers", "runtime"}
# module holding build_parser(), the flag naming the model, the model flags it offers
MODEL_CLIS = [
    ("serve.__main__", "--model", ALL),
    ("serve.complete", "--model", ALL),
    ("demo.__main__", "--model", ALL),
    ("evaluation.__main__", "--model", ALL - {"revision", "chat_template"}),     # org/name@REV; no chat
    ("sft.distill", "--teacher", ALL),
    ("quantize.__main__", "--model", {"revision"}),
]
EXTRA = {"serve.complete": ["--prompt", "hi"], "sft.distill": ["--out", "x.jsonl"], "quantize.__main__": ["--out", "g"]}
VALUES = {"revision": ["--revision", "v2"], "chat_template": ["--chat-template", "chatml"],
          "device": ["--device", "cpu"], "dtype": ["--dtype", "float16"], "ctx_size": ["-c", "512"],
          "n_gpu_layers": ["--n-gpu-layers", "-1"], "runtime": ["--attention", "sdpa", "--no-cuda-graphs"]}
EXPECTED = {"revision": "v2", "chat_template": "chatml", "device": "cpu", "dtype": "float16", "ctx_size": 512,
            "n_gpu_layers": -1, "runtime": RuntimeOptions(attention="sdpa", cuda_graphs=False)}


@pytest.mark.parametrize("module, flag, offered", MODEL_CLIS, ids=[m for m, _, _ in MODEL_CLIS])
def test_every_model_cli_parses_the_same_model_args(module, flag, offered, monkeypatch):
    """The same flags mean the same on every CLI that loads a model; the ones a CLI does not
    offer keep ModelArgs' defaults."""
    for var in ("TINYLLAMA_ATTENTION", "TINYLLAMA_CUDA_GRAPHS", "GRADIO_SERVER_PORT"):
        monkeypatch.delenv(var, raising=False)
    argv = [flag, "org/name", *EXTRA.get(module, []), *(a for name in sorted(offered) for a in VALUES[name])]
    got = ModelArgs.from_namespace(importlib.import_module(module).build_parser().parse_args(argv))
    want = dataclasses.replace(ModelArgs(), **{name: EXPECTED[name] for name in offered})
    assert dataclasses.replace(got, model=None) == want
    assert got.model == (("org/name",) if module.startswith("evaluation") else "org/name")


def test_model_args_refuse_out_of_range_values():
    with pytest.raises(UserError, match="--ctx-size must be >= 1, got 0"):
        ModelArgs(ctx_size=0).check()
    with pytest.raises(UserError, match="--n-gpu-layers must be >= -1"):
        ModelArgs(n_gpu_layers=-2).check()


def test_distill_keeps_the_stored_dtype_by_default():
    from sft.distill import build_parser

    assert ModelArgs.from_namespace(build_parser().parse_args(["--teacher", "t", "--out", "o"])).dtype is None


# ---- RuntimeOptions ------------------------------------------------------------------------------

def test_runtime_options_from_the_environment_keep_their_spellings():
    env = {"TINYLLAMA_ATTENTION": "SDPA", "TINYLLAMA_FUSED": "0", "TINYLLAMA_PACKING": "transposed",
           "TINYLLAMA_CUDA_GRAPHS": "0", "TINYLLAMA_NATIVE": "1", "TINYLLAMA_ALLOCATOR": "system"}
    assert RuntimeOptions.from_env(env) == RuntimeOptions("sdpa", "off", "transposed", False, "on", "system")
    assert RuntimeOptions.from_env({}) == RuntimeOptions()
    assert RuntimeOptions.from_env({"TINYLLAMA_FUSED": "1", "TINYLLAMA_CUDA_GRAPHS": "1"}) == RuntimeOptions()


@pytest.mark.parametrize("var, value, message", [
    ("TINYLLAMA_ATTENTION", "bogus", "expected sdpa, flash or xformers"),
    ("TINYLLAMA_FUSED", "triton", "expected 0, 1, liger or flash"),
    ("TINYLLAMA_PACKING", "fast", "expected auto, none, transposed or onednn"),
    ("TINYLLAMA_CUDA_GRAPHS", "maybe", "expected 0 or 1"),
    ("TINYLLAMA_NATIVE", "yes", r"expected 0 \(off\), 1 \(required\) or auto"),
    ("TINYLLAMA_ALLOCATOR", "jemalloc", "expected system or retain"),
])
def test_a_bad_variable_names_itself(var, value, message):
    with pytest.raises(UserError, match=f"{var}='{value}': {message}"):
        RuntimeOptions.from_env({var: value})


def test_flags_win_over_the_environment(monkeypatch):
    from serve.complete import build_parser

    monkeypatch.setenv("TINYLLAMA_PACKING", "none")
    monkeypatch.setenv("TINYLLAMA_CUDA_GRAPHS", "0")
    monkeypatch.setenv("TINYLLAMA_FUSED", "off")
    args = build_parser().parse_args(["--model", "m", "--prompt", "p", "--packing", "onednn", "--cuda-graphs"])
    assert RuntimeOptions.from_namespace(args) == RuntimeOptions(fused="off", packing="onednn", cuda_graphs=True)
    args = build_parser().parse_args(["--model", "m", "--prompt", "p"])
    assert RuntimeOptions.from_namespace(args) == RuntimeOptions(fused="off", packing="none", cuda_graphs=False)


def test_a_cli_s_own_flag_of_the_same_name_is_not_a_runtime_option(monkeypatch):
    """SFT's --packing (pack examples) is not the runtime's packing (CPU decode layout)."""
    from sft.__main__ import build_parser

    monkeypatch.delenv("TINYLLAMA_PACKING", raising=False)
    args = build_parser().parse_args(["--base", "b", "--out", "o", "--packing", "--fused", "off"])
    assert args.packing is True
    assert RuntimeOptions.from_namespace(args) == RuntimeOptions(fused="off")


def test_the_options_are_described_as_flags():
    assert RuntimeOptions(packing="none", cuda_graphs=False).describe(INFERENCE) == \
        "attention=auto fused=auto packing=none cuda-graphs=off"


def test_the_first_line_names_the_runtime_options(tiny_chat_checkpoint, monkeypatch, capsys):
    """serve.complete's first line (the model and its precision) carries the runtime choices,
    from the environment and the flags alike, and they reach the backend."""
    from serve import complete
    from tinyllama.inference import backends

    seen = []
    real = backends.TorchBackend.__init__

    def spy(self, *a, runtime=RuntimeOptions(), **k):
        seen.append(runtime)
        real(self, *a, runtime=runtime, **k)

    monkeypatch.setattr(backends.TorchBackend, "__init__", spy)
    monkeypatch.setenv("TINYLLAMA_CUDA_GRAPHS", "0")
    argv = ["--model", str(tiny_chat_checkpoint), "--prompt", "hi", "--max-tokens", "2", "--temperature", "0",
            "--dtype", "float32", "--packing", "none"]
    assert complete.main(argv) == 0
    first = capsys.readouterr().err.splitlines()[0]
    assert re.fullmatch(r"model: tiny-chat: float32 \(as asked\); attention=auto fused=auto packing=none "
                        r"cuda-graphs=off", first), first
    assert seen == [RuntimeOptions(packing="none", cuda_graphs=False)]


def test_library_functions_need_no_environment(small_model, fresh_layout_cache, monkeypatch):
    """A variable set without a CLI changes nothing: the library's defaults are RuntimeOptions()."""
    from fakes import timings

    from tinyllama.inference import packing

    monkeypatch.setenv("TINYLLAMA_PACKING", "none")
    monkeypatch.setattr(packing, "timer", timings({"transposed": 0.5}))       # what auto times
    assert packing.pack_for_decoding(small_model) > 0
    packing.unpack(small_model)


# ---- renamed flags ----------------------------------------------------------------------------------

@pytest.mark.parametrize("module, argv, old, new, dest, value", [
    ("serve.complete", ["--model", "m", "--prompt", "p", "--n-ctx", "64"], "--n-ctx", "--ctx-size", "ctx_size", 64),
    ("serve.__main__", ["--model", "m", "--n-ctx", "64"], "--n-ctx", "--ctx-size", "ctx_size", 64),
    ("quantize.__main__", ["--model", "m", "--out", "g", "--ctx", "128"], "--ctx", "--ctx-size", "ctx_size", 128),
    ("sft.__main__", ["--base", "b", "--out", "o", "--max-len", "256"], "--max-len", "--seq-len", "seq_len", 256),
    ("pretrain.__main__", ["--out-dir", "runs/x"], "--out-dir", "--out", "out", "runs/x"),
])
def test_old_flag_names_still_work_and_name_the_new_one(module, argv, old, new, dest, value, capsys):
    args = importlib.import_module(module).build_parser().parse_args(argv)
    assert getattr(args, dest) == value
    assert capsys.readouterr().err == f"warning: {old} is an old name: use {new}\n"


def test_new_flag_names_say_nothing(capsys):
    from serve.complete import build_parser

    assert build_parser().parse_args(["--model", "m", "--prompt", "p", "-c", "64"]).ctx_size == 64
    assert capsys.readouterr().err == ""


def test_the_old_config_field_out_dir_still_loads(tmp_path, capsys):
    from pretrain.config import TrainConfig

    (tmp_path / "c.yaml").write_text("preset: tinyllama-debug\nout_dir: runs/old\n")
    assert TrainConfig.from_yaml(tmp_path / "c.yaml").out == "runs/old"
    assert capsys.readouterr().err == f"warning: {tmp_path / 'c.yaml'}: config field out_dir is an old name: use out\n"


def test_the_shipped_configs_and_makefile_use_the_new_names(capsys):
    from pretrain.config import TrainConfig

    for path in sorted((ROOT / "pretrain" / "configs").glob("*.yaml")):
        assert TrainConfig.from_yaml(path).validate().out.startswith("out/")
    assert capsys.readouterr().err == ""
    old = re.compile(r"--(out-dir|n-ctx|max-len)\b|--ctx\b(?!-)")
    for name in ("Makefile", "lifecycle.py", ".ci/run", "scripts/setup.sh"):
        assert not old.search((ROOT / name).read_text()), name


# ---- lm-eval's comma lists ----------------------------------------------------------------------------

def test_tasks_take_comma_lists_and_space_separated_ones():
    from evaluation.__main__ import build_parser

    for argv in (["--tasks", "hellaswag,piqa", "arc_easy"], ["--tasks", "hellaswag", "piqa,arc_easy,"]):
        assert comma_list(build_parser().parse_args(argv).tasks) == ["hellaswag", "piqa", "arc_easy"]
    assert comma_list(None) is None


# ---- float16 ---------------------------------------------------------------------------------------

def test_float16_decodes_on_a_cpu_like_float32(tiny_chat_checkpoint):
    """Chosen: float16 runs on CPUs too (torch computes it; slower than float32 on most), so the
    one --dtype means the same on every device."""
    from tinyllama.inference.backends import load_backend

    logits = {}
    for dtype in ("float32", "float16"):
        backend, _ = load_backend(tiny_chat_checkpoint, device="cpu", dtype=dtype)
        assert backend.precision == f"{dtype} (as asked)"
        logits[dtype] = backend.logits([1, 450, 4996, 338], n_last=2)
        backend.close()
    assert (logits["float16"] - logits["float32"]).abs().max() < 2e-2


def test_float16_training_is_mixed_precision_with_loss_scaling_on_cuda_only():
    from sft.train import SFTArgs, SFTError, _device, mixed_precision

    assert mixed_precision(torch.float16) == {"bf16": False, "fp16": True}
    assert mixed_precision(torch.bfloat16) == {"bf16": True, "fp16": False}
    assert mixed_precision(torch.float32) == {"bf16": False, "fp16": False}
    with pytest.raises(SFTError, match="--dtype float16 trains on CUDA only"):
        _device("cpu", "float16")
    assert "float16" in dataclasses.fields(SFTArgs)[[f.name for f in dataclasses.fields(SFTArgs)].index("dtype")] \
        .metadata["choices"]


# ---- GRADIO_SERVER_NAME / GRADIO_SERVER_PORT ------------------------------------------------------------

def test_the_demo_binds_where_gradio_s_variables_say():
    from demo.__main__ import build_parser, gradio_address

    assert gradio_address({}) == ("127.0.0.1", 7860)
    assert gradio_address({"GRADIO_SERVER_NAME": "0.0.0.0", "GRADIO_SERVER_PORT": "8080"}) == ("0.0.0.0", 8080)
    args = build_parser(*gradio_address({"GRADIO_SERVER_PORT": "9000"})).parse_args([])
    assert (args.host, args.port) == ("127.0.0.1", 9000)
    args = build_parser(*gradio_address({"GRADIO_SERVER_PORT": "9000"})).parse_args(["--port", "9001"])
    assert args.port == 9001                       # a flag wins over the variable
    for bad in ("http", "0", "70000"):
        with pytest.raises(UserError, match=f"GRADIO_SERVER_PORT='{bad}': expected a port number"):
            gradio_address({"GRADIO_SERVER_PORT": bad})


# ---- XDG_CACHE_HOME ------------------------------------------------------------------------------------

def test_the_cache_follows_xdg_cache_home_unless_tinyllama_cache_says(monkeypatch, tmp_path):
    from tinyllama.paths import cache_dir

    monkeypatch.delenv("TINYLLAMA_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "tinyllama"
    monkeypatch.setenv("TINYLLAMA_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("TINYLLAMA_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == Path.home() / ".cache" / "tinyllama"


# ---- SFT --report-to ------------------------------------------------------------------------------------

@pytest.mark.parametrize("choice, want", [("none", []), ("tensorboard", ["tensorboard"])])
def test_report_to_reaches_trl_s_config(choice, want, tmp_path):
    from sft.train import SFTArgs, _trainer_config

    args = SFTArgs(base="b", out=str(tmp_path / "o"), report_to=choice)
    config = _trainer_config(args, tmp_path, "cpu", torch.float32, has_eval=False)
    assert config.report_to == want


def test_report_to_defaults_to_none_on_the_command_line():
    from sft.__main__ import build_parser

    assert build_parser().parse_args(["--base", "b", "--out", "o"]).report_to == "none"
    assert build_parser().parse_args(["--base", "b", "--out", "o", "--report-to", "wandb"]).report_to == "wandb"


def test_report_to_a_logger_that_is_not_installed_is_said_before_training(tiny_chat_checkpoint, tmp_path, monkeypatch):
    import importlib.util

    from sft import train

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    args = train.SFTArgs(base=str(tiny_chat_checkpoint), out=str(tmp_path / "o"), report_to="wandb")
    with pytest.raises(train.SFTError, match=r"--report-to wandb: wandb is not installed \(pip install wandb\)"):
        train._check(args)
