"""Chat fine-tuning with trl + peft: full, LoRA, QLoRA (not built yet)."""
