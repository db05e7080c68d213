"""gpu_check: every CUDA path of the project, checked and measured on one GPU in under 8 minutes.

    make gpu-carry                                # here (network): wheels -> .whl/, tokenizer -> .cache/
    make gpu-check                                # on the GPU machine: results in $(OUT)/gpu-check/
    make gpu-check STAGES='fsdp2 smoke' BUDGET=200  # what the budget skipped, in a second call
    make gpu-check DRY=1                          # the same stages on CPU, tiny shapes (a rehearsal)

The GPU machine it is written for: one H100/H200, Python 3.12, a CUDA torch, triton,
transformers, peft, accelerate and the project's core dependencies, and no network. What it
lacks (trl, datasets, bitsandbytes, liger-kernel; a recent enough transformers) travels as
wheels in .whl/ (scripts/gpu_carry.sh), installed into a temporary folder, never into the
image; the offline tokenizer travels in .cache/tokenizers/llama2. Both are git-ignored: copy
them to the GPU machine along with the checkout.

gpu_check is a table (stage_table in __main__.py), not a second set of measurements: each stage
runs a benchmark's suite mode, `python -m bench.X ...`, which writes its JSON records through
bench.records; only the two probes with no benchmark twin live here (env_probe, run_tests).
Stages, in priority order, each time-boxed (seconds on an H200), inside a total BUDGET:

    env      gpu_check.env_probe: versions, SDPA backend per shape, bf16 matmul and copy ceilings  ~20 s
    tests    gpu_check.run_tests: the gpu-marked tests                                          30-40 s
    mfu      bench.train_throughput --variants eager unfused sdpa-flash sdpa-cudnn --profile:   60-90 s
             tinyllama-1.1b seq 2048 micro-batch 8, the project's loss_fn + AdamW, tokens/s and MFU
    qlora    bench.sft_memory --records --methods qlora --impls ours hf --e2e                  80-110 s
    spec     bench.speculative --pair 7b --backend torch: tinyllama-1.1b drafting for a         50-80 s
             constructed llama-2-7b-shaped target at alpha 0.8, eager and captured
    compile  bench.train_throughput --variants compile-blocks compile                        60-170 s
    fsdp2    bench.train_throughput --variants fsdp2 (a 1-rank NCCL group, fully_shard)          25 s
    smoke    bench.kill_resume --smoke: python -m pretrain on tinyllama-19m, then a resume       40 s

Outputs in OUT: results.jsonl (a record per measurement, written as it goes), log.txt (all
output), summary.txt (printed last). Reporting honestly: MFU against both the data-sheet peak
(as pretrain.metrics uses) and the matmul rate measured in `env`; QLoRA memory as the project
measures it (torch.cuda.max_memory_reserved) and device-wide (CUDA context, bnb's managed
pages); speculative decoding's alpha is constructed, not TinyLlama-vs-Llama-2's.
"""
