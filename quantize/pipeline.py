"""An HF-format directory to several GGUF files in one call, each checked in llama.cpp: what
`python -m quantize` runs, as a library.

    rows = export("out/sft", ["q4_k_m", "q8_0"], Path("out/gguf"))      # [(type, path, seconds), ...]
    print(size_table(rows, n_params)); ok = verify_all("out/sft", rows)
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Iterator

from tinyllama.paths import check_output_dir, check_output_parent

from .export import ALL_TYPES, FLOAT_TYPES, ExportError, quantize_gguf, write_gguf

Exported = tuple[str, Path, float]          # (type, file, seconds it took)


def output_paths(out: Path, types: list[str], name: str) -> dict[str, Path]:
    """The file per type; creates the --out folder (export removes it again if nothing is written)."""
    if out.suffix == ".gguf":
        if len(types) != 1:
            raise ExportError(f"--out {out} is one file but {len(types)} types were asked for; give a folder")
        check_output_parent(out, "--out")
        if out.is_dir():
            raise ExportError(f"--out {out}: is a folder; give a file name or a folder without .gguf")
        return {types[0]: out}
    if not check_output_dir(out, "--out").is_dir():
        out.mkdir()
    return {t: out / f"{name}-{t.upper()}.gguf" for t in types}


def export(model_dir: str | Path, types: list[str], out: Path, name: str | None = None,
           threads: int | None = None) -> list[Exported]:
    """Float types written by gguf-py, quantized types by llama.cpp's quantizer from an F32
    intermediate (the F32 file itself when it is asked for; else a hidden temporary, removed).
    A folder this call created for files it could not write is removed again."""
    from tinyllama.checkpoint import load_config

    model_dir, types = Path(model_dir), [t.lower() for t in types]
    unknown = [t for t in types if t not in ALL_TYPES]
    if unknown:
        raise ExportError(f"unknown type(s) {', '.join(unknown)}; choose from {', '.join(ALL_TYPES)}")
    cfg = load_config(model_dir)
    name = name or (cfg.name if cfg.name != "custom" else model_dir.name)
    with _remove_if_empty(out if out.suffix != ".gguf" and not out.exists() else None):
        paths = output_paths(out, types, name)
        rows: list[Exported] = []
        for t in [t for t in types if t in FLOAT_TYPES]:
            rows.append(_timed(t, paths[t], lambda: write_gguf(model_dir, paths[t], t, name=name)))
        quant = [t for t in types if t not in FLOAT_TYPES]
        if quant:
            with _f32_source(model_dir, paths, name) as src:
                for t in quant:
                    rows.append(_timed(t, paths[t], lambda: quantize_gguf(src, paths[t], t, threads)))
    return rows


def _timed(ftype: str, path: Path, write) -> Exported:
    t0 = time.perf_counter()
    write()
    print(f"wrote {path}")
    return ftype, path, time.perf_counter() - t0


@contextlib.contextmanager
def _f32_source(model_dir: Path, paths: dict[str, Path], name: str) -> Iterator[Path]:
    """The F32 GGUF the quantizer reads: the one just written, or a temporary removed after."""
    if "f32" in paths and paths["f32"].exists():
        yield paths["f32"]
        return
    intermediate = next(iter(paths.values())).parent / f".{name}-F32.intermediate.gguf"
    try:
        write_gguf(model_dir, intermediate, "f32", name=name)
        yield intermediate
    finally:
        intermediate.unlink(missing_ok=True)


@contextlib.contextmanager
def _remove_if_empty(new_folder: Path | None) -> Iterator[None]:
    try:
        yield
    except BaseException:
        if new_folder is not None and new_folder.is_dir() and not any(new_folder.iterdir()):
            new_folder.rmdir()         # the folder this run made for files it did not write
        raise


def size_table(rows: list[Exported], n_params: int) -> str:
    head = f"{'type':<7} {'file':<40} {'bytes':>14} {'MB':>9} {'bits/weight':>11} {'seconds':>8}"
    lines = [head, "-" * len(head)]
    for t, p, secs in rows:
        size = p.stat().st_size
        lines.append(f"{t:<7} {p.name:<40} {size:>14,} {size / 1e6:>9.1f} {8 * size / n_params:>11.2f} {secs:>8.1f}")
    return "\n".join(lines)


def verify_all(model_dir: str | Path, rows: list[Exported]) -> bool:
    """Loads each file in llama.cpp against the PyTorch model; prints a line per file and
    returns False if any tokenizes differently or a float file is beyond float tolerance."""
    import torch

    from tinyllama import load_checkpoint

    from .verify import FLOAT_TOLERANCE, verify_gguf

    model, tok = load_checkpoint(model_dir)
    ok = True
    with torch.no_grad():   # tolerances are relative to the model's logit scale
        scale = max(1.0, float(model(torch.tensor([tok.encode("scale")])).abs().max()))
    for t, path, _ in rows:
        report = verify_gguf(path, model, tok)
        print(report.line())
        if not report.tokenization_equal:
            ok = False
            print(f"  FAILED: llama.cpp tokenizes the sample differently from {model_dir}")
        if t in FLOAT_TOLERANCE and report.max_abs_diff > FLOAT_TOLERANCE[t] * scale:
            ok = False
            print(f"  FAILED: {t} logits differ by more than float tolerance ({FLOAT_TOLERANCE[t] * scale:.2e})")
    return ok
