"""What one stage hands another: tokenizers and vocabularies, HF-format checkpoints, GGUF files,
model references (paths, hub ids), chat templates, token shards."""
