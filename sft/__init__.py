"""sft: chat fine-tuning of an HF-format Llama directory with trl + peft (+ bitsandbytes).

    python -m sft --base out/pretrain/final --out out/sft              # LoRA on the shipped sample
    from sft.train import SFTArgs, run_sft                             # the same, as a library

data.py (Guanaco / JSONL / hub -> masked token rows), modeling.py (tinyllama.model.model.Llama as a
transformers PreTrainedModel), train.py (SFTTrainer, LoRA/QLoRA, merge, atomic output).
"""
