"""gpu_check: every CUDA path of the project, checked and measured on one GPU in under 8 minutes.

    make gpu-carry                                # here (network): wheels -> .whl/, tokenizer -> .cache/
    make gpu-check                                # on the GPU machine: results in $(OUT)/gpu-check/
    make gpu-check STAGES='fsdp2 smoke' BUDGET=200  # what the budget skipped, in a second call
    make gpu-check DRY=1                          # the same stages on CPU, tiny shapes (a rehearsal)

The GPU machine it is written for: one H100/H200, Python 3.12, a CUDA torch, triton,
transformers, peft, accelerate and the project's core dependencies, and no network. What it
lacks (trl, datasets, bitsandbytes, liger-kernel; a recent enough transformers) travels as
wheels in .whl/ (gpu_check/prepare_carry.sh), installed into a temporary folder, never into the
image; the offline tokenizer travels in .cache/tokenizers/llama2. Both are git-ignored: copy
them to the GPU machine along with the checkout.

Stages, in priority order, each time-boxed (seconds on an H200), inside a total BUDGET:

    env      versions, SDPA backend picked per shape, bf16 matmul and copy ceilings     ~20 s
    tests    the gpu-marked tests (tests/test_model.py, tests/test_gpu_paths.py)     30-40 s
    mfu      tinyllama-1.1b seq 2048 micro-batch 8, the project's loss_fn + AdamW:    60-90 s
             tokens/s and MFU; fused kernels (liger-kernel) vs not, forced SDPA backends
    qlora    bench.sft_memory's QLoRA measurement (ours + HF) + run_sft end to end   80-110 s
    spec     speculative decoding, tinyllama-1.1b drafting for a constructed          50-80 s
             llama-2-7b-shaped target (bench.constructed_pair) at alpha 0.8
    compile  block.compile() per block, torch.compile(loss_fn)                       60-170 s
    fsdp2    pretrain.train.build_model under a 1-rank NCCL group (fully_shard)          25 s
    smoke    python -m pretrain end to end on tinyllama-19m, then a resume               40 s

Outputs in OUT: results.jsonl (a record per measurement, written as it goes), log.txt (all
output), summary.txt (printed last). Reporting honestly: MFU against both the data-sheet peak
(as pretrain.metrics uses) and the matmul rate measured in `env`; QLoRA memory as the project
measures it (torch.cuda.max_memory_reserved) and device-wide (CUDA context, bnb's managed
pages); speculative decoding's alpha is constructed, not TinyLlama-vs-Llama-2's.
"""
