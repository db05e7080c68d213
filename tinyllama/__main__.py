"""Core commands: list presets, create a fresh checkpoint, inspect and verify a directory.

    python -m tinyllama presets
    python -m tinyllama init --preset tinyllama-19m --out out/init
    python -m tinyllama inspect out/init --verify-hf
    python -m tinyllama inspect SmolLM2-135M-Instruct.Q4_1.gguf
    python -m tinyllama tokenizer build            # make setup runs this
    python -m tinyllama tokenizer encode "Hello world"
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from tinyllama.formats.checkpoint import load_checkpoint, save_checkpoint
from tinyllama.model.config import PRESETS, ModelConfig
from tinyllama.errors import UserError, report
from tinyllama.model.model import Llama
from tinyllama.paths import default_sdist, llama2_dir
from tinyllama.formats.tokenizer import Tokenizer, build_llama2


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
    from tinyllama.formats.hub import resolve_model

    if Path(args.dir).suffix == ".gguf" and Path(args.dir).is_file():
        return inspect_gguf(Path(args.dir))
    typed, args.dir = args.dir, str(resolve_model(args.dir, kinds=("checkpoint",), flag="inspect").path)
    model, tok = load_checkpoint(args.dir)
    cfg = model.config
    dtype = next(model.parameters()).dtype
    print(f"{typed}: {cfg.name}, {model.num_params():,} parameters ({dtype}), "
          f"{cfg.n_layer} layers, d_model {cfg.d_model}, {cfg.n_head} heads / {cfg.n_kv_head} KV groups, "
          f"ffn {cfg.ffn_dim}, vocab {cfg.vocab_size}, context {cfg.max_seq_len}, RoPE θ {cfg.rope_base:g}"
          f"{', tied embeddings' if cfg.tie_embeddings else ''}; loaded in {time.perf_counter() - t0:.2f}s")
    print(f"tokenizer: {describe_tokenizer(tok)}")
    imported = Path(args.dir) / "import.json"
    if imported.is_file():
        record = json.loads(imported.read_text())
        print(f"imported from {record['source']} (dequantized from {', '.join(record['tensor_types'])})")
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


def describe_tokenizer(tok: Tokenizer) -> str:
    """One line: the vocabulary's kind and size, BOS/EOS, and the chat template's family."""
    from tinyllama.formats.chat import template_family
    from tinyllama.formats.vocab import is_byte_level, pre_tokenizer_name

    kind = f"byte-level BPE (pre-tokenizer {pre_tokenizer_name(tok.backend) or '?'})" if is_byte_level(tok.backend) \
        else "SentencePiece BPE"
    template = template_family(tok.chat_template) if tok.chat_template else "none"
    return (f"{kind}, {tok.vocab_size:,} tokens, BOS {tok.bos_id} {'added' if tok.add_bos else 'not added'}, "
            f"EOS {tok.eos_id}, stop ids {list(tok.stop_ids)}, chat template: {template}")


def inspect_gguf(path: Path) -> int:
    """A GGUF's architecture, shape, quantization and tokenizer, from its metadata (llama.cpp
    runs it; `python -m quantize import` turns a Llama one into a checkpoint)."""
    from collections import Counter

    from tinyllama.formats.gguf_file import VocabularyNotRead, file_type_name, gguf_value, open_gguf

    reader = open_gguf(path)
    arch = gguf_value(reader, "general.architecture")
    shape = {k: gguf_value(reader, f"{arch}.{k}") for k in
             ("block_count", "embedding_length", "attention.head_count", "attention.head_count_kv",
              "feed_forward_length", "context_length", "rope.freq_base")}
    params = sum(int(t.n_elements) for t in reader.tensors)
    types = Counter(t.tensor_type.name for t in reader.tensors)
    print(f"{path}: {gguf_value(reader, 'general.name') or path.stem}, architecture {arch}, "
          f"{file_type_name(reader)}, {params:,} parameters, {path.stat().st_size / 2**20:.1f} MiB; "
          f"{shape['block_count']} layers, d_model {shape['embedding_length']}, {shape['attention.head_count']} heads / "
          f"{shape['attention.head_count_kv']} KV groups, ffn {shape['feed_forward_length']}, "
          f"context {shape['context_length']}, RoPE θ {shape['rope.freq_base'] or 10000:g}")
    print("tensor types: " + ", ".join(f"{name} {n}" for name, n in types.most_common()))
    try:
        print(f"tokenizer: {describe_tokenizer(Tokenizer.from_gguf_vocab(path, reader=reader))}")
    except VocabularyNotRead as e:          # llama.cpp still tokenizes it when serving the file
        print(f"tokenizer: not rebuilt here ({str(e).removeprefix(f'{path}: ')}); llama.cpp's own is used to serve it")
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
    p = sub.add_parser("inspect", help="print a checkpoint's shape, tokenizer and a perplexity, or a GGUF's metadata")
    p.add_argument("dir", help="an HF-format Llama directory (ours or TinyLlama's), a hub id (org/name[@REV]) "
                               "or a .gguf file")
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
