"""python -m quantize: export an HF-format Llama directory to GGUF files for llama.cpp.

    python -m quantize --model out/pretrain/final --type q4_k_m q8_0 --out out/gguf
    python -m quantize --model TinyLlama-1.1B-Chat-v1.0 --type q4_0 --out tinyllama-q4_0.gguf

Float types (f32, f16, bf16) are written with gguf-py; quantized types (q8_0, q4_0, q4_k_m,
q5_k_m, q6_k) by llama.cpp's own quantizer from an F32 intermediate. Each file is then loaded
in llama.cpp and checked against the PyTorch model (tokenization, logits, perplexity; skip with
--no-verify); float files that disagree beyond float tolerance fail the command. A size table
closes the run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .export import ALL_TYPES, FLOAT_TYPES, ExportError, quantize_gguf, write_gguf


def _check_parent(out: Path) -> None:
    if out.parent.exists() and not out.parent.is_dir():
        raise ExportError(f"--out {out}: {out.parent} is not a folder")
    if not out.parent.is_dir():
        raise ExportError(f"--out {out}: folder {out.parent} does not exist")


def output_paths(out: Path, types: list[str], name: str) -> dict[str, Path]:
    """The file per type; creates the --out folder (the caller removes it if the export fails)."""
    if out.suffix == ".gguf":
        if len(types) != 1:
            raise ExportError(f"--out {out} is one file but {len(types)} types were asked for; give a folder")
        _check_parent(out)
        if out.is_dir():
            raise ExportError(f"--out {out}: is a folder; give a file name or a folder without .gguf")
        return {types[0]: out}
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out}: exists and is not a folder")
    if not out.is_dir():
        _check_parent(out)
        out.mkdir()
    return {t: out / f"{name}-{t.upper()}.gguf" for t in types}


def size_table(rows: list[tuple[str, Path, float]], n_params: int) -> str:
    head = f"{'type':<7} {'file':<40} {'bytes':>14} {'MB':>9} {'bits/weight':>11} {'seconds':>8}"
    lines = [head, "-" * len(head)]
    for t, p, secs in rows:
        size = p.stat().st_size
        lines.append(f"{t:<7} {p.name:<40} {size:>14,} {size / 1e6:>9.1f} {8 * size / n_params:>11.2f} {secs:>8.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m quantize", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=Path, help="an HF-format Llama directory (ours or TinyLlama's)")
    ap.add_argument("--type", nargs="+", default=["q4_k_m"], metavar="TYPE",
                    help=f"one or more of {', '.join(ALL_TYPES)} (default: q4_k_m)")
    ap.add_argument("--out", required=True, type=Path, help="a .gguf file (one type) or a folder")
    ap.add_argument("--name", help="model name in the metadata and file names (default: the preset)")
    ap.add_argument("--no-verify", action="store_true", help="skip loading each file in llama.cpp to check it")
    ap.add_argument("--threads", type=int, default=None, help="quantizer threads (default: all cores)")
    args = ap.parse_args(argv)

    types = [t.lower() for t in args.type]
    unknown = [t for t in types if t not in ALL_TYPES]
    if args.threads is not None and args.threads < 1:
        ap.error(f"--threads must be >= 1, got {args.threads}")
    new_folder = args.out if args.out.suffix != ".gguf" and not args.out.exists() else None
    try:
        if unknown:
            raise ExportError(f"unknown type(s) {', '.join(unknown)}; choose from {', '.join(ALL_TYPES)}")
        import torch

        from tinyllama import load_checkpoint
        from tinyllama.checkpoint import CheckpointError, load_config

        try:
            cfg = load_config(args.model)
        except (FileNotFoundError, CheckpointError) as e:
            raise ExportError(str(e)) from None
        name = args.name or (cfg.name if cfg.name != "custom" else args.model.name)
        paths = output_paths(args.out, types, name)
        rows: list[tuple[str, Path, float]] = []
        intermediate = None
        for t in [t for t in types if t in FLOAT_TYPES]:
            t0 = time.perf_counter()
            write_gguf(args.model, paths[t], t, name=name)
            rows.append((t, paths[t], time.perf_counter() - t0))
            print(f"wrote {paths[t]}")
        quant = [t for t in types if t not in FLOAT_TYPES]
        if quant:
            if "f32" in paths and paths["f32"].exists():
                src = paths["f32"]
            else:
                intermediate = next(iter(paths.values())).parent / f".{name}-F32.intermediate.gguf"
                write_gguf(args.model, intermediate, "f32", name=name)
                src = intermediate
            try:
                for t in quant:
                    t0 = time.perf_counter()
                    quantize_gguf(src, paths[t], t, args.threads)
                    rows.append((t, paths[t], time.perf_counter() - t0))
                    print(f"wrote {paths[t]}")
            finally:
                if intermediate is not None:
                    intermediate.unlink(missing_ok=True)
        print()
        print(size_table(rows, cfg.num_params()))
        if args.no_verify:
            return 0
        from .verify import FLOAT_TOLERANCE, verify_gguf

        model, tok = load_checkpoint(args.model)
        failed = False
        with torch.no_grad():   # tolerances are relative to the model's logit scale
            scale = max(1.0, float(model(torch.tensor([tok.encode("scale")])).abs().max()))
        print()
        for t, path, _ in rows:
            report = verify_gguf(path, model, tok)
            print(report.line())
            if not report.tokenization_equal:
                failed = True
                print(f"  FAILED: llama.cpp tokenizes the sample differently from {args.model}")
            if t in FLOAT_TOLERANCE and report.max_abs_diff > FLOAT_TOLERANCE[t] * scale:
                failed = True
                print(f"  FAILED: {t} logits differ by more than float tolerance ({FLOAT_TOLERANCE[t] * scale:.2e})")
        return 1 if failed else 0
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        if new_folder is not None and new_folder.is_dir() and not any(new_folder.iterdir()):
            new_folder.rmdir()         # the folder this run made for files it did not write
        return 2


if __name__ == "__main__":
    sys.exit(main())
