"""Core commands: list presets, create a fresh checkpoint, inspect and verify a directory.

    python -m tinyllama presets
    python -m tinyllama init --preset tinyllama-19m --out out/init
    python -m tinyllama inspect out/init --verify-hf
    python -m tinyllama tokenizer build            # make setup runs this
    python -m tinyllama tokenizer encode "Hello world"
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from .checkpoint import load_checkpoint, save_checkpoint
from .config import PRESETS, ModelConfig
from .errors import UserError, report
from .model import Llama
from .paths import default_sdist, llama2_dir
from .tokenizer import Tokenizer, build_llama2


def _human(n: float) -> str:
    for unit in ("", "K", "M", "B"):
        if abs(n) < 1000:
            return f"{n:.1f}{unit}" if unit else f"{n:.0f}"
        n /= 1000
    return f"{n:.1f}T"


def cmd_presets(_: argparse.Namespace) -> int:
    head = f"{'preset':<16} {'layers':>6} {'d_model':>7} {'heads':>5} {'kv':>3} {'ffn':>6} {'ctx':>5} {'parameters':>15} {'approx':>7}"
    print(head)
    print("-" * len(head))
    for name, c in PRESETS.items():
        print(f"{name:<16} {c.n_layer:>6} {c.d_model:>7} {c.n_head:>5} {c.n_kv_head:>3} {c.ffn_dim:>6} "
              f"{c.max_seq_len:>5} {c.num_params():>15,} {_human(c.num_params()):>7}")
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    cfg = ModelConfig.from_name(args.preset)
    out = Path(args.out)
    torch.manual_seed(args.seed)
    model = Llama(cfg)
    tok = Tokenizer.llama2()
    save_checkpoint(model, tok, out)
    print(f"wrote {out}: {cfg.name}, {model.num_params():,} parameters, TinyLlama initialisation (seed {args.seed})")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    from .hub import resolve_model

    typed, args.dir = args.dir, str(resolve_model(args.dir, kinds=("checkpoint",), flag="inspect").path)
    model, tok = load_checkpoint(args.dir)
    cfg = model.config
    dtype = next(model.parameters()).dtype
    print(f"{typed}: {cfg.name}, {model.num_params():,} parameters ({dtype}), "
          f"{cfg.n_layer} layers, d_model {cfg.d_model}, {cfg.n_head} heads / {cfg.n_kv_head} KV groups, "
          f"ffn {cfg.ffn_dim}, vocab {cfg.vocab_size}, context {cfg.max_seq_len}; loaded in {time.perf_counter() - t0:.2f}s")
    print(f"tokenizer: {tok}")
    ids = torch.tensor([tok.encode(args.text)])
    if ids.shape[1] < 2:
        print("error: --text needs at least one token to score after BOS", file=sys.stderr)
        return 2
    with torch.no_grad():
        logits = model(ids.to(next(model.parameters()).device))
    nll = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
    print(f"perplexity on {args.text!r}: {nll.exp().item():.2f} ({ids.shape[1]} tokens)")
    if args.verify_hf:
        try:
            from transformers import LlamaForCausalLM
        except ImportError:
            print("error: --verify-hf needs transformers (pip install '.[dev]')", file=sys.stderr)
            return 2
        hf = LlamaForCausalLM.from_pretrained(args.dir, dtype=dtype, use_safetensors=True).eval()
        with torch.no_grad():
            ref = hf(ids).logits.float()
        diff = (ref - logits.float().cpu()).abs().max().item()
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        status = "OK" if diff < tol else "MISMATCH"
        print(f"transformers.LlamaForCausalLM on the same directory: max |Δlogit| = {diff:.2e} ({status}, tolerance {tol:g})")
        if diff >= tol:
            return 1
    return 0


def cmd_tokenizer(args: argparse.Namespace) -> int:
    if args.tok_cmd == "encode":
        tok = Tokenizer.from_dir(args.dir) if args.dir else Tokenizer.llama2()
        print(tok.encode(args.text, bos=not args.no_bos))
        return 0
    out = Path(args.out or llama2_dir())
    if (out / "tokenizer.json").exists() and not (args.force or args.gguf or args.sdist):
        print(f"tokenizer already built: {out}")
        return 0
    build_llama2(sdist=args.sdist, gguf=args.gguf, out_dir=out)
    tok = Tokenizer.from_dir(out)
    print(f"built {out} ({tok.vocab_size} tokens; 'Hello world' -> {tok.encode('Hello world')})")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tinyllama", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("presets", help="print the model presets and their exact parameter counts")
    p = sub.add_parser("init", help="write a freshly initialised HF-format checkpoint directory")
    p.add_argument("--preset", default="tinyllama-19m", choices=sorted(PRESETS), help="model shape (default: %(default)s)")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed (default: %(default)s)")
    p = sub.add_parser("inspect", help="load a checkpoint directory, print its shape and a perplexity")
    p.add_argument("dir", help="an HF-format Llama directory (ours or TinyLlama's) or a hub id (org/name[@REV])")
    p.add_argument("--text", default="The quick brown fox jumps over the lazy dog.", help="text to score")
    p.add_argument("--verify-hf", action="store_true",
                   help="also load the directory with transformers and compare logits")
    t = sub.add_parser("tokenizer", help="build or try the offline Llama-2 tokenizer")
    tsub = t.add_subparsers(dest="tok_cmd", required=True)
    b = tsub.add_parser("build", help="build tokenizer.json from llama.cpp's Llama-2 vocabulary file")
    src = b.add_mutually_exclusive_group()
    src.add_argument("--sdist", type=Path, help=f"llama-cpp-python sdist (default: {default_sdist()})")
    src.add_argument("--gguf", type=Path, help="a ggml-vocab-llama-spm.gguf file")
    b.add_argument("--out", type=Path, default=None, help=f"output directory (default: {llama2_dir()})")
    b.add_argument("--force", action="store_true", help="rebuild even if it is already built")
    e = tsub.add_parser("encode", help="print the token ids of a text")
    e.add_argument("text")
    e.add_argument("--dir", type=Path, default=None, help="an HF tokenizer directory (default: Llama-2)")
    e.add_argument("--no-bos", action="store_true", help="do not prepend BOS")
    args = ap.parse_args(argv)
    commands = {"presets": cmd_presets, "init": cmd_init, "inspect": cmd_inspect, "tokenizer": cmd_tokenizer}
    try:
        return commands[args.cmd](args)
    except UserError as e:
        return report(e)


if __name__ == "__main__":
    sys.exit(main())
