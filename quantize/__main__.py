"""python -m quantize: export an HF-format Llama directory to GGUF files for llama.cpp.

    python -m quantize --model out/pretrain/final --type q4_k_m q8_0 --out out/gguf
    python -m quantize --model TinyLlama/TinyLlama-1.1B-Chat-v1.0 --type q4_0 --out tinyllama-q4_0.gguf
    python -m quantize --model out/sft --type iq4_xs iq3_m --imatrix --quality --out out/gguf
    python -m quantize --model out/sft --target-size 550MB --imatrix --out out/gguf
    python -m quantize import SmolLM2-135M-Instruct.Q4_1.gguf --out out/smollm2   # GGUF -> checkpoint

Float types (f32, f16, bf16) are written with gguf-py; quantized types by llama.cpp's own
quantizer from an F32 intermediate. Each file is then loaded in llama.cpp and checked against the
PyTorch model (tokenization, logits, perplexity; skip with --no-verify); float files that
disagree beyond float tolerance fail the command. A size table closes the run.

--imatrix computes an importance matrix with llama.cpp's llama-imatrix (on the data pipeline's
validation shards, or --calibration FILE), saves it next to the GGUFs (reused by the same
request) and quantizes with llama-quantize; i-quants below 4 bits (iq3_m) need it. --quality adds
a table from llama-perplexity: perplexity on held-out text and KL divergence from the F32 file.
--target-size picks the type of least KL divergence whose file fits the budget. The tools are
built from the llama.cpp sources in the llama-cpp-python sdist on first use (a few minutes, once).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tinyllama.cli import add_model_args, add_renamed_flag
from tinyllama.errors import UserError, report

from .export import ALL_TYPES


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m quantize", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap, help="the Llama to export: an HF-format directory (ours or TinyLlama's) or a hub id "
                            "(org/name, safetensors)", only=("revision",))
    ap.add_argument("--type", nargs="+", default=["q4_k_m"], metavar="TYPE",
                    help=f"one or more of {', '.join(ALL_TYPES)} (default: q4_k_m)")
    ap.add_argument("--out", required=True, type=Path, help="a .gguf file (one type) or a folder")
    ap.add_argument("--name", help="model name in the metadata and file names (default: the preset)")
    q = ap.add_argument_group("importance matrix, quality and size budget (llama.cpp's tools)")
    q.add_argument("--imatrix", nargs="?", const=True, default=None, metavar="FILE",
                   help="quantize with an importance matrix: computed (and saved as OUT/NAME.imatrix), or FILE")
    q.add_argument("--calibration", type=Path, metavar="FILE",
                   help="plain text for the importance matrix (default: the validation shards under data/tokens)")
    q.add_argument("--chunks", type=int, default=64, help="importance-matrix chunks of --ctx-size tokens (default: 64)")
    q.add_argument("-c", "--ctx-size", dest="ctx_size", type=int, default=None, metavar="N",
                   help="tokens per chunk, for the matrix and for quality, as llama-imatrix's and llama-perplexity's -c "
                        "(default: min(512, the model's context))")
    add_renamed_flag(q, "--ctx", "--ctx-size", dest="ctx_size", type=int)
    q.add_argument("--quality", action="store_true", help="a quality table from llama-perplexity over held-out "
                   "text: perplexity and KL divergence from the F32 file (mean, p99, same top token)")
    q.add_argument("--quality-chunks", type=int, default=32, help="chunks scored by --quality (default: 32)")
    q.add_argument("--target-size", metavar="SIZE", help="instead of --type: the type of least KL divergence whose "
                   "file fits SIZE (e.g. 550MB, 600MiB)")
    ap.add_argument("--no-verify", action="store_true", help="skip loading each file in llama.cpp to check it")
    ap.add_argument("--threads", type=int, default=None, help="quantizer threads (default: all cores)")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["import"]:          # the other direction: a GGUF into a checkpoint directory
        from .gguf_import import main as import_main

        return import_main(argv[1:])
    ap = build_parser()
    args = ap.parse_args(argv)
    for flag in ("threads", "ctx_size", "chunks", "quality_chunks"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    from tinyllama.formats.hub import resolve_model

    from .pipeline import export, size_table, verify_all

    try:
        model = resolve_model(args.model, revision=args.revision, kinds=("checkpoint",)).path
        plan = _Plan(args, model)
        if args.target_size:
            rows = plan.budget()
        else:
            rows = export(model, args.type, args.out, args.name, args.threads, plan.imatrix(),
                          plan.score_rows if args.quality else None)
        print()
        print(size_table(rows, plan.n_params))
        if plan.report:
            print()
            print(plan.report)
        if args.no_verify:
            return 0
        print()
        return 0 if verify_all(model, rows) else 1
    except UserError as e:
        return report(e)


class _Plan:
    """What the flags ask of llama.cpp's tools: the texts, the matrix, the quality table."""

    def __init__(self, args: argparse.Namespace, model: Path) -> None:
        from tinyllama.formats.checkpoint import load_config

        from .pipeline import parse_size

        self.args, self.model, self.report = args, model, ""
        cfg = load_config(model)
        self.n_params, self.ctx = cfg.num_params(), args.ctx_size or min(512, cfg.max_seq_len)
        self.name = args.name or (cfg.name if cfg.name != "custom" else model.name)
        self.budget_bytes = parse_size(args.target_size) if args.target_size else None
        if args.imatrix is not None and args.imatrix is not True and not Path(args.imatrix).is_file():
            raise UserError(f"--imatrix {args.imatrix}: no such file")
        self._texts = None
        if args.imatrix is True or args.quality or args.target_size:
            from tinyllama import Tokenizer

            from .imatrix import texts

            self._texts = texts(args.calibration, Tokenizer.from_dir(model))
            print(self._texts[2])

    def imatrix(self):
        if self.args.imatrix is None:
            return None
        if self.args.imatrix is not True:
            return Path(self.args.imatrix)
        from .imatrix import compute_imatrix, model_key

        folder = self.args.out if self.args.out.suffix != ".gguf" else self.args.out.parent
        return lambda f32: compute_imatrix(f32, self._texts[0], folder / f"{self.name}.imatrix", model_key(self.model),
                                           self.args.chunks, self.ctx, self.args.threads)

    def score_rows(self, f32: Path, rows) -> None:
        """--quality: the table of every file written, against the F32 file."""
        scored = self._score(f32, {t: p for t, p, _ in rows})
        from .quality import quality_table

        self.report = quality_table([(t, p, scored[t]) for t, p, _ in rows], self._torch_ppl, self.n_params)

    def _score(self, f32: Path, files: dict[str, Path]) -> dict:
        import tempfile

        from .quality import Scorer

        with tempfile.TemporaryDirectory(prefix=".kld-", dir=f32.parent) as tmp:
            scorer = Scorer(self.model, f32, self._texts[1], Path(tmp), self.ctx, self.args.quality_chunks)
            self._torch_ppl = scorer.torch_ppl
            return {t: scorer.score(p) for t, p in files.items()}

    def budget(self):
        from .pipeline import export_for_budget

        def score(f32: Path, files: dict[str, Path]) -> dict[str, float]:
            scored = self._score(f32, files)
            return {t: q.kld_mean for t, q in scored.items()}

        row, table = export_for_budget(self.model, self.budget_bytes, self.args.out, self.args.name,
                                       self.args.threads, self.imatrix(), score)
        lines = ["| type | MB | fits | KLD mean |", "|---|---:|---|---:|"]
        for t, size, kld, measured in sorted(table, key=lambda r: r[1]):
            mark = " (chosen)" if t == row[0] else ""
            mb = f"{size / 1e6:,.1f}" if measured else f"~{size / 1e6:,.0f} (estimated; not made)"
            lines.append(f"| {t}{mark} | {mb} | {'yes' if kld is not None else 'no'} | "
                         f"{f'{kld:.5f}' if kld is not None else '-'} |")
        self.report = (f"--target-size {self.args.target_size}: {row[0]} (least KL divergence of the types that "
                       "fit)\n" + "\n".join(lines))
        return [row]


if __name__ == "__main__":
    sys.exit(main())
