"""--device: where models run (tinyllama.devices), and its plumbing into the CLIs that load
models. The CPU sees no GPU, so CUDA is asked for and refused with a reason, and the GGUF
offload default is checked as a function of what llama.cpp's build can do."""

import pytest
import torch

from tinyllama.devices import gguf_gpu_layers, resolve_device
from tinyllama.errors import UserError


def test_auto_is_the_cpu_without_a_gpu_and_cuda_is_refused_with_a_reason(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device(None) == torch.device("cpu")
    assert resolve_device("CPU") == torch.device("cpu")
    with pytest.raises(UserError, match="--device cuda: no GPU here"):
        resolve_device("cuda")
    with pytest.raises(UserError, match="expected auto, cpu, cuda or cuda:N"):
        resolve_device("tpu")


def test_auto_is_the_gpu_where_torch_sees_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(UserError, match="there are 1 CUDA device"):
        resolve_device("cuda:3")


@pytest.mark.parametrize("device, asked, offloads, layers", [
    ("auto", None, True, -1), ("auto", None, False, 0), ("cuda", None, True, -1), ("cpu", None, True, 0),
    ("auto", 12, True, 12), ("cpu", 5, True, 5), (None, None, True, -1)])
def test_gguf_layers_follow_the_device_and_the_build(device, asked, offloads, layers):
    assert gguf_gpu_layers(device, asked, offloads) == layers


def test_cuda_with_a_cpu_only_llama_cpp_names_the_fix():
    with pytest.raises(UserError, match="built without GPU support.*make setup"):
        gguf_gpu_layers("cuda", None, supports_offload=False)
    with pytest.raises(UserError, match="expected auto, cpu, cuda"):
        gguf_gpu_layers("mps", None, supports_offload=True)


def test_load_backend_refuses_cuda_here(tiny_chat_checkpoint, monkeypatch):
    from tinyllama.inference.backends import load_backend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="no GPU here"):
        load_backend(tiny_chat_checkpoint, device="cuda")
    backend, _ = load_backend(tiny_chat_checkpoint, device="auto", dtype="float32")
    assert next(backend.model.parameters()).device.type == "cpu"
    backend.close()


@pytest.mark.parametrize("module", ["serve", "demo", "evaluation", "sft.distill", "bench.speculative"])
def test_every_model_loading_cli_takes_device(module, capsys):
    import importlib

    main = importlib.import_module(f"{module}.__main__" if module in ("serve", "demo", "evaluation") else module).main
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--device" in capsys.readouterr().out
