"""Runs every benchmark and rewrites bench/RESULTS.md with the machine and the date (sections no
benchmark writes, one-off measurements, stay).

    python -m bench [--quick | --full]      (make bench: the default)
    python -m bench --only server_load       rerun some benchmarks, replacing only their sections

Each section is written as soon as it is measured, so that a run stopped part-way keeps what it
measured (a full run's head then says how many sections it got to); the console shows how long
each took.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import sys
import time
from pathlib import Path

import torch

from tinyllama.atomic import atomic_file

from . import (
    allocator,
    bench_core,
    data_prep,
    decode,
    dtype_choice,
    gguf,
    graph_decode,
    kill_resume,
    real_model,
    server_compare,
    server_load,
    sft_memory,
    speculative,
    torch_threads,
    train_throughput,
)

RESULTS = Path(__file__).with_name("RESULTS.md")
GPU_MARKER = "<!-- gpu -->"


def machine() -> str:
    """'AMD EPYC (avx2, torch AVX2), 2 threads, 2 cores, no GPU; Python ..., torch ...': every CPU
    figure below depends on the ISA level (bf16 is ~6x faster than float32 with AMX, several
    times slower with AVX2 only)."""
    from tinyllama.measure import cpu_identity

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu_identity().describe()}, {os.cpu_count()} cores, {gpu}; Python {platform.python_version()}, "
            f"torch {torch.__version__}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smallest sizes (a few minutes)")
    ap.add_argument("--full", action="store_true",
                    help="also SFT memory of tinyllama-1.1b (~25 min on 2 cores), its fp32 decode and the "
                         "speculative 7B-shaped pair at alpha 0.6, 0.7, 0.8 (~12 min and 10 GB each; each "
                         "pair's first build ~6 min and 15 GB)")
    ap.add_argument("--only", nargs="+", metavar="NAME",
                    help="run only these benchmarks (module names: decode, server_load, ...) and replace just "
                         "their sections of RESULTS.md")
    args = ap.parse_args(argv)

    todo = _sections(args)
    if args.only:
        known = {module_of(t) for t, _ in todo}
        if unknown := set(args.only) - known:
            ap.error(f"--only: no benchmark {', '.join(sorted(unknown))}; one of {', '.join(sorted(known))}")
        todo = [(t, f) for t, f in todo if module_of(t) in args.only]
    old = RESULTS.read_text() if RESULTS.exists() else ""
    sections = []
    for title, measure in todo:
        t0 = time.perf_counter()
        sections.append((title, with_cpu(measure())))
        print(f"\n## {title}\n\n{sections[-1][1]}\n\n({(time.perf_counter() - t0) / 60:.1f} minutes)", flush=True)
        # a run of an hour or more keeps what it measured if it stops (killed, a benchmark failing)
        if args.only:
            replace_sections(sections[-1:])
        elif len(sections) < len(todo):
            write_results(results_head(len(sections), len(todo)), sections, old)
    if args.only:
        return 0
    write_results(results_head(), sections, old)
    print(f"\nwrote {RESULTS}")
    return 0


def results_head(done: int | None = None, total: int | None = None) -> str:
    """The head of RESULTS.md: the date and the machine; while a run is under way, how far it got."""
    progress = ("" if done is None else
                f" That run measured {done} of its {total} sections; the others are from an earlier run.")
    return (f"# Benchmark results\n\nWritten by `make bench` on {dt.date.today().isoformat()}.{progress}\n"
            f"Machine: {machine()}.\n\nEach row measures ours and the reference in the same run; "
            "'ours vs ref' > 1 means ours is faster.\n")


def write_results(head: str, sections: list[tuple[str, str]], old: str) -> None:
    """RESULTS.md as full_results makes it from the file as it was before the run."""
    with atomic_file(RESULTS) as tmp:
        tmp.write_text(full_results(head, sections, old))


def full_results(head: str, sections: list[tuple[str, str]], old: str) -> str:
    """RESULTS.md after a full run: `head`, then every section the run wrote, in order, except
    that a "Not measured" placeholder leaves the old file's measured section for the same command
    in place (the 7B-shaped pair runs only under --full or --only); then the old sections no
    benchmark of the run writes (one-off measurements, each titled by its own command); then the
    GPU part, whose figures (make gpu-check) survive a CPU re-run."""
    gpu_part = old[old.index(GPU_MARKER):] if GPU_MARKER in old else ""
    kept = dict(_old_sections(old[:len(old) - len(gpu_part)]))
    body = []
    for title, tbl in sections:
        before = kept.pop(_key(title), None)
        body.append(before if before and _placeholder(tbl) else f"## {title}\n\n{tbl}\n")
    body += kept.values()
    return head + "".join(f"\n{s.rstrip()}\n" for s in body) + ("\n" + gpu_part if gpu_part else "")


def _old_sections(text: str) -> list[tuple[str, str]]:
    """(the title's key, the whole section from its "## " line) for each section of `text`."""
    starts = [m.start() for m in re.finditer(r"^## ", text, re.M)]
    return [(_key(text[a + 3:].split("\n", 1)[0]), text[a:b]) for a, b in zip(starts, starts[1:] + [len(text)])]


def _key(title: str) -> str:
    """What identifies a section across runs: the command its title names, else the title."""
    m = re.search(r"`(python -m bench\.[^`]+)`", title)
    return m.group(1) if m else title.strip()


def _placeholder(table: str) -> bool:
    return re.match(r"(CPU: [^\n]*\n\n)?Not measured", table) is not None


def with_cpu(text: str) -> str:
    """Every section names the CPU it ran on (its ISA level decides bf16 and more)."""
    from tinyllama.measure import cpu_identity

    return text if text.startswith("CPU: ") else f"CPU: {cpu_identity().describe()}\n\n{text}"


def _sections(args) -> list[tuple[str, object]]:
    """(title naming `python -m bench.MODULE`, a function measuring it) for every section, run
    lazily so that --only skips the rest."""
    # default: SFT memory on the 120M preset, decode of 1.1B in bf16
    def decode_table() -> str:
        if args.quick:
            return decode.run(["tinyllama-19m"], 64)
        if args.full:
            return decode.run(["tinyllama-19m", "tinyllama-1.1b"], 32)
        return decode.run(["tinyllama-19m"], 64) + "\n\n" + decode.run(["tinyllama-1.1b"], 16, dtypes=("bfloat16",),
                                                                      gguf=False)

    def sft_table() -> str:
        return (sft_memory.run("tinyllama-1.1b", 512) if args.full else
                sft_memory.run("tinyllama-120m", 256, steps=2 if not args.quick else 1))

    def gguf_tables() -> str:
        sizes = gguf.run(["q4_k_m"] if args.quick else ["q4_0", "q4_k_m", "q8_0", "f16", "q3_k_m", "iq4_xs", "iq3_m"])
        if not Path("out/sft/config.json").exists():
            return sizes + "\n\nQuality with and without an importance matrix: not measured (run `make run` first)."
        return sizes + "\n\n" + gguf.quality("out/sft", ["q4_k_m", "iq4_xs"] if args.quick else
                                               ["q4_k_m", "iq4_xs", "q3_k_m", "iq3_m", "q2_k"])

    pairs = [("out/sft", "out/draft/sft"),
             ("out/gguf/tinyllama-19m-chat-Q8_0.gguf", "out/gguf/tinyllama-debug-chat-Q8_0.gguf")]
    have_pairs = all(Path(p).exists() for pair in pairs for p in pair)
    # (title naming `python -m bench.MODULE`, what measures it), run lazily so --only skips the rest
    todo = [
        ("Core: tokenizer and model (`python -m bench.bench_core`)", lambda: bench_core.run(quick=args.quick)),
        ("Data preparation (`python -m bench.data_prep`)", lambda: data_prep.run(large_mb=10 if args.quick else 40)),
        ("Training step (`python -m bench.train_throughput`)", lambda: train_throughput.run(quick=args.quick)),
        ("dtype auto: the probe's choice, repeated, against real training steps (`python -m bench.dtype_choice`)",
         lambda: dtype_choice.run(repeats=4 if args.quick else 10)),
        ("Allocator churn in CPU training (`python -m bench.allocator`)",
         lambda: allocator.run(steps=4 if args.quick else 6, rounds=1 if args.quick else 2)),
        ("Decode speed (`python -m bench.decode`)", decode_table),
        ("Decode speed on the real model, SmolLM2-135M-Instruct (`python -m bench.decode --real-model`)",
         lambda: decode.real_model_rows(32 if args.quick else 64)),
        ("The real model through every stage, SmolLM2-135M-Instruct (`python -m bench.real_model`)",
         lambda: real_model.run(sft_steps=4 if args.quick else 30, limit=40 if args.quick else 100)),
        ("Decode step cost, eager vs static-shape vs CUDA graphs (`python -m bench.graph_decode`)",
         lambda: graph_decode.run(tokens=4 if args.quick else 8)),
        ("SFT memory and speed (`python -m bench.sft_memory`)", sft_table),
        ("GGUF sizes and llama.cpp decode (`python -m bench.gguf`)", gguf_tables),
        ("GGUF quality on the real model, SmolLM2-135M-Instruct (`python -m bench.gguf --real-model`)",
         lambda: gguf.real_model_quality(gguf.REAL_MODEL_TYPES)),
        ("Speculative decoding on the real target, SmolLM2-135M-Instruct (`python -m bench.speculative --eos`)",
         lambda: real_pair_tables(args.quick)),
        ("Speculative decoding, the CPU-default pair (`python -m bench.speculative`)" if have_pairs else
         "Speculative decoding (`python -m bench.speculative`)",
         (lambda: "\n\n".join([speculative.run(t, d) for t, d in pairs] +
                               ["Prompt lookup (`-md ngram`, no draft model), on code to copy and on chat:"] +
                               [speculative.run(t, "ngram", ks=(2, 4), repeats=2, prompt_set=ps)
                                for t, _ in pairs for ps in ("copy", "chat")])) if have_pairs else
         (lambda: "Not measured: run `make run` first (it trains the target and its draft).")),
        ("Speculative decoding on a constructed 1.1B-shaped pair, the quick variant "
         "(`python -m bench.speculative --pair 1b`)",
         lambda: "\n\n".join(speculative.run_pair("1b", a) for a in ((0.6, 0.7, 0.8) if args.full or args.only else (0.8,)))),
        ("Speculative decoding on a constructed 7B-shaped pair (`python -m bench.speculative --pair 7b`)",
         lambda: "\n\n".join(speculative.run_pair("7b", a) for a in (0.6, 0.7, 0.8)) if args.full or args.only else
         "Not measured by default (~12 minutes and 10 GB of memory per alpha, at 0.6, 0.7 and 0.8; each pair's first build "
         "~6 minutes and 15 GB): `python -m bench --full` or "
         "`python -m bench --only speculative-7b`."),
        ("Server under load (`python -m bench.server_load`)",
         lambda: server_load.run(duration_s=20.0 if args.quick else 60.0)),
        ("Serving side by side with llama-server, continuous batching (`python -m bench.server_compare`)",
         lambda: server_tables(args.quick)),
        ("torch's threads beside llama.cpp's (`python -m bench.torch_threads`)",
         lambda: torch_threads.run(requests=4 if args.quick else 8, pairs=2 if args.quick else 6)),
        ("Crash safety: SIGKILLed pretraining resumed (`python -m bench.kill_resume`)",
         lambda: kill_resume.run(kills=4 if args.quick else 12, steps=12 if args.quick else 24)),
    ]
    return todo


def real_pair_tables(quick: bool) -> str:
    """The real model drafted by the draft `tinyllama draft` built for it: GGUF and PyTorch
    targets with llama.cpp's and transformers' own speculative decoding beside ours, chat and
    code prompts held out of the distillation, EOS honoured; then prompt lookup."""
    from tinyllama import real_model as rm
    from tinyllama.inference.draft_policy import DEFAULT_P_MIN

    target, draft = rm.path(), rm.draft_path()
    if target is None or not draft.is_file():
        return ("Not measured: the real model and its draft are not both here (`make real-model`, then "
                f"`make draft TARGET={rm.models_dir() / rm.GGUF_NAME}`).")
    recipe = draft.parent.parent                 # out/draft-NAME: the import in target/, the draft in sft/
    n, tokens = (3, 64) if quick else (6, 128)
    p_mins = (DEFAULT_P_MIN, 0.75)               # the default stop, and llama.cpp's server default
    tables = [speculative.run(str(target), str(draft), n_prompts=n, tokens=tokens, anchor=True, eos=True,
                              prompt_set=ps, repeats=1 if quick else 2, p_mins=p_mins) for ps in ("chat", "code")]
    if (recipe / "target" / "config.json").exists():
        tables.append(speculative.run(str(recipe / "target"), str(draft), n_prompts=n, tokens=tokens, eos=True,
                                      repeats=1 if quick else 2, draft_checkpoint=str(recipe / "sft"),
                                      p_mins=p_mins))
    tables.append(speculative.run(str(target), "ngram", ks=(2, 4), n_prompts=n, tokens=tokens, eos=True,
                                  repeats=1))
    return "\n\n".join(tables)


def server_tables(quick: bool) -> str:
    """bench.server_compare's default models, 4 windows each; then the real model, where the two
    servers are closest, paired twice as long (8 windows of 15 s per client count: one window
    moves by up to +-20% on these machines, so 4 pairs cannot settle a few per cent), plain and
    with its draft at 1 client when both are here."""
    from tinyllama import real_model as rm

    duration, clients = (15.0, (1, 8)) if quick else (60.0, (1, 8, 32))
    real = rm.path()
    text = server_compare.run(duration_s=duration, clients=clients,
                              models=[m for m in server_compare.default_models() if m != real])
    if real is None:
        return text
    windows = 4 if quick else 8
    rows = server_compare.measure(real, clients, duration_s=duration * windows / 4, windows=windows)
    text += "\n\nThe real model, paired longer:\n\n" + server_compare.table(rows, 8, 512, 32)
    if rm.draft_path().is_file():
        rows = server_compare.measure(real, clients=(1,), duration_s=duration * windows / 4, windows=windows,
                                      draft=rm.draft_path())
        text += "\n\nWith the real model's draft, each server by its own speculative settings:\n\n" + \
            server_compare.table(rows, 8, 512, 32)
    return text


def module_of(title: str) -> str:
    """A section's name for --only: its module, and its --pair, --real-model or --eos if any
    ("speculative-7b", "gguf-real-model", "speculative-eos": the real target)."""
    m = re.search(r"`python -m bench\.(\w+)(?: --pair (\w+)| --(real-model|eos))?`", title)
    extra = m.group(2) or m.group(3)
    return m.group(1) + (f"-{extra}" if extra else "")


def replace_sections(sections: list[tuple[str, str]]) -> int:
    """Puts each section in place of the one for the same benchmark in RESULTS.md (or adds it
    before the GPU part), leaving the others as they were measured."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    for title, tbl in sections:
        new = f"## {title}\n\n{tbl}\n"
        old = re.search(rf"^## [^\n]*`{re.escape(_key(title))}`.*?(?=^## |{GPU_MARKER}|\Z)", text,
                        re.M | re.S)
        if old:
            text = text[:old.start()] + new + ("\n" if old.group(0).endswith("\n\n") else "") + text[old.end():]
        elif GPU_MARKER in text:
            at = text.index(GPU_MARKER)
            text = text[:at] + new + "\n" + text[at:]
        else:
            text = text.rstrip("\n") + "\n\n" + new
    with atomic_file(RESULTS) as tmp:
        tmp.write_text(text)
    print(f"\nupdated {', '.join(module_of(t) for t, _ in sections)} in {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
