"""An HF-format directory to several GGUF files in one call, each checked in llama.cpp: what
`python -m quantize` runs, as a library.

    rows = export("out/sft", ["q4_k_m", "q8_0"], Path("out/gguf"))      # [(type, path, seconds), ...]
    print(size_table(rows, n_params)); ok = verify_all("out/sft", rows)
    rows = export("out/sft", ["iq4_xs"], out, imatrix=lambda f32: compute_imatrix(f32, ...))
    row, table = export_for_budget("out/sft", 550_000_000, out, score=...)   # --target-size 550MB
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Callable, Iterator

from tinyllama.paths import check_output_dir, check_output_parent

from .export import (
    ALL_TYPES,
    FLOAT_TYPES,
    NEEDS_IMATRIX,
    QUANT_TYPES,
    ExportError,
    check_imatrix,
    quantize_gguf,
    write_gguf,
)

Exported = tuple[str, Path, float]          # (type, file, seconds it took)
# an importance-matrix file, or what makes one from the F32 GGUF (called once, only if needed)
Imatrix = Path | Callable[[Path], Path] | None

# Bits per weight of each type for a Llama of TinyLlama's shape (TheBloke's TinyLlama-1.1B files):
# used only to skip types that cannot fit a --target-size budget before quantizing them.
BPW_ESTIMATE = {"q2_k": 3.5, "iq3_m": 3.75, "q3_k_m": 4.0, "iq4_xs": 4.4, "q4_0": 4.64, "iq4_nl": 4.65,
                "q4_k_s": 4.68, "q4_k_m": 4.87, "q5_k_s": 5.58, "q5_k_m": 5.7, "q6_k": 6.58, "q8_0": 8.5}


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
           threads: int | None = None, imatrix: Imatrix = None,
           with_f32: Callable[[Path, list[Exported]], None] | None = None) -> list[Exported]:
    """Float types written by gguf-py, quantized types by llama.cpp's quantizer from an F32
    intermediate (the F32 file itself when it is asked for; else a hidden temporary, removed),
    with `imatrix` when given. `with_f32(f32, rows)` runs last, while the F32 file still exists
    (quality scoring). A folder this call created for files it could not write is removed again."""
    from tinyllama.formats.checkpoint import load_config

    model_dir, types = Path(model_dir), [t.lower() for t in types]
    unknown = [t for t in types if t not in ALL_TYPES]
    if unknown:
        raise ExportError(f"unknown type(s) {', '.join(unknown)}; choose from {', '.join(ALL_TYPES)}")
    check_imatrix(types, imatrix is not None)           # before any file is written
    cfg = load_config(model_dir)
    name = name or (cfg.name if cfg.name != "custom" else model_dir.name)
    with _remove_if_empty(out if out.suffix != ".gguf" and not out.exists() else None):
        paths = output_paths(out, types, name)
        rows: list[Exported] = []
        for t in [t for t in types if t in FLOAT_TYPES]:
            rows.append(_timed(t, paths[t], lambda: write_gguf(model_dir, paths[t], t, name=name)))
        quant = [t for t in types if t not in FLOAT_TYPES]
        if quant or with_f32:
            with _f32_source(model_dir, paths, name) as src:
                mat = imatrix(src) if callable(imatrix) and quant else imatrix
                for t in quant:
                    rows.append(_timed(t, paths[t], lambda: quantize_gguf(src, paths[t], t, threads, mat)))
                if with_f32:
                    with_f32(src, rows)
    return rows


def parse_size(text: str) -> int:
    """"550MB" -> 550_000_000 bytes ("MiB", "GB", "GiB", "KB" and plain bytes too)."""
    import re

    m = re.fullmatch(r"\s*([\d.]+)\s*([KMG]i?B|B)?\s*", text, re.IGNORECASE)
    units = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
    if m is None:
        raise ExportError(f"--target-size {text!r}: expected a size such as 550MB, 0.6GB or 600MiB")
    return int(float(m[1]) * units[(m[2] or "B").lower()])


def export_for_budget(model_dir: str | Path, budget: int, out: Path, name: str | None, threads: int | None,
                      imatrix: Imatrix, score: Callable[[Path, dict[str, Path]], dict[str, float]]
                      ) -> tuple[Exported, list[tuple[str, int, float | None, bool]]]:
    """The quantized type of least KL divergence (`score(f32, {type: file})`, lower is better)
    whose file fits in `budget` bytes, written to `out` (a folder or a .gguf); returns it and
    every type's (type, bytes, score or None when it did not fit, whether the bytes were
    measured or only estimated: types far over the budget are not made at all)."""
    import shutil
    import tempfile

    from tinyllama.formats.checkpoint import load_config

    t0 = time.perf_counter()
    model_dir = Path(model_dir)
    cfg = load_config(model_dir)
    name = name or (cfg.name if cfg.name != "custom" else model_dir.name)
    n = cfg.num_params()
    candidates = [t for t in QUANT_TYPES if n * BPW_ESTIMATE[t] / 8 <= 1.15 * budget
                  and (t not in NEEDS_IMATRIX or imatrix is not None)]
    if not candidates:
        raise ExportError(f"--target-size {budget / 1e6:,.0f} MB: no type can fit; the smallest, q2_k, is about "
                          f"{n * BPW_ESTIMATE['q2_k'] / 8e6:,.0f} MB for {n / 1e6:,.0f}M parameters")
    with _remove_if_empty(out if out.suffix != ".gguf" and not out.exists() else None):
        final = output_paths(out, ["budget"], name)["budget"]
        work = Path(tempfile.mkdtemp(prefix=".target-size-", dir=final.parent))
        try:
            with _f32_source(model_dir, {"work": work / "x"}, name) as src:
                mat = imatrix(src) if callable(imatrix) else imatrix
                files = {t: quantize_gguf(src, work / f"{name}-{t.upper()}.gguf", t, threads, mat) for t in candidates}
                fits = {t: f for t, f in files.items() if f.stat().st_size <= budget}
                if not fits:
                    smallest = min(files, key=lambda t: files[t].stat().st_size)
                    raise ExportError(f"--target-size {budget / 1e6:,.1f} MB: no type fits; the smallest, {smallest}, "
                                      f"is {files[smallest].stat().st_size / 1e6:,.1f} MB")
                scores = score(src, fits)
            best = min(fits, key=lambda t: scores[t])
            path = final if out.suffix == ".gguf" else final.with_name(f"{name}-{best.upper()}.gguf")
            shutil.move(str(fits[best]), path)
            table = [(t, f.stat().st_size if f.exists() else path.stat().st_size, scores.get(t), True)
                     for t, f in files.items()]
            table += [(t, int(n * BPW_ESTIMATE[t] / 8), None, False) for t in QUANT_TYPES if t not in files]
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {path}")
    return (best, path, time.perf_counter() - t0), table


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
