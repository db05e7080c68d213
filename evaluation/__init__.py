"""evaluation: lm-eval-harness tasks, validation perplexity and checkpoint sweeps (a stage: it
reads pretrain's shards and run configs and sft's sample; the core does not).

    python -m evaluation --model out/sft --perplexity data/tokens/natural    # make eval
    from evaluation.harness import run_tasks; from evaluation.perplexity import perplexity
"""
