"""Where a model runs: one `--device` for every stage that loads one.

    resolve_device("auto")            # cuda:0 if torch sees a GPU, else cpu
    resolve_device("cuda")            # a UserError naming why not, on a machine without one
    gguf_gpu_layers("auto", None, supports_offload=True)    # -1: every layer on the GPU

A PyTorch model goes to the resolved device (in bf16 there by default: tinyllama.precision).
A GGUF runs in llama.cpp, whose own build decides whether it can use a GPU (CUDA or Metal:
`llama_supports_gpu_offload()`); there the device picks how many layers it offloads.
"""

from __future__ import annotations

import torch

from tinyllama.errors import UserError

DEVICE_CHOICES = ("auto", "cpu", "cuda")
DEVICE_HELP = ("where models run: auto (a GPU if there is one: PyTorch models on CUDA in bf16, every GGUF "
               "layer offloaded in a CUDA or Metal build of llama.cpp), cpu, cuda or cuda:N (default: %(default)s)")


def resolve_device(name: str | torch.device | None = "auto", flag: str = "--device") -> torch.device:
    """`name` as a torch.device: auto is the first CUDA device where torch sees one, else the
    CPU; a CUDA device this machine does not have is an error that says why."""
    name = "auto" if name is None else str(name).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"{flag} {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"{flag} {name!r}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is a CPU build" if torch.version.cuda is None else "torch sees no CUDA device"
            raise UserError(f"{flag} {name}: no GPU here ({why}); use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"{flag} {name}: there are {torch.cuda.device_count()} CUDA device(s)")
    return device


def gguf_gpu_layers(device: str | torch.device | None, n_gpu_layers: int | None, supports_offload: bool) -> int:
    """How many layers llama.cpp offloads: `n_gpu_layers` when given (an explicit count wins),
    else all (-1) when the device is auto or cuda and this llama.cpp build can offload, else 0.
    Asking for cuda from a CPU-only build is an error naming the fix."""
    name = "auto" if device is None else str(device).strip().lower()
    if name.split(":")[0] not in DEVICE_CHOICES:
        raise UserError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")
    if name.startswith("cuda") and not supports_offload:
        raise UserError(f"--device {name}: this llama-cpp-python was built without GPU support; rebuild it "
                        f"with `make setup` on a machine where nvidia-smi and nvcc work (GGML_CUDA=on), "
                        f"or use --device cpu")
    if n_gpu_layers is not None:
        return n_gpu_layers
    if name == "cpu" or not supports_offload:
        return 0
    return -1
