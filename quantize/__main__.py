"""python -m quantize: export an HF-format Llama directory to GGUF files for llama.cpp.

    python -m quantize --model out/pretrain/final --type q4_k_m q8_0 --out out/gguf
    python -m quantize --model TinyLlama/TinyLlama-1.1B-Chat-v1.0 --type q4_0 --out tinyllama-q4_0.gguf

Float types (f32, f16, bf16) are written with gguf-py; quantized types (q8_0, q4_0, q4_k_m,
q5_k_m, q6_k) by llama.cpp's own quantizer from an F32 intermediate. Each file is then loaded
in llama.cpp and checked against the PyTorch model (tokenization, logits, perplexity; skip with
--no-verify); float files that disagree beyond float tolerance fail the command. A size table
closes the run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tinyllama.errors import UserError, report

from .export import ALL_TYPES


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m quantize", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="the Llama to export: an HF-format directory (ours or TinyLlama's) "
                                                   "or a hub id (org/name, safetensors)")
    ap.add_argument("--revision", help="hub revision of --model (default: main)")
    ap.add_argument("--type", nargs="+", default=["q4_k_m"], metavar="TYPE",
                    help=f"one or more of {', '.join(ALL_TYPES)} (default: q4_k_m)")
    ap.add_argument("--out", required=True, type=Path, help="a .gguf file (one type) or a folder")
    ap.add_argument("--name", help="model name in the metadata and file names (default: the preset)")
    ap.add_argument("--no-verify", action="store_true", help="skip loading each file in llama.cpp to check it")
    ap.add_argument("--threads", type=int, default=None, help="quantizer threads (default: all cores)")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        ap.error(f"--threads must be >= 1, got {args.threads}")
    from tinyllama.checkpoint import load_config
    from tinyllama.hub import resolve_model

    from .pipeline import export, size_table, verify_all

    try:
        model = resolve_model(args.model, revision=args.revision, kinds=("checkpoint",)).path
        rows = export(model, args.type, args.out, args.name, args.threads)
        print()
        print(size_table(rows, load_config(model).num_params()))
        if args.no_verify:
            return 0
        print()
        return 0 if verify_all(model, rows) else 1
    except UserError as e:
        return report(e)


if __name__ == "__main__":
    sys.exit(main())
